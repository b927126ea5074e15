"""What every benchmark script ends with: the machine it ran on, a printed table, the JSON file.

Imported by the scripts beside it (`python benchmarks/NAME.py` puts this folder on sys.path).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))      # the s3rec package of this checkout, for every script here


def arguments(doc: str) -> argparse.ArgumentParser:
    """The options every benchmark takes: --data, --json and trailing key=value overrides (add
    the script's own options to the parser returned)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--data", required=True, help="prepared dataset folder (s3rec-prep)")
    p.add_argument("--json", required=True, help="where to write the figures")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def config_and_data(args):
    """(config from the defaults and the overrides, the dataset at --data)."""
    from s3rec.config import load_config
    from s3rec.data.reader import Dataset
    return load_config(None, args.overrides), Dataset(args.data)


def machine() -> dict:
    """Where the figures came from: the README states the machine, the JSON backs it."""
    import torch
    info = {"cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "loadavg": [round(x, 2) for x in os.getloadavg()],
            "device": "cpu"}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    return info


def print_table(figures: dict) -> None:
    """A Markdown table of every figure (nested keys dotted), as the README quotes them."""
    from s3rec.config import flat_keys
    print("\n| figure | value |\n|---|---|")
    for k, v in flat_keys(figures).items():
        shown = f"{v:.4g}" if isinstance(v, float) else v
        print(f"| {k} | {shown} |")
    sys.stdout.flush()


def finish(figures: dict, path) -> int:
    """Add the machine, print the table, write the JSON (atomically); exit status 0."""
    from s3rec.atomic_write import write_json_atomic
    figures["machine"] = machine()
    print_table(figures)        # first: a bad --json folder loses no figure
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(path), figures)
    print(f"wrote {path}")
    return 0
