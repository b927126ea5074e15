"""Pretraining throughput at world size 1 and 2 on this machine:
python benchmarks/scaling.py --data DATASET --json FILE [key=value ...]

Each world size runs the real s3rec-pretrain (torchrun for 2 processes) for one epoch and reports
samples/s = pretraining samples of the epoch / perf/epoch_s, with the same global batch
(micro-batch halves at world size 2). CPU threads per rank: --threads (default cores / world
size). On a machine shared with other jobs use --threads 1: OpenMP threads that outnumber the
free cores spin and can make a step ten times slower (seen here).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_common import REPO, arguments, config_and_data, finish



def run(world: int, data: str, out: Path, overrides: list[str], threads: int) -> dict:
    args = ["--data", data, "--out", str(out), "pretrain.epochs=1", "pretrain.save_epochs=[]",
            "logging.every_steps=50", *overrides]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS=str(threads))
    if world == 1:
        cmd = [sys.executable, "-m", "s3rec.pretrain", *args]
    else:
        # --standalone: a free local port, not 29500 (which another job on the node may hold)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(world), "-m", "s3rec.pretrain", *args]
    subprocess.run(cmd, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out), size_guidance={"scalars": 0})
    acc.Reload()
    epoch_s = acc.Scalars("perf/epoch_s")[-1].value
    per_step = [e.value for e in acc.Scalars("perf/samples_per_s")]
    median = sorted(per_step)[len(per_step) // 2] if per_step else None   # None: epoch < 1 window
    return {"epoch_s": epoch_s, "median_window_samples_per_s": median}


def main(argv=None) -> int:
    p = arguments(__doc__)
    p.add_argument("--threads", type=int, default=0, help="threads per rank (0: cores / world)")
    args = p.parse_args(argv)
    cfg, ds = config_and_data(args)
    from s3rec.pretrain_step import pretrain_sampler
    samples = pretrain_sampler(cfg, ds).num_samples
    cores = os.cpu_count() or 1
    root = Path(tempfile.mkdtemp(prefix="s3rec-scaling-"))
    out = {"samples_per_epoch": samples, "cores": cores}
    for world in (1, 2):
        threads = args.threads or max(1, cores // world)
        r = run(world, args.data, root / f"w{world}", args.overrides, threads)
        out[f"world{world}"] = {**r, "threads_per_rank": threads,
                                "samples_per_s": samples / r["epoch_s"]}
    out["speedup"] = out["world2"]["samples_per_s"] / out["world1"]["samples_per_s"]
    return finish(out, args.json)


if __name__ == "__main__":
    sys.exit(main())
