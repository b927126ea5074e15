"""The report per attribute field: a field's head rank and weight read from run.json config,
the per-field rank and ablation figures, and the per-field heads of the anatomy.

Unit tests on hand-made Run records (no training), then a REAL tiny grid (local executor, a
two-field synthetic dataset) that sweeps one field's AAP rank and another head's field weight,
and s3rec-report on it. The grid test reads each run's field settings from its run.json config,
never from the folder names."""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from s3rec.analysis.anatomy import field_head_facts, field_heads_figure
from s3rec.analysis.field_figures import (ablation_bars, all_field_figures, anatomy_checkpoint,
                                          field_runs, fields_section, rank_lines, rank_sweeps)
from s3rec.analysis.lowrank import analyse_checkpoint
from s3rec.analysis.read_runs import Run
from s3rec.config import load_config
from s3rec.data.fields import field_layout
from s3rec.model import build_model, save_model_file
from tests.test_report import assert_real_figure

FIELDS = ("cluster", "noise")
LOW_NOISE_AAP = ["model.fields.noise.aap.kind=lowrank"]


def _params(fields=FIELDS) -> dict:
    tables = ({"attribute_embeddings": 17 * 64} if len(fields) == 1 else
              {f"attribute_embeddings_{f}": 9 * 64 for f in fields})
    return {"item_embeddings": 102 * 64, **tables, "total": 1}


def _cell(root: Path, name: str, over: list[str], hr: float, seed: int = 1, fields=FIELDS,
          finetune_over: list[str] | None = None) -> list[Run]:
    """A done pretraining and the fine-tune from its final.pt, as read_runs would hold them."""
    def run(stage, cfg_over, **extra):
        cfg = load_config(None, [*cfg_over, f"seed={seed}"])
        return Run(path=root / name / stage, cell=name, grid="g", dataset="syn",
                   variant=cfg.variant, rank=extra.pop("rank", "full"), seed=seed, stage=stage,
                   status="done", run_json={"config": cfg.to_dict(), "protocol": "sampled-99",
                                            "params": _params(fields), **extra.pop("rj", {})},
                   results=extra.pop("results", None), **extra)
    rank = next((o.split("=")[1] for o in over if o.startswith("model.head_rank=")), "full")
    pre = run("pretrain", over, rank=rank)
    init = str(pre.path / "final.pt")
    ft = run("finetune", over if finetune_over is None else finetune_over, rank=rank,
             rj={"init": init}, results={"test": {"HR@10": hr, "NDCG@10": hr / 2},
                                         "valid": {}, "best_epoch": 1},
             init={"init": init, "init_epochs": 3, "init_variant": "", "init_rank": ""})
    return [pre, ft]


def _sweep(root: Path) -> list[Run]:
    """noise AAP rank 2 / 4 x noise MAP weight 0 / 1 x seeds 1, 2; HR@10 encodes the cell."""
    runs = []
    for rank in (2, 4):
        for w in (0, 1):
            for seed in (1, 2):
                over = [*LOW_NOISE_AAP, f"model.fields.noise.aap.rank={rank}",
                        f"model.fields.noise.map.weight={w}"]
                runs += _cell(root, f"r{rank}w{w}s{seed}", over,
                              hr=0.1 * rank + 0.01 * w + 0.001 * seed, seed=seed)
    return runs


def test_field_heads_are_read_from_the_pretraining_config_as_training_resolves_them(tmp_path):
    runs = _cell(tmp_path, "a", [*LOW_NOISE_AAP, "model.fields.noise.aap.rank=2",
                                 "model.fields.cluster.map.weight=0", "pretrain.weights.aap=0"],
                 hr=0.3, finetune_over=[])    # the fine-tune's own config names no field
    runs += _cell(tmp_path, "b", ["variant=s3rec-lowrank", "model.head_rank=8"], hr=0.2)
    (a, b) = field_runs(runs)
    assert a.pretrain is runs[0] and a.run is runs[1]
    h = a.heads
    assert (h[("noise", "aap")].rank, h[("cluster", "aap")].rank) == ("2", "full")
    assert h[("cluster", "map")].weight == 0 and h[("cluster", "map")].removed
    # pretrain.weights.aap = 0 removes AAP for every field: the grid's ablation, not a field's
    assert h[("noise", "aap")].objective_weight == 0 and not h[("noise", "aap")].removed
    # the variant and model.head_rank reach every field head (rank 0 = model.head_rank)
    assert {x.rank for x in b.heads.values()} == {"8"}
    assert a.settings["model.fields.noise.aap.rank"] == "2"
    assert a.settings["model.fields.cluster.map.weight"] == "0.0"


def test_one_field_runs_get_no_field_figures_and_no_section(tmp_path):
    runs = _cell(tmp_path, "a", [], hr=0.3, fields=("attributes",))
    assert field_runs(runs) == []
    assert all_field_figures(runs, tmp_path / "figs") == ([], [])
    assert fields_section(runs, tmp_path) == "" and not (tmp_path / "figures").exists()


def test_rank_lines_pool_seeds_and_keep_other_settings_apart(tmp_path):
    frs = field_runs(_sweep(tmp_path))
    assert rank_sweeps(frs) == [("noise", "aap")]       # nothing else differs in rank
    lines = rank_lines(frs, "noise", "aap")
    assert set(lines) == {"noise.map.weight=0.0", "noise.map.weight=1.0"}
    for lab, w in (("noise.map.weight=0.0", 0), ("noise.map.weight=1.0", 1)):
        assert set(lines[lab]) == {"2", "4"}
        for rank, rs in lines[lab].items():
            assert sorted(fr.run.test_metrics()["HR@10"] for fr in rs) == pytest.approx(
                [0.1 * int(rank) + 0.01 * w + 0.001 * s for s in (1, 2)])


def test_the_grids_own_rank_axis_is_not_a_field_sweep(tmp_path):
    runs = []
    for r in (4, 8):
        runs += _cell(tmp_path, f"r{r}", ["variant=s3rec-lowrank", f"model.head_rank={r}"],
                      hr=0.2 + r / 100)
    figs, notes = all_field_figures(runs, tmp_path / "figures")
    assert rank_sweeps(field_runs(runs)) == [] and figs == []
    assert any(n.startswith("field rank (syn, sampled-99): no field's") for n in notes), notes


def test_ablation_bars_set_each_removal_beside_its_same_settings(tmp_path):
    runs = _sweep(tmp_path)
    runs += _cell(tmp_path, "global", ["pretrain.weights.map=0"], hr=0.5)   # not a field's
    frs = field_runs(runs)
    bars = ablation_bars(frs, "noise")
    assert [lab for lab, _ in bars] == [
        "noise.aap.rank=2\nnoise: all objectives", "noise.aap.rank=2\nw/o noise MAP",
        "noise.aap.rank=4\nnoise: all objectives", "noise.aap.rank=4\nw/o noise MAP"]
    for lab, rs in bars:
        assert len(rs) == 2 and len({fr.run.seed for fr in rs}) == 2
        want_w = 0.0 if "w/o" in lab else 1.0
        assert {fr.heads[("noise", "map")].weight for fr in rs} == {want_w}
    assert ablation_bars(frs, "cluster") == []


def test_field_figures_are_written_and_listed(tmp_path):
    runs = _sweep(tmp_path)
    text = fields_section(runs, tmp_path)
    stems = re.findall(r"!\[[^\]]*\]\(([^)]+)\.png\)", text)
    assert stems == ["figures/field_rank_noise_aap_syn_sampled-99",
                     "figures/field_ablation_noise_syn_sampled-99"]
    for s in stems:
        assert_real_figure(tmp_path / s)


def test_checkpoints_of_the_analyses_prefer_every_field_head_trained(tmp_path):
    from s3rec.analysis.report import default_checkpoint
    runs = _cell(tmp_path, "a-map0", ["model.fields.noise.map.weight=0"], hr=0.3)
    runs += _cell(tmp_path, "b-low", [*LOW_NOISE_AAP, "model.fields.noise.aap.rank=2"], hr=0.3)
    runs += _cell(tmp_path, "c-full", [], hr=0.3)
    for r in runs:
        r.path.mkdir(parents=True)
        (r.path / "final.pt").touch()
    # the low-rank analysis wants full-rank heads, all trained; the anatomy a low-rank one
    assert default_checkpoint(runs) == tmp_path / "c-full" / "pretrain" / "final.pt"
    assert anatomy_checkpoint(runs) == tmp_path / "b-low" / "pretrain" / "final.pt"
    assert anatomy_checkpoint(runs[:2]) == tmp_path / "a-map0" / "pretrain" / "final.pt"


def _two_field_model(over: list[str]):
    cfg = load_config(None, ["model.hidden_size=16", "model.inner_size=32", *over])
    return cfg, build_model(cfg, 30, 25, fields=field_layout([("cluster", 16), ("noise", 8)]))


def test_field_head_facts_count_parameters_and_spectra_per_field(tmp_path):
    torch.manual_seed(0)
    _, model = _two_field_model([*LOW_NOISE_AAP, "model.fields.noise.aap.rank=3"])
    facts = field_head_facts(model.state_dict())
    counts = model.param_counts()
    assert [(h.field, h.objective, h.rank) for h in facts] == [
        ("cluster", "aap", None), ("cluster", "map", None), ("noise", "aap", 3),
        ("noise", "map", None)]
    for h in facts:
        assert h.params == counts[f"{h.head}_norm"]
        assert len(h.singular) == 16 and list(h.singular) == sorted(h.singular, reverse=True)
    low = facts[2]
    assert low.params == 2 * 16 * 3 + 16 and low.label == "noise AAP (rank 3)"
    assert low.singular[2] > 1e-6 > low.singular[3]          # U V^T has rank 3
    assert field_heads_figure(model.state_dict(), tmp_path / "fh", "t") == facts
    assert_real_figure(tmp_path / "fh")
    with pytest.raises(ValueError, match="one attribute field"):
        field_head_facts(build_model(load_config(None, []), 30, 25).state_dict())


def test_lowrank_analysis_takes_every_field_head_of_a_multi_field_checkpoint(tmp_path):
    cfg, model = _two_field_model([])
    path = save_model_file(tmp_path / "final.pt", model, cfg,
                           {"name": "syn", "num_users": 1, "num_items": 28,
                            "num_attributes": 24})
    spectra = analyse_checkpoint(path)
    assert [h.name for h in spectra] == ["aap_cluster", "aap_noise", "map_cluster", "map_noise",
                                        "mip", "sp"]
    w = model.state_dict()["map_noise_norm.weight"].double()
    assert spectra[3].singular == pytest.approx(torch.linalg.svdvals(w).tolist())


# ---------------------------------------------------------------- a real tiny grid

GRID_OVERRIDES = {"model.hidden_size": 16, "model.inner_size": 32, "model.max_seq_length": 10,
                  "model.fields.noise.aap.kind": "lowrank", "pretrain.epochs": 1,
                  "pretrain.batch_size": 64, "pretrain.save_epochs": [], "finetune.epochs": 1,
                  "finetune.batch_size": 64}
AXES = {"model.fields.noise.aap.rank": [2, 4], "model.fields.noise.map.weight": [0, 1]}


def _run(cmd: list[str], cwd: Path, timeout: int) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


@pytest.fixture(scope="module")
def field_grid(tmp_path_factory):
    """A two-field dataset, a 4-cell grid sweeping noise's AAP rank and MAP weight (seed 1),
    and s3rec-report on it (anatomy included)."""
    root = tmp_path_factory.mktemp("field_grid")
    data = root / "data" / "syn2"
    _run(["s3rec-prep", "synthetic", "--users", "200", "--items", "120", "--attributes", "16",
          "--noise-attributes", "8", "--seed", "7", "--out", str(data)], root, 300)
    grid = {"name": "fields", "data": [str(data)], "variants": ["s3rec"], "seeds": [1],
            "axes": AXES, "overrides": GRID_OVERRIDES, "out": str(root / "runs"),
            "executor": {"kind": "local", "array_parallelism": 2, "cells_per_job": 2,
                         "timeout_min": 20}}
    (root / "g.yaml").write_text(json.dumps(grid))
    _run(["s3rec-grid", str(root / "g.yaml"), "--executor", "local"], root, 1500)
    _run(["s3rec-report", str(root / "runs"), "--out", str(root / "report")], root, 900)
    return root


def _pretrainings(runs_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(runs_dir.rglob("pretrain/run.json"))]


@pytest.mark.multiproc
@pytest.mark.slow
def test_the_grid_sets_the_field_rank_and_weight_its_axes_name(field_grid):
    pres = _pretrainings(field_grid / "runs")
    got = sorted((p["config"]["model"]["fields"]["noise"]["aap"]["rank"],
                  p["config"]["model"]["fields"]["noise"]["map"]["weight"]) for p in pres)
    assert got == [(2, 0.0), (2, 1.0), (4, 0.0), (4, 1.0)]
    for p in pres:
        r = p["config"]["model"]["fields"]["noise"]["aap"]["rank"]
        assert p["status"] == "done" and p["params"]["aap_noise_norm"] == 2 * 16 * r + 16
        assert p["params"]["aap_cluster_norm"] == 16 * 16 + 16
    assert len(list((field_grid / "runs").rglob("results.json"))) == 4


@pytest.mark.multiproc
@pytest.mark.slow
def test_report_draws_the_per_field_figures_from_run_json(field_grid):
    from s3rec.analysis.read_runs import read_runs
    out = field_grid / "report"
    text = (out / "report.md").read_text()
    links = {Path(p).stem for p in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)}
    want = {"field_rank_noise_aap_syn2_sampled-99", "field_ablation_noise_syn2_sampled-99",
            "field_heads"}
    assert want <= links, links
    for stem in want:
        assert_real_figure(out / "figures" / stem)
    # The figures' data equal each fine-tune's results.json, keyed by its pretraining's config.
    frs = field_runs(read_runs(field_grid / "runs"))
    assert len(frs) == 4
    for fr in frs:
        cfg = fr.pretrain.run_json["config"]["model"]["fields"]["noise"]
        assert fr.heads[("noise", "aap")].rank == str(cfg["aap"]["rank"])
        assert fr.heads[("noise", "map")].removed == (cfg["map"]["weight"] == 0)
        res = json.loads((fr.run.path / "results.json").read_text())
        assert fr.run.test_metrics()["HR@10"] == res["test"]["HR@10"]
    lines = rank_lines(frs, "noise", "aap")
    assert {lab: sorted(by) for lab, by in lines.items()} == {
        "noise.map.weight=0.0": ["2", "4"], "noise.map.weight=1.0": ["2", "4"]}
    assert len(ablation_bars(frs, "noise")) == 4
    # The low-rank analysis reads the per-field heads of a checkpoint that trained them all.
    spectra = (out / "lowrank_spectra.csv").read_text()
    assert "aap_noise" in spectra and "map_cluster" in spectra
    ckpt = Path(re.search(r"Checkpoint: `([^`]+)`", text).group(1))
    pre = json.loads(((ckpt if ckpt.is_absolute() else field_grid / ckpt).parent
                      / "run.json").read_text())
    assert pre["config"]["model"]["fields"]["noise"]["map"]["weight"] == 1.0


@pytest.mark.multiproc
@pytest.mark.slow
def test_anatomy_shows_each_fields_heads_of_a_trained_checkpoint(field_grid):
    from s3rec.analysis.read_runs import read_runs
    ckpt = anatomy_checkpoint(read_runs(field_grid / "runs"))
    pre = json.loads((ckpt.parent / "run.json").read_text())
    noise = pre["config"]["model"]["fields"]["noise"]
    assert noise["map"]["weight"] == 1.0      # no field objective removed: every head trained
    text = (field_grid / "report" / "report.md").read_text()
    section = text[text.index("### Heads per attribute field"):]
    assert str(ckpt) in section or str(ckpt.relative_to(field_grid)) in section
    for f in FIELDS:
        for o in ("aap", "map"):
            row = re.search(rf"^\| {f} \| {o.upper()} \| {o}_{f}_norm \| ([^|]+) \| ([\d,]+) \|",
                            section, re.M)
            assert row, (f, o)
            assert int(row.group(2).replace(",", "")) == pre["params"][f"{o}_{f}_norm"]
            want = f"rank {noise['aap']['rank']}" if (f, o) == ("noise", "aap") else "full"
            assert row.group(1).strip() == want
