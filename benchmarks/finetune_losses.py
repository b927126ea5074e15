"""Fine-tuning epoch per loss: python benchmarks/finetune_losses.py --data DATASET --json FILE

Runs s3rec-finetune in this process (world size 1, variant finetune-only: the loss's cost does not
depend on the weights) for one epoch with each finetune.loss of --losses, and reports
  epoch_s.LOSS        one training epoch (perf/epoch_s: no evaluation)
  ratio_to_bce.LOSS   epoch_s.LOSS / epoch_s.bce (when bce is among --losses)
  positions           target positions of an epoch (the rows every loss is computed on)
  num_items           the catalogue ce scores each position against
Extra `key=value` arguments override the config of every run (e.g. finetune.loss_negatives=128).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from bench_common import arguments, finish
from train_speed import epoch_seconds

LOSSES = ("bce", "ce", "sampled_softmax", "gbce")


def epoch_positions(data: str, overrides: list[str], config: str | None) -> tuple[int, int]:
    """(target positions of one fine-tuning epoch, num_items) of the dataset at `data`."""
    from s3rec.config import load_config
    from s3rec.data.finetune_samples import FinetuneSampler
    from s3rec.data.reader import Dataset
    cfg, ds = load_config(config, overrides), Dataset(data)
    items, offsets = ds.load_sequences()
    sampler = FinetuneSampler(items, offsets, ds.num_items, cfg.model.max_seq_length)
    return int(sampler.length.sum()), ds.num_items


def main(argv=None) -> int:
    p = arguments(__doc__)
    p.add_argument("--losses", default=",".join(LOSSES),
                   help=f"comma-separated finetune.loss values (default {','.join(LOSSES)})")
    p.add_argument("--config", default=None, help="a YAML config for every run (default: none)")
    p.add_argument("--out", default=None, help="run folders (default: a temporary folder)")
    args = p.parse_args(argv)
    losses = args.losses.split(",")
    bad = [x for x in losses if x not in LOSSES]
    if bad:
        raise SystemExit(f"--losses: {bad[0]!r} is not one of {','.join(LOSSES)}")
    root = Path(args.out or tempfile.mkdtemp(prefix="s3rec-bench-losses-"))
    if args.out and root.exists() and any(root.iterdir()):
        raise SystemExit(f"--out {root} is not empty: the entries would resume, not measure")

    import torch

    from s3rec import distributed as dist
    from s3rec import finetune
    dist.setup()
    positions, num_items = epoch_positions(args.data, args.overrides, args.config)
    figures: dict = {"data": str(Path(args.data).resolve()), "threads": torch.get_num_threads(),
                     "positions": positions, "num_items": num_items, "epoch_s": {}}
    config = ["--config", args.config] if args.config else []
    for loss in losses:
        out = root / loss
        rc = finetune.main(["--data", args.data, "--out", str(out), *config,
                            "variant=finetune-only", "finetune.epochs=1", f"finetune.loss={loss}",
                            "logging.every_steps=50", "checkpoint.keep_last=1", *args.overrides])
        if rc:
            raise SystemExit(f"fine-tuning with finetune.loss={loss} failed (exit {rc})")
        figures["epoch_s"][loss] = epoch_seconds(out)
        print(json.dumps({"loss": loss, "epoch_s": figures["epoch_s"][loss]}), flush=True)
    if "bce" in figures["epoch_s"]:
        bce = figures["epoch_s"]["bce"]
        figures["ratio_to_bce"] = {k: v / bce for k, v in figures["epoch_s"].items()}
    return finish(figures, args.json)


if __name__ == "__main__":
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    sys.exit(main())
