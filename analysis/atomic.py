"""Atomic file writes for reports and figures: the project's one writer
(s3rec.atomic_write.atomic_path: a temporary name in the same folder, then renamed), so a reader
(or a crashed report) never sees a half-written CSV, report or figure, and a failed write is one
line naming the file and its free space.
"""
from __future__ import annotations

import contextvars
import csv
from pathlib import Path

from s3rec.atomic_write import atomic_path


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_csv(path: str | Path, rows: list[dict], columns: list[str]) -> None:
    """Rows as dicts; missing keys are written as empty cells."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, restval="", extrasaction="raise")
            w.writeheader()
            for r in rows:
                w.writerow(r)


# The formats every figure of the report being made is saved in (s3rec-report --figures):
# set once by build_report rather than passed through every figure's maker.
FIGURE_FORMATS: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "figure_formats", default=("png", "svg"))


def save_figure(fig, path_stem: str | Path, formats: tuple[str, ...] | None = None) -> list[Path]:
    """Save a matplotlib figure as PATH_STEM.png and .svg (or `formats`, else FIGURE_FORMATS),
    each atomically."""
    import matplotlib
    out = []
    for fmt in formats or FIGURE_FORMATS.get():
        p = Path(f"{path_stem}.{fmt}")
        with atomic_path(p) as tmp:
            # No date in an SVG and fixed element ids: a report made again from the same runs
            # is the same bytes (PNGs carry no date).
            with matplotlib.rc_context({"svg.hashsalt": "s3rec"}):
                fig.savefig(tmp, format=fmt, dpi=120, bbox_inches="tight",
                            metadata={"Date": None} if fmt == "svg" else None)
        out.append(p)
    return out
