"""Atomic file writes: write to a temporary name in the same folder, then rename.

A reader (or a crashed report) never sees a half-written CSV, report or figure.
"""
from __future__ import annotations

import csv
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    """The process umask (only readable by setting it, so set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes the file 0600 and the rename keeps that: give it the mode an ordinary
        # open() would have, so a shared report folder stays readable by the group.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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


def save_figure(fig, path_stem: str | Path, formats=("png", "svg")) -> list[Path]:
    """Save a matplotlib figure as PATH_STEM.png and .svg, each atomically."""
    out = []
    for fmt in formats:
        p = Path(f"{path_stem}.{fmt}")
        with atomic_path(p) as tmp:
            fig.savefig(tmp, format=fmt, dpi=120, bbox_inches="tight")
        out.append(p)
    return out
