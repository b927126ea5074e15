"""FABRICATED run logs for the analysis tests (no training involved).

`fabricate_grid(root)` writes run folders exactly as docs/architecture.md ("A run folder")
describes them - run.json, results.json, TensorBoard events written with
torch.utils.tensorboard.SummaryWriter - with made-up but plausible numbers, and returns the
truth: what each fabricated run logged, for the tests to compare the report against.

Layout (RUNS = root):
  demo/Synth/s3rec/rfull/s{1,2}          full-rank S3Rec, both stages done
  demo/Synth/s3rec-lowrank/r{4,8}/s{1,2} low-rank heads, both stages done, except
  demo/Synth/s3rec-lowrank/r8/s2         fine-tune KILLED midway (run.json running, no results)
  ablate-sp/Synth/s3rec/rfull/s{1,2}     pretrain.weights.sp=0, done
  ablate-aap/Synth/s3rec/rfull/s1        pretrain.weights.aap=0, done
  ablate-aap/Synth/s3rec/rfull/s2        pretraining FAILED (status failed, error), no fine-tune
  demo/Beauty/s3rec/rfull/s1             one cell on a dataset the paper reports
"""
from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from s3rec.config import load_config
from s3rec.model import build_model, save_model_file

D = 64
PRE_EPOCHS, STEPS_PER_EPOCH, FT_EPOCHS = 3, 5, 8
METRICS = ("HR@1", "HR@5", "NDCG@5", "HR@10", "NDCG@10", "MRR")
SHAPE = {"HR@1": 0.40, "HR@5": 0.82, "NDCG@5": 0.62, "HR@10": 1.0, "NDCG@10": 0.68,
         "MRR": 0.61}  # fraction of HR@10, so HR@1 <= HR@5 <= HR@10 and NDCG@k <= HR@k
KILLED = ("demo", "Synth", "s3rec-lowrank", "8", 2)
FAILED = ("ablate-aap", "Synth", "s3rec", "full", 2)
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def _params(rank: int | None, heads: bool = True) -> dict[str, int]:
    head = D * D + D if rank is None else 2 * D * rank + D
    p = {"item_embeddings": 102 * D, "attribute_embeddings": 21 * D, "position_embeddings": 50 * D,
         "encoder": 2 * (4 * (D * D + D) + 2 * D + 2 * (D * 256) + 256 + D + 2 * D) + 2 * D}
    if heads:
        p.update({"aap_norm": head, "mip_norm": D * D + D, "map_norm": head,
                  "sp_norm": D * D + D})
    p["total"] = sum(p.values())
    return p


def _quality(grid: str, variant: str, rank: str, seed: int) -> float:
    """The fabricated test HR@10 of a cell: full > r8 > r4, ablations lower, +-seed noise."""
    base = {"full": 0.55, "8": 0.54, "4": 0.52}[rank]
    base -= {"demo": 0.0, "ablate-sp": 0.015, "ablate-aap": 0.03}[grid]
    return round(base + 0.006 * (seed - 1.5), 4)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2))


def _run_json(stage, status, cfg, dataset, seed, params, epoch, error=None, seconds=None):
    return {"stage": stage, "status": status, "error": error, "config": cfg.to_dict(),
            "git": "fabricated", "data": f"/data/{dataset.lower()}",
            "dataset": {"name": dataset, "num_users": 100, "num_items": 100,
                        "num_attributes": 20},
            "protocol": "sampled-99", "seed": seed, "world_size": 1, "params": params,
            "epoch": epoch, "started": T0.isoformat(),
            "finished": (T0 + timedelta(seconds=seconds)).isoformat() if seconds else None}


def _pretrain(folder: Path, cfg, grid, dataset, rank, seed, failed: bool) -> dict:
    folder.mkdir(parents=True)
    w = cfg.pretrain.weights
    epochs = 1 if failed else PRE_EPOCHS
    logged: dict[str, list[tuple[int, float]]] = {}
    with SummaryWriter(str(folder)) as tb:
        for step in range(1, epochs * STEPS_PER_EPOCH + 1):
            decay = math.exp(-step / 6)
            vals = {"aap": 1900 * (0.3 + decay), "mip": 1.6 * (0.5 + decay),
                    "map": 780 * (0.3 + decay), "sp": 0.7 * (0.6 + 0.4 * decay)}
            # Lower ranks fit AAP/MAP a little worse; seeds differ by 1%.
            worse = {"full": 1.0, "8": 1.05, "4": 1.1}[rank]
            vals = {k: v * (1 + 0.01 * seed) * (worse if k in ("aap", "map") else 1.0)
                    for k, v in vals.items() if getattr(w, k) > 0}
            vals["total"] = sum(getattr(w, k) * v for k, v in vals.items())
            for k, v in vals.items():
                tb.add_scalar(f"loss/{k}", v, step)
                logged.setdefault(f"loss/{k}", []).append((step, v))
            tb.add_scalar("train/lr", 1e-3, step)
            if step % STEPS_PER_EPOCH == 0:
                ep = step // STEPS_PER_EPOCH
                tb.add_scalar("perf/epoch_s", 10.0 + seed, ep)
                for k in ("aap", "mip", "map", "sp", "total"):
                    if f"loss/{k}" in logged:
                        tb.add_scalar(f"epoch/loss_{k}", logged[f"loss/{k}"][-1][1], ep)
    params = _params(None if rank == "full" else int(rank))
    _write_json(folder / "run.json", _run_json(
        "pretrain", "failed" if failed else "done", cfg, dataset, seed, params, epochs,
        error="RuntimeError: fabricated failure (out of memory)" if failed else None,
        seconds=None if failed else 100 + seed))
    if not failed and rank == "full":
        # A real (untrained) model file of the fabricated sizes, for the low-rank analysis.
        torch.manual_seed(seed)
        save_model_file(folder / "final.pt", build_model(cfg, 102, 21), cfg,
                        {"name": dataset, "num_users": 100, "num_items": 100,
                         "num_attributes": 20})
    return {"logged": logged, "params": params, "epoch": epochs}


def _finetune(folder: Path, cfg, grid, dataset, rank, seed, killed: bool) -> dict:
    folder.mkdir(parents=True)
    q = _quality(grid, cfg.variant, rank, seed)
    epochs = 2 if killed else FT_EPOCHS
    valid = {}
    with SummaryWriter(str(folder)) as tb:
        for ep in range(1, epochs + 1):
            # Rises, then dips a little after epoch 6, so the best epoch is 6.
            frac = 1 - math.exp(-ep / 1.5) - (0.02 * (ep - 6) if ep > 6 else 0)
            valid[ep] = {m: q * SHAPE[m] * frac for m in METRICS}
            for m, v in valid[ep].items():
                tb.add_scalar(f"valid/{m}", v, ep)
            for s in range(4):
                tb.add_scalar("loss/finetune", 0.9 * math.exp(-ep / 4) + 0.01 * s,
                              (ep - 1) * 4 + s + 1)
        best = max(valid, key=lambda e: valid[e]["MRR"])
        test = {m: q * SHAPE[m] for m in METRICS}
        if not killed:
            for m, v in test.items():
                tb.add_scalar(f"test/{m}", v, best)
    params = _params(None, heads=False)
    _write_json(folder / "run.json", _run_json(
        "finetune", "running" if killed else "done", cfg, dataset, seed, params, epochs,
        seconds=None if killed else 50 + seed))
    if not killed:
        _write_json(folder / "results.json", {"protocol": "sampled-99", "valid": valid[best],
                                              "test": test, "best_epoch": best, "seed": seed,
                                              "params": params})
    return {"test": None if killed else test, "best_epoch": None if killed else best,
            "epoch": epochs, "params": params, "seconds": None if killed else 50 + seed}


def fabricate_grid(root: Path) -> dict:
    """Write the fabricated grid under `root`; return {(grid, dataset, variant, rank, seed,
    stage): what that run logged}."""
    cells = [("demo", "Synth", "s3rec", "full", s) for s in (1, 2)]
    cells += [("demo", "Synth", "s3rec-lowrank", r, s) for r in ("4", "8") for s in (1, 2)]
    cells += [("ablate-sp", "Synth", "s3rec", "full", s) for s in (1, 2)]
    cells += [("ablate-aap", "Synth", "s3rec", "full", s) for s in (1, 2)]
    cells += [("demo", "Beauty", "s3rec", "full", 1)]
    truth = {}
    for grid, dataset, variant, rank, seed in cells:
        over = [f"variant={variant}", f"seed={seed}", f"pretrain.epochs={PRE_EPOCHS}",
                f"finetune.epochs={FT_EPOCHS}"]
        if rank != "full":
            over.append(f"model.head_rank={rank}")
        if grid.startswith("ablate-"):
            over.append(f"pretrain.weights.{grid.split('-')[1]}=0")
        cfg = load_config(None, over)
        cell = root / grid / dataset / variant / f"r{rank}" / f"s{seed}"
        key = (grid, dataset, variant, rank, seed)
        failed = key == FAILED
        truth[key + ("pretrain",)] = _pretrain(cell / "pretrain", cfg, grid, dataset, rank,
                                               seed, failed)
        if not failed:
            truth[key + ("finetune",)] = _finetune(cell / "finetune", cfg, grid, dataset, rank,
                                                   seed, killed=key == KILLED)
    return truth


_CACHE: dict = {}


@pytest.fixture(scope="session")
def fabricated_grid(tmp_path_factory):
    """(RUNS folder, truth) of the FABRICATED grid, written once per test session (test modules
    import this fixture, so the cache keeps it to one copy). Tests must not modify it."""
    if "grid" not in _CACHE:
        root = tmp_path_factory.mktemp("fabricated_runs")
        _CACHE["grid"] = (root, fabricate_grid(root))
    return _CACHE["grid"]


def test_fabricated_grid_follows_the_run_folder_contract(fabricated_grid):
    root, truth = fabricated_grid
    assert len(truth) == 11 * 2 - 1  # 11 cells, one without a fine-tune
    for (grid, dataset, variant, rank, seed, stage), t in truth.items():
        folder = root / grid / dataset / variant / f"r{rank}" / f"s{seed}" / stage
        rj = json.loads((folder / "run.json").read_text())
        assert rj["stage"] == stage and rj["config"]["variant"] == variant
        assert any(p.name.startswith("events.out.tfevents") for p in folder.iterdir())
        assert (folder / "results.json").exists() == (stage == "finetune" and
                                                      t["test"] is not None)
