"""Small input files in the real formats, for tests (release format, raw Amazon dumps)."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np


def write_release(folder: Path, name: str, seqs: list[list[int]], attrs: dict[int, list[int]],
                  sample: list[list[int]] | None = None) -> Path:
    """`<name>.txt` (user i+1 = seqs[i]), `<name>_item2attributes.json`, optional `_sample.txt`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.txt").write_text(
        "".join(f"{u} " + " ".join(map(str, s)) + "\n" for u, s in enumerate(seqs, 1)))
    (folder / f"{name}_item2attributes.json").write_text(
        json.dumps({str(k): v for k, v in attrs.items()}))
    if sample is not None:
        (folder / f"{name}_sample.txt").write_text(
            "".join(f"{u} " + " ".join(map(str, s)) + "\n" for u, s in enumerate(sample, 1)))
    return folder


def random_release(folder: Path, name: str = "Toy", num_users: int = 300, num_items: int = 400,
                   num_attributes: int = 30, seed: int = 0, with_sample: bool = False) -> Path:
    """A random release-format dataset (lengths 5..20; every item used; 1-3 attributes each)."""
    rng = np.random.default_rng(seed)
    seqs = [list(rng.integers(1, num_items + 1, rng.integers(5, 21))) for _ in range(num_users)]
    seqs[0] = list(range(1, num_items + 1))[:5]
    seqs[-1] = [num_items] * 5                      # so that max item id = num_items
    attrs = {i: [int(a) for a in rng.integers(1, num_attributes + 1, rng.integers(1, 4))]
             for i in range(1, num_items + 1)}
    attrs[1] = [num_attributes]
    sample = None
    if with_sample:
        sample = [list(rng.choice(np.setdiff1d(np.arange(1, num_items + 1), s), 99, replace=False))
                  for s in seqs]
    return write_release(folder, name, [[int(x) for x in s] for s in seqs], attrs,
                         [[int(x) for x in s] for s in sample] if sample else None)


def write_amazon(folder: Path, category: str, reviews: list[dict], meta: list[dict]) -> tuple[Path, Path]:
    """reviews_<Cat>_5.json.gz (JSON lines) and meta_<Cat>.json.gz (Python literals, as released)."""
    folder.mkdir(parents=True, exist_ok=True)
    r, m = folder / f"reviews_{category}_5.json.gz", folder / f"meta_{category}.json.gz"
    with gzip.open(r, "wt") as f:
        f.writelines(json.dumps(x) + "\n" for x in reviews)
    with gzip.open(m, "wt") as f:
        f.writelines(repr(x) + "\n" for x in meta)
    return r, m
