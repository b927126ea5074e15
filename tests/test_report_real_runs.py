"""s3rec-report on REAL run folders: a tiny grid trained by s3rec-pretrain / s3rec-finetune
(synthetic data, configs/tiny.yaml), laid out as the grid launcher lays it out. The report's
table numbers must equal what the runs wrote (results.json), and scalars.csv must hold exactly
the points an independent reader (TensorBoard's raw event_file_loader) finds. About a minute."""
from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
CELLS = [("s3rec", None), ("s3rec-lowrank", 4)]


def _run(cmd: list[str], cwd: Path) -> None:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"


def _raw_scalars(folder: Path) -> list[tuple[str, int, float]]:
    """Every scalar of the event files in `folder`, read without EventAccumulator."""
    from tensorboard.backend.event_processing import event_file_loader
    from tensorboard.util import tensor_util
    out = []
    for f in sorted(folder.glob("events.out.tfevents.*")):
        for ev in event_file_loader.EventFileLoader(str(f)).Load():
            for v in ev.summary.value:
                if v.metadata.plugin_data.plugin_name == "scalars":
                    out.append((v.tag, ev.step, float(tensor_util.make_ndarray(v.tensor))))
    return out


def _start_and_kill_a_finetune(data: Path, runs: Path, over: list[str], cwd: Path) -> Path:
    """A real fine-tune (no pretraining, many epochs) killed with SIGKILL once its first
    validation is logged: its run.json still says running and it has no results.json."""
    import os
    import signal
    import time
    folder = runs / "synth" / "finetune-only" / "rfull" / "s1" / "finetune"
    proc = subprocess.Popen(["s3rec-finetune", "--data", str(data), "--out", str(folder),
                             "--config", str(TINY), "variant=finetune-only", "seed=1",
                             "finetune.epochs=500", "finetune.patience=500"], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            rj = folder / "run.json"
            if rj.exists() and json.loads(rj.read_text()).get("epoch", 0) >= 1:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the fine-tune to kill ended by itself"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert json.loads((folder / "run.json").read_text())["status"] == "running"
    assert not (folder / "results.json").exists()
    return folder


@pytest.mark.slow
def test_report_on_a_real_tiny_grid(tmp_path):
    data = tmp_path / "data" / "synth"
    _run(["s3rec-prep", "synthetic", "--users", "120", "--items", "120", "--attributes", "10",
          "--out", str(data), "--seed", "5"], tmp_path)
    runs = tmp_path / "runs" / "tiny"
    over = ["pretrain.epochs=1", "pretrain.save_epochs=[]", "finetune.epochs=2", "seed=1"]
    for variant, rank in CELLS:
        cell = runs / "synth" / variant / f"r{rank or 'full'}" / "s1"
        extra = [f"variant={variant}"] + ([f"model.head_rank={rank}"] if rank else [])
        _run(["s3rec-pretrain", "--data", str(data), "--out", str(cell / "pretrain"),
              "--config", str(TINY), *over, *extra], tmp_path)
        _run(["s3rec-finetune", "--data", str(data), "--out", str(cell / "finetune"),
              "--init", str(cell / "pretrain" / "final.pt"), "--config", str(TINY), *over,
              *extra], tmp_path)
    killed = _start_and_kill_a_finetune(data, runs, over, tmp_path)
    out = tmp_path / "report"
    _run(["s3rec-report", str(runs), "--out", str(out)], tmp_path)

    with open(out / "runs.csv", newline="") as f:
        every = list(csv.DictReader(f))
    dead = [r for r in every if Path(r["path"]) == killed]
    assert len(dead) == 1 and dead[0]["status"] == "unfinished"      # killed -9: never dropped
    text = (out / "report.md").read_text()
    assert "finetune-only" in text and "unfinished" in text       # listed, with its state
    rows = [r for r in every if Path(r["path"]) != killed]
    assert len(rows) == 4 and {r["status"] for r in rows} == {"done"}
    for row in rows:
        folder = Path(row["path"])
        assert (row["grid"], row["dataset"]) == ("tiny", "synth")
        rj = json.loads((folder / "run.json").read_text())
        assert int(row["params_total"]) == rj["params"]["total"]
        assert int(row["epochs_reached"]) == rj["epoch"]
        if row["stage"] == "finetune":
            res = json.loads((folder / "results.json").read_text())
            assert int(row["best_epoch"]) == res["best_epoch"]
            for m, v in res["test"].items():
                assert float(row[f"test_{m}"]) == v
    with open(out / "scalars.csv", newline="") as f:
        scal = list(csv.DictReader(f))
    for row in rows:
        mine = sorted((s["tag"], int(s["step"]), float(s["value"])) for s in scal
                      if (s["variant"], s["rank"], s["stage"]) ==
                      (row["variant"], row["rank"], row["stage"]))
        assert mine == sorted(_raw_scalars(Path(row["path"]))) and mine
    text = (out / "report.md").read_text()
    assert "figures/metric_vs_rank_synth_sampled-99.png" in text
    assert "Checkpoint: `" in text and "rfull/s1/pretrain/final.pt" in text
    for png in (out / "figures").glob("*.png"):
        assert png.read_bytes()[:4] == b"\x89PNG"
