"""Per-field ablation and rank: python benchmarks/fields_ablation.py --data DATASET --json FILE

DATASET has two attribute fields, one informative and one noise (e.g. `s3rec-prep synthetic
--users 2000 --items 300 --attributes 64 --noise-attributes 64 --clusters 16`: fields `cluster`
and `noise`). For each seed of --seeds it pretrains and fine-tunes (configs/tiny.yaml unless
--config) under each condition and reports the test HR@10 (sampled protocol):
  both              both fields' AAP and MAP
  without.FIELD     FIELD's AAP and MAP weights 0 (model.fields.FIELD.{aap,map}.weight=0)
  rank.R            the informative field's AAP and MAP heads low-rank of rank R
and for each condition the mean over the seeds (`mean`) and its loss against `both`
(`loss_vs_both` = mean(both) - mean(condition)). --figure writes the rank-vs-HR@10 plot.
Extra `key=value` arguments override the config of every run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_common import REPO, arguments, finish


def conditions(informative: str, noise: str, ranks: list[int]) -> dict[str, list[str]]:
    """Condition name -> the overrides that make it."""
    def off(f: str) -> list[str]:
        return [f"model.fields.{f}.aap.weight=0", f"model.fields.{f}.map.weight=0"]

    def lowrank(f: str, r: int) -> list[str]:
        return [f"model.fields.{f}.{o}.{k}={v}" for o in ("aap", "map")
                for k, v in (("kind", "lowrank"), ("rank", r))]

    out = {"both": [], f"without.{informative}": off(informative), f"without.{noise}": off(noise)}
    out.update({f"rank.{r}": lowrank(informative, r) for r in ranks})
    return out


def run_cell(data: str, work: Path, config: str, seed: int, overrides: list[str]) -> float:
    """Pretrain then fine-tune from its final.pt; the fine-tune's test HR@10."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    common = ["--data", data, "--config", config, f"seed={seed}", "logging.tensorboard=false",
              "pretrain.save_epochs=[]", *overrides]
    for stage, extra in (("pretrain", []), ("finetune", ["--init", str(work / "pretrain" / "final.pt")])):
        p = subprocess.run([sys.executable, "-m", f"s3rec.{stage}", "--out", str(work / stage),
                            *common, *extra], cwd=REPO, env=env, capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"fields_ablation: {stage} in {work} failed (exit {p.returncode}): "
                             f"{p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''}")
    results = json.loads((work / "finetune" / "results.json").read_text())
    return float(results["test"]["HR@10"])


def plot(figures: dict, ranks: list[int], path: str, informative: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.plot(ranks, [figures[f"rank.{r}"]["mean"] for r in ranks], "o-",
            label=f"{informative}: low-rank AAP/MAP")
    for name, style in (("both", "--"), (f"without.{informative}", ":")):
        ax.axhline(figures[name]["mean"], linestyle=style, color="grey", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"rank of the {informative} heads")
    ax.set_ylabel("test HR@10 (mean of seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = arguments(__doc__)
    p.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default 1,2,3)")
    p.add_argument("--ranks", default="1,4", help="ranks of the informative field's heads")
    p.add_argument("--informative", default="cluster")
    p.add_argument("--noise", default="noise")
    p.add_argument("--figure", default=None, help="PNG of HR@10 against the rank")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    ranks = [int(r) for r in args.ranks.split(",")]
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="s3rec-fields-") as tmp:
        for name, extra in conditions(args.informative, args.noise, ranks).items():
            hr = {str(s): run_cell(args.data, Path(tmp) / name / str(s), args.config, s,
                                   [*args.overrides, *extra]) for s in seeds}
            figures[name] = {"hr10": hr, "mean": sum(hr.values()) / len(hr)}
            print(f"{name}: {figures[name]['mean']:.4f} {hr}", flush=True)
    for fig in figures.values():
        fig["loss_vs_both"] = figures["both"]["mean"] - fig["mean"]
    figures["seeds"], figures["overrides"] = seeds, args.overrides
    if args.figure:
        plot(figures, ranks, args.figure, args.informative)
    return finish(figures, args.json)


if __name__ == "__main__":
    sys.exit(main())
