"""analysis.read_runs on the FABRICATED grid (tests/test_analysis_fixtures.py)."""
from __future__ import annotations

import json

import pytest

from s3rec.analysis.read_runs import RunFolderError, read_runs, runs_table, scalars_table
from tests.test_analysis_fixtures import FAILED, KILLED, fabricated_grid  # noqa: F401


@pytest.fixture(scope="module")
def table(fabricated_grid):  # noqa: F811
    root, truth = fabricated_grid
    runs = read_runs(root)
    rows, cols = runs_table(runs)
    return runs, rows, cols, truth


def _key(row):
    return (row["grid"], row["dataset"], row["variant"], row["rank"], row["seed"], row["stage"])


def test_every_stage_folder_is_a_row_and_none_is_dropped(table):
    runs, rows, cols, truth = table
    assert sorted(map(_key, rows)) == sorted(truth)
    assert len(set(cols)) == len(cols)


def test_statuses_mark_the_killed_and_the_failed_run(table):
    _, rows, _, _ = table
    status = {_key(r): r for r in rows}
    killed = status[KILLED + ("finetune",)]
    assert killed["status"] == "unfinished" and "running" in killed["notes"]
    assert killed["epochs_reached"] == 2 and "test_HR@10" not in killed
    failed = status[FAILED + ("pretrain",)]
    assert failed["status"] == "failed" and "fabricated failure" in failed["error"]
    others = [r for k, r in status.items() if k not in (KILLED + ("finetune",),
                                                        FAILED + ("pretrain",))]
    assert all(r["status"] == "done" for r in others)


def test_table_numbers_equal_what_the_runs_logged(table):
    _, rows, _, truth = table
    for row in rows:
        t = truth[_key(row)]
        assert row["params_total"] == t["params"]["total"]
        assert row["epochs_reached"] == t["epoch"]
        if row["stage"] == "finetune" and t["test"]:
            for m, v in t["test"].items():
                assert row[f"test_{m}"] == pytest.approx(v, rel=1e-12)  # from results.json
            assert row["best_epoch"] == t["best_epoch"] == 6
            assert row["wall_s"] == pytest.approx(t["seconds"])
        if row["stage"] == "pretrain":
            for tag, pts in t["logged"].items():
                # Event files store float32: equal to 1e-6 relative.
                assert row[f"last_loss_{tag[5:]}"] == pytest.approx(pts[-1][1], rel=1e-6)
            assert row["pretrain_params_total"] == t["params"]["total"]


def test_ablations_are_detected_from_the_pretraining_weights(table):
    _, rows, _, _ = table
    for row in rows:
        want = {"demo": "", "ablate-sp": "sp", "ablate-aap": "aap"}[row["grid"]]
        assert row["removed"] == want, row
        if want:
            assert row[f"w_{want}"] == 0.0 and row["arm"].endswith("w/o " + want.upper())


def test_scalars_table_holds_every_logged_point(table):
    runs, _, _, truth = table
    long = scalars_table(runs)
    key = ("demo", "Synth", "s3rec-lowrank", "4", 1, "pretrain")
    got = [(r["step"], r["value"]) for r in long
           if (r["grid"], r["dataset"], r["variant"], r["rank"], r["seed"], r["stage"]) == key
           and r["tag"] == "loss/aap"]
    want = truth[key]["logged"]["loss/aap"]
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)
    tags = {r["tag"] for r in long}
    assert {"loss/aap", "loss/total", "epoch/loss_mip", "valid/MRR", "test/HR@10",
            "loss/finetune", "perf/epoch_s", "train/lr"} <= tags


def test_no_sampling_limit_on_long_curves(tmp_path):
    """EventAccumulator keeps only a sample by default; every point must come back."""
    from torch.utils.tensorboard import SummaryWriter

    from s3rec.analysis.read_runs import read_scalars
    with SummaryWriter(str(tmp_path)) as tb:
        for step in range(12_000):
            tb.add_scalar("loss/mip", step * 0.5, step)
    pts = read_scalars(tmp_path)["loss/mip"]
    assert len(pts) == 12_000 and pts[-1][:2] == (11_999, 5999.5)


def test_path_and_run_json_disagreeing_is_an_error_naming_the_file(
        tmp_path, fabricated_grid):  # noqa: F811
    import shutil
    root, _ = fabricated_grid
    src = root / "demo" / "Synth" / "s3rec" / "rfull" / "s1" / "pretrain"
    dst = tmp_path / "g" / "Synth" / "s3rec" / "rfull" / "s7" / "pretrain"
    shutil.copytree(src, dst)
    with pytest.raises(RunFolderError, match=r"s7/pretrain/run.json.*seed=7.*seed=1"):
        read_runs(tmp_path)
    rj = json.loads((dst / "run.json").read_text())
    rj["seed"] = 7
    rj["config"]["seed"] = 7
    rj["status"] = "preempted"
    (dst / "run.json").write_text(json.dumps(rj))
    (row,) = [r for r in runs_table(read_runs(tmp_path))[0]]
    assert row["status"] == "unfinished" and "preempted" in row["notes"]
    rj["status"] = "exploded"
    (dst / "run.json").write_text(json.dumps(rj))
    with pytest.raises(RunFolderError, match="run.json.*'status'.*exploded"):
        read_runs(tmp_path)
    (dst / "run.json").write_text("{not json")
    with pytest.raises(RunFolderError, match="run.json: not valid JSON"):
        read_runs(tmp_path)


def test_a_resumed_run_reads_without_the_purged_steps(tmp_path, caplog):
    """The engine reopens its writer with purge_step on resume; the steps logged after the last
    checkpoint by the killed process must not appear twice. That drop is by design: TensorBoard's
    warning about "a TensorFlow restart" is not passed on; its other warnings are."""
    import logging

    from torch.utils.tensorboard import SummaryWriter

    from s3rec.analysis.read_runs import read_scalars
    with SummaryWriter(str(tmp_path)) as tb:          # first start, killed after step 9
        for step in range(10):
            tb.add_scalar("loss/total", 100.0 + step, step)
    with SummaryWriter(str(tmp_path), purge_step=6) as tb:   # resumed from step 6
        for step in range(6, 12):
            tb.add_scalar("loss/total", 200.0 + step, step)
    pts = read_scalars(tmp_path)["loss/total"]
    assert [p[0] for p in pts] == list(range(12))
    assert [p[1] for p in pts] == [100.0 + s for s in range(6)] + [200.0 + s for s in range(6, 12)]
    assert not [r for r in caplog.records if "TensorFlow restart" in r.getMessage()]
    tb_logger = logging.getLogger("tensorboard")
    assert not tb_logger.filters
    with caplog.at_level(logging.WARNING, logger="tensorboard"):
        tb_logger.warning("another warning")
    assert "another warning" in caplog.text


def test_same_arm_with_other_settings_in_another_grid_is_not_pooled(
        tmp_path, fabricated_grid):  # noqa: F811
    import shutil
    root, _ = fabricated_grid
    for grid in ("a", "b"):
        shutil.copytree(root / "demo" / "Synth" / "s3rec", tmp_path / grid / "Synth" / "s3rec")
    arms = {(r.grid, r.arm) for r in read_runs(tmp_path)}
    assert arms == {("a", "s3rec"), ("b", "s3rec")}          # same settings: one arm
    rj_path = tmp_path / "b" / "Synth" / "s3rec" / "rfull" / "s1" / "finetune" / "run.json"
    rj = json.loads(rj_path.read_text())
    rj["config"]["finetune"]["epochs"] = 99
    rj_path.write_text(json.dumps(rj))
    arms = {(r.grid, r.seed, r.stage, r.arm) for r in read_runs(tmp_path)}
    assert ("a", 1, "finetune", "s3rec [a]") in arms and ("a", 2, "finetune", "s3rec [a]") in arms
    # Grid b ran the arm with two settings: the suffix tells them apart (not pooled as seeds).
    b1, b2 = (next(a for g, s, st, a in arms if (g, s, st) == ("b", seed, "finetune"))
              for seed in (1, 2))
    assert b1 == "s3rec [b finetune.epochs=99]" and b2.startswith("s3rec [b finetune.epochs=")
    assert b1 != b2
    assert ("b", 1, "pretrain", "s3rec") in arms


def copy_lowrank_cell(src_root, dst_root, grid: str, rank: str, seed: int,
                      finetune_epochs: int | None = None) -> None:
    """A fabricated low-rank cell copied into grid `grid`, its settings changed if asked."""
    import shutil
    rel = ("Synth", "s3rec-lowrank", f"r{rank}", f"s{seed}")
    dst = dst_root.joinpath(grid, *rel)
    shutil.copytree(src_root.joinpath("demo", *rel), dst)
    if finetune_epochs is not None:
        for stage in ("pretrain", "finetune"):
            path = dst / stage / "run.json"
            rj = json.loads(path.read_text())
            rj["config"]["finetune"]["epochs"] = finetune_epochs
            path.write_text(json.dumps(rj))


def test_settings_differing_within_one_grid_are_not_pooled(tmp_path, fabricated_grid):  # noqa: F811
    root, _ = fabricated_grid
    copy_lowrank_cell(root, tmp_path, "g", "4", 1)
    copy_lowrank_cell(root, tmp_path, "g", "4", 2, finetune_epochs=99)
    runs = read_runs(tmp_path)
    arms = {(r.seed, r.stage): r.arm for r in runs}
    for stage in ("pretrain", "finetune"):
        one, two = arms[(1, stage)], arms[(2, stage)]
        assert one != two and one.startswith("s3rec-lowrank r=4 [g ") and "finetune.epochs=" in two
    assert "finetune.epochs=99" in arms[(2, "finetune")]
    # One setting per grid: the grid's name alone, as before.
    other = tmp_path / "two"
    copy_lowrank_cell(root, other, "a", "4", 1)
    copy_lowrank_cell(root, other, "b", "4", 2, finetune_epochs=99)
    assert {r.arm for r in read_runs(other)} == {"s3rec-lowrank r=4 [a]", "s3rec-lowrank r=4 [b]"}


def test_many_differing_settings_get_a_short_hash(tmp_path):
    from s3rec.analysis.read_runs import _settings_labels
    a = json.dumps({"x": 1, "y": 1, "z": 1, "w": 1})
    b = json.dumps({"x": 2, "y": 2, "z": 2, "w": 2})
    labels = _settings_labels([a, b])
    assert labels[a] != labels[b] and all(v.startswith("settings ") for v in labels.values())
    one, two = json.dumps({"p": {"e": 1}, "q": 0}), json.dumps({"p": {"e": 2}, "q": 0})
    assert _settings_labels([one, two]) == {one: "p.e=1", two: "p.e=2"}


def test_a_grid_line_stays_whole_when_another_grid_reran_one_of_its_ranks(
        tmp_path, fabricated_grid):  # noqa: F811
    """Grid a ran ranks 4 and 8; grid b ran rank 8 again with other settings. Grid a's two
    ranks are one line (both `[a]`), grid b's rank its own; before, a's rank 4 (one setting)
    kept the bare line name and a's rank 8 was drawn apart from it."""
    root, _ = fabricated_grid
    for rank in ("4", "8"):
        copy_lowrank_cell(root, tmp_path, "a", rank, 1)
    copy_lowrank_cell(root, tmp_path, "b", "8", 1, finetune_epochs=99)
    lines = {(r.grid, r.rank, r.stage): r.rank_line for r in read_runs(tmp_path)}
    for stage in ("pretrain", "finetune"):
        assert lines[("a", "4", stage)] == lines[("a", "8", stage)] == "s3rec-lowrank [a]"
        assert lines[("b", "8", stage)] == "s3rec-lowrank [b]"
    # The same settings in both grids: one line, seeds and ranks pooled, no suffix.
    same = tmp_path / "same"
    for grid, rank in (("a", "4"), ("a", "8"), ("b", "8")):
        copy_lowrank_cell(root, same, grid, rank, 1)
    assert {r.rank_line for r in read_runs(same)} == {"s3rec-lowrank"}


def test_runs_differing_only_in_logging_or_checkpointing_are_pooled(tmp_path, fabricated_grid):  # noqa: F811
    """`make demo` logs every 5 steps, configs/grids/demo.yaml every 50; the seeds of the two
    are one experiment (s3rec.config.NO_RESULT_KEYS), not two arms."""
    root, _ = fabricated_grid
    for seed in (1, 2):
        copy_lowrank_cell(root, tmp_path, "g", "4", seed)
    path = tmp_path / "g" / "Synth" / "s3rec-lowrank" / "r4" / "s2" / "finetune" / "run.json"
    rj = json.loads(path.read_text())
    rj["config"]["logging"]["every_steps"] += 7
    rj["config"]["checkpoint"]["keep_last"] += 1
    rj["config"]["finetune"]["eval_batch_size"] += 1
    path.write_text(json.dumps(rj))
    assert {r.arm for r in read_runs(tmp_path)} == {"s3rec-lowrank r=4"}
