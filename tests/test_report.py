"""s3rec-report end to end on the FABRICATED grid (tests/test_analysis_fixtures.py)."""
from __future__ import annotations

import csv
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from s3rec.analysis.report import build_report, main
from tests.test_analysis_fixtures import FAILED, KILLED, fabricated_grid  # noqa: F401

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_real_figure(stem: Path) -> None:
    """A PNG with a valid header and a non-trivial size, and an SVG that parses."""
    png, svg = stem.with_suffix(".png"), stem.with_suffix(".svg")
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC, png
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 300 and height >= 200 and len(data) > 10_000, (png, width, height)
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg") and svg.stat().st_size > 5_000, svg


@pytest.fixture(scope="module")
def report(fabricated_grid, tmp_path_factory):  # noqa: F811
    root, truth = fabricated_grid
    out = tmp_path_factory.mktemp("report")
    assert main([str(root), "--out", str(out), "--no-anatomy"]) == 0
    return out, truth


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_report_writes_tables_report_and_every_grid_figure(report):
    out, _ = report
    text = (out / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    expected = {"metric_vs_rank_Synth_sampled-99", "params_vs_metric_Synth_sampled-99",
                "learning_curves_Synth_sampled-99", "ablation_Synth_sampled-99",
                "pretrain_losses_Synth_pretrain", "vs_paper_Beauty_sampled-99",
                "lowrank_spectra"}
    assert expected <= {Path(p).stem for p in links}
    for link in links:
        assert not Path(link).is_absolute()
        assert_real_figure(out / Path(link).with_suffix(""))
    # No leftovers of the atomic writes.
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_runs_csv_numbers_equal_what_the_fabricated_runs_logged(report):
    out, truth = report
    rows = _rows(out / "runs.csv")
    assert len(rows) == len(truth)
    for row in rows:
        key = (row["grid"], row["dataset"], row["variant"], row["rank"], int(row["seed"]),
               row["stage"])
        t = truth[key]
        assert int(row["params_total"]) == t["params"]["total"]
        if row["stage"] == "finetune" and t["test"]:
            for m, v in t["test"].items():
                assert float(row[f"test_{m}"]) == v  # csv keeps Python's float repr
            assert int(row["best_epoch"]) == t["best_epoch"]
    status = {(r["grid"], r["variant"], r["rank"], int(r["seed"]), r["stage"]): r["status"]
              for r in rows}
    assert status[(KILLED[0], KILLED[2], KILLED[3], KILLED[4], "finetune")] == "unfinished"
    assert status[(FAILED[0], FAILED[2], FAILED[3], FAILED[4], "pretrain")] == "failed"


def test_report_table_means_equal_the_runs(report):
    out, truth = report
    text = (out / "report.md").read_text()
    # Synth s3rec (demo grid): mean HR@10 over seeds 1 and 2.
    vals = [truth[("demo", "Synth", "s3rec", "full", s, "finetune")]["test"]["HR@10"]
            for s in (1, 2)]
    line = next(ln for ln in text.splitlines() if ln.startswith("| ours: s3rec | 2 (1,2)"))
    # 95% t-interval over 2 seeds: mean ± t(0.975, df 1) * sd / sqrt(2), t from a printed table
    mean, sd = sum(vals) / 2, abs(vals[0] - vals[1]) / math.sqrt(2)
    half = 12.706204736 * sd / math.sqrt(2)
    assert f"{mean:.4f} [{mean - half:.4f}, {mean + half:.4f}]" in line
    assert "| **paper S3-Rec** |  | published | 0.2192 | 0.4502 |" in text
    # The killed and the failed runs are named with their reason, not dropped.
    assert "demo/Synth/s3rec-lowrank/r8/s2 | finetune | unfinished | 2" in text
    assert "ablate-aap/Synth/s3rec/rfull/s2 | pretrain | failed | 1 | RuntimeError" in text
    assert "1 (1), 1 not done" in text


def test_scalars_csv_has_every_point(report):
    out, truth = report
    rows = _rows(out / "scalars.csv")
    key = ("demo", "Synth", "s3rec", "full", 2, "pretrain")
    got = [float(r["value"]) for r in rows
           if (r["grid"], r["dataset"], r["variant"], r["rank"], int(r["seed"]), r["stage"])
           == key and r["tag"] == "loss/map"]
    assert got == pytest.approx([v for _, v in truth[key]["logged"]["loss/map"]], rel=1e-6)


def test_grid_without_ablations_or_finished_finetunes_skips_figures_with_a_note(
        fabricated_grid, tmp_path):  # noqa: F811
    import shutil
    root, _ = fabricated_grid
    sub = tmp_path / "runs"
    shutil.copytree(root / "demo" / "Synth" / "s3rec-lowrank" / "r8",
                    sub / "demo" / "Synth" / "s3rec-lowrank" / "r8")
    out = tmp_path / "rep"
    assert main([str(sub), "--out", str(out), "--no-anatomy"]) == 0
    text = (out / "report.md").read_text()
    assert "ablation bars: no finished fine-tune" in text
    assert "no finished low-rank fine-tunes" not in text   # r8 s1 finished
    assert "No finished full-rank pretraining with a final.pt" in text


def test_png_only_without_scalars_writes_and_links_neither(fabricated_grid, tmp_path):  # noqa: F811
    """The form kept in a repository: --figures png --no-scalars. The figures are the same
    PNGs, byte for byte, as a full report's; no SVG, no scalars.csv, and no link to either."""
    root, _ = fabricated_grid
    full, small = tmp_path / "full", tmp_path / "small"
    assert main([str(root), "--out", str(full), "--no-anatomy"]) == 0
    assert main([str(root), "--out", str(small), "--no-anatomy", "--figures", "png",
                 "--no-scalars"]) == 0
    text = (small / "report.md").read_text()
    assert "scalars.csv" not in text and ".svg" not in text and "[SVG]" not in text
    assert not (small / "scalars.csv").exists() and not list(small.rglob("*.svg"))
    pngs = sorted(p.relative_to(full) for p in full.rglob("*.png"))
    assert pngs and pngs == sorted(p.relative_to(small) for p in small.rglob("*.png"))
    assert all((full / p).read_bytes() == (small / p).read_bytes() for p in pngs)
    assert "--figures png --no-scalars" in text.split("\n## ")[0]


def test_explicit_checkpoint_must_exist(fabricated_grid, tmp_path, capsys):  # noqa: F811
    root, _ = fabricated_grid
    assert main([str(root), "--out", str(tmp_path / "r"), "--no-anatomy",
                 "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("s3rec-report: error: --checkpoint ")
    assert "missing.pt does not exist" in err
    assert not (tmp_path / "r").exists()


def test_explicit_checkpoint_without_heads_is_an_error_line(fabricated_grid, tmp_path, capsys):  # noqa: F811
    """Before: a raw KeyError from the head lookup."""
    import torch
    root, _ = fabricated_grid
    f = tmp_path / "no_heads.pt"
    torch.save({"model": {"item_embeddings.weight": torch.zeros(3, 2)}}, f)
    assert main([str(root), "--out", str(tmp_path / "r"), "--no-anatomy",
                 "--checkpoint", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("s3rec-report: error: --checkpoint ") and "no_heads.pt" in err
    assert "aap_norm.weight" in err


def test_missing_runs_folder_or_bad_run_json_is_an_error_line(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"), "--no-anatomy"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("s3rec-report: error: ") and "nowhere does not exist" in err
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "run.json").write_text("{broken")
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "r"), "--no-anatomy"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("s3rec-report: error: ") and "run.json: not valid JSON" in err
    assert not (tmp_path / "r").exists()


def test_fine_tunes_are_tabled_by_the_pretraining_they_started_from(tmp_path):
    """Fine-tunes started from RUN/epoch-N.pt and RUN/final.pt of pretraining runs (outside any
    grid layout, as a user's hand-made runs): runs.csv names the init file, its pretraining epochs,
    variant and rank; the report tables them by pretraining and epochs. FABRICATED logs."""
    import json
    from s3rec.config import load_config
    from tests.test_analysis_fixtures import _run_json
    root = tmp_path / "runs"
    lowrank = load_config(None, ["variant=s3rec-lowrank", "model.head_rank=4"])
    full = load_config(None, [])
    for name, cfg, epochs in (("pt-lr4", lowrank, 30), ("pt-full", full, 150)):
        (root / name).mkdir(parents=True)
        (root / name / "run.json").write_text(json.dumps(
            _run_json("pretrain", "running" if epochs == 30 else "done", cfg, "Beauty", 42, {},
                      epochs)))
    cases = {"ft-lr4-10": (root / "pt-lr4" / "epoch-10.pt", 0.51),
             "ft-lr4-30": (root / "pt-lr4" / "epoch-30.pt", 0.53),
             "ft-full": (root / "pt-full" / "final.pt", 0.56),
             "ft-elsewhere": (tmp_path / "authors.pt", 0.55)}
    for name, (init, hr) in cases.items():
        (root / name).mkdir()
        rj = _run_json("finetune", "done", full, "Beauty", 42, {}, 20)
        rj["init"] = str(init)
        (root / name / "run.json").write_text(json.dumps(rj))
        test = {"HR@10": hr, "NDCG@10": hr / 1.5, "MRR": hr / 1.7}
        (root / name / "results.json").write_text(json.dumps(
            {"protocol": "sampled-99", "valid": test, "test": test, "best_epoch": 7}))
    report = build_report(root, tmp_path / "out", anatomy=False)
    rows = {Path(r["path"]).name: r for r in csv.DictReader(open(tmp_path / "out" / "runs.csv"))}
    assert (rows["ft-lr4-10"]["init_epochs"], rows["ft-lr4-10"]["init_variant"],
            rows["ft-lr4-10"]["init_rank"]) == ("10", "s3rec-lowrank", "4")
    assert (rows["ft-full"]["init_epochs"], rows["ft-full"]["init_rank"]) == ("150", "full")
    assert rows["ft-elsewhere"]["init"] == str(tmp_path / "authors.pt")
    assert rows["ft-elsewhere"]["init_epochs"] == "" and rows["ft-elsewhere"]["init_variant"] == ""
    assert rows["pt-lr4"]["init"] == ""
    text = report.read_text()
    section = text[text.index("## Fine-tunes by their pretraining epochs"):]
    lines = [line for line in section.splitlines() if line.startswith("| s3rec")]
    assert lines == ["| s3rec | 150 | 0.5600 | 0.3733 | 0.3294 | 7 | ft-full |",
                     "| s3rec-lowrank r=4 | 10 | 0.5100 | 0.3400 | 0.3000 | 7 | ft-lr4-10 |",
                     "| s3rec-lowrank r=4 | 30 | 0.5300 | 0.3533 | 0.3118 | 7 | ft-lr4-30 |"]


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_written_files_honour_the_umask(tmp_path, mask):
    """Files written temp-then-rename get the mode a plain open() gives (not mkstemp's 0600)."""
    import os

    from s3rec.analysis.atomic import write_csv, write_text
    old = os.umask(mask)
    try:
        write_text(tmp_path / "report.md", "x")
        write_csv(tmp_path / "runs.csv", [{"a": 1}], ["a"])
        plain = tmp_path / "plain"
        plain.write_text("x")
    finally:
        os.umask(old)
    want = 0o666 & ~mask
    for name in ("report.md", "runs.csv", "plain"):
        assert (tmp_path / name).stat().st_mode & 0o777 == want, name


def test_rank_figure_keeps_grids_of_other_settings_apart(tmp_path, fabricated_grid,  # noqa: F811
                                                         monkeypatch):
    """Low-rank runs of two grids with other settings are two lines, not one pooled line."""
    from s3rec.analysis import figures
    from s3rec.analysis.read_runs import read_runs
    from tests.test_analysis_read import copy_lowrank_cell
    root, _ = fabricated_grid
    runs_dir = tmp_path / "runs"
    for rank in ("4", "8"):
        copy_lowrank_cell(root, runs_dir, "a", rank, 1)
        copy_lowrank_cell(root, runs_dir, "b", rank, 1, finetune_epochs=99)
    shown = []
    monkeypatch.setattr(figures, "_save", lambda fig, out, name: shown.append(fig) or name)
    figs, _ = figures.metric_vs_rank(read_runs(runs_dir), tmp_path / "out")
    assert len(figs) == 1
    labels = sorted(ln.get_label() for ln in shown[0].axes[0].get_lines())
    assert labels == ["s3rec-lowrank [a] (seeds r4: 1, r8: 1)",
                      "s3rec-lowrank [b] (seeds r4: 1, r8: 1)"]
