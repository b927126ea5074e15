"""`executor.cells_per_job`: several cells side by side in one job, on the real local SLURM
cluster (and the local executor's throttle), with the real training commands."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
import submitit
import torch
import yaml
from submitit.core.utils import JobPaths

from s3rec.launch import grid_cli
from s3rec.launch.grid import Grid
from s3rec.launch.job import CellsJob, StageFailed, chain_spec
from s3rec.launch.runner import (cell_error_line, launch_grid, open_grid, packs,
                                 resolve_commands)
from tests.cluster_fixtures import (TINY, cluster, final_metrics, local_run,  # noqa: F401
                                    preempt_both_nodes, run_json, seconds_per_epoch, tiny_data)


def packed_grid(tmp_path, data, name, seeds, overrides=None, **executor) -> dict:
    """s3rec cells, one per seed, two to a job on SLURM."""
    return dict(name=name, data=[str(data)], variants=["s3rec"], seeds=seeds, config=str(TINY),
                overrides=overrides or {"pretrain.epochs": 1, "finetune.epochs": 2},
                executor={"kind": "slurm", "cells_per_job": 2, "array_parallelism": 2,
                          "timeout_min": 10, **executor},
                out=str(tmp_path / "runs"))


def write_yaml(tmp_path, spec) -> str:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def jobs_of(registry: dict) -> dict[str, list[str]]:
    """job id -> the cell keys jobs.json points at it."""
    out = defaultdict(list)
    for key, entry in registry.items():
        out[entry["job_id"]].append(key)
    return {j: sorted(keys) for j, keys in out.items()}


def job_log(entry: dict) -> str:
    """A job's stdout and stderr (submitit's lines, the trainings' lines prefixed with their
    cell's key), as far as written."""
    paths = JobPaths(entry["folder"], job_id=entry["job_id"], task_id=0)
    return "".join(p.read_text() for p in (paths.stdout, paths.stderr) if p.exists())


def reference_runs(data, out, cells) -> threading.Thread:
    """The same cells, one after the other as plain processes (unpacked, uninterrupted), into
    out/<seed>/; started now, in the background."""
    def run():
        for c in cells:
            local_run(data, out / str(c.seed), pretrain_args=c.override_args(),
                      finetune_args=c.override_args())
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def launch_long_pack(tmp_path, data, name, min_epochs, **executor):
    """Two cells packed into one SLURM job, each pretraining for about 40 s here and now (at
    least `min_epochs`), and their unpacked references started beside them (into ref/):
    (run, the two keys, the job's registry entry, the references' thread)."""
    epochs = min(3000, max(min_epochs, int(40 / seconds_per_epoch(data, tmp_path)) + 1))
    spec = packed_grid(tmp_path, data, name, [1, 2],
                       overrides={"pretrain.epochs": epochs, "pretrain.save_epochs": [],
                                  "finetune.epochs": 2}, **executor)
    run = launch_grid(Grid(**spec))
    keys = [c.key for c in run.cells]
    entry = run.registry[keys[0]]
    assert jobs_of(run.registry) == {entry["job_id"]: keys}
    return run, keys, entry, reference_runs(data, tmp_path / "ref", run.cells)


def assert_both_resumed_as_their_references(run, text, ref) -> None:
    """Each cell of the job resumed its pretraining and ends exactly as its unpacked,
    uninterrupted reference in ref/<seed>/: bit-identical weights, equal test metrics."""
    for c in run.cells:
        assert re.search(rf"^\[{re.escape(c.key)}\] .*resumed from", text, re.M), text[-3000:]
        assert run_json(c.pretrain_dir)["starts"] >= 2 and run_json(c.finetune_dir)["starts"] == 1
        a, b = (torch.load(d / "final.pt", map_location="cpu", weights_only=True)["model"]
                for d in (c.pretrain_dir, ref / str(c.seed) / "pretrain"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert final_metrics(c.finetune_dir) == final_metrics(ref / str(c.seed) / "finetune")


# ---------------------------------------------------------------------- unit

def test_packs_keep_grid_order_and_a_relaunch_packs_only_unfinished_cells(tmp_path):
    spec = packed_grid(tmp_path, tmp_path / "data", "packs", [1, 2, 3, 4, 5])
    grid = Grid(**spec)
    cells = grid.cells()
    assert [[c.seed for c in p] for p in packs(cells, 2)] == [[1, 2], [3, 4], [5]]
    assert [[c.seed for c in p] for p in packs(cells, 1)] == [[1], [2], [3], [4], [5]]
    assert [[c.seed for c in p] for p in packs(cells, 9)] == [[1, 2, 3, 4, 5]]
    # cell s2 done (run.json "done" and its product): a relaunch packs the other four
    done = cells[1]
    for d, product in ((done.pretrain_dir, "final.pt"), (done.finetune_dir, "results.json")):
        d.mkdir(parents=True)
        (d / "run.json").write_text(json.dumps({"status": "done"}))
        (d / product).write_text("{}")
    run = open_grid(Grid(**spec))
    todo = run._cells_to_submit()
    assert run.skipped == {done.key: "done"}
    assert [[c.seed for c in p] for p in packs(todo, 2)] == [[1, 3], [4, 5]]


def test_a_job_unpickles_without_torch_so_its_signal_handler_comes_early(tmp_path):
    """submitit installs the job's USR2 handler only once it has unpickled the job: importing
    torch there (through s3rec.launch's package imports) took seconds, and a time-limit signal
    in that window killed the job (FAILED, no requeue) instead of requeueing it."""
    path = tmp_path / "job.pkl"
    submitit.helpers.DelayedSubmission(CellsJob([chain_spec("a/s1", [])])).dump(path)
    code = ("import sys; from submitit.core.utils import DelayedSubmission; "
            f"job = DelayedSubmission.load({str(path)!r}).function; "
            "print(type(job).__name__, job.keys, "
            "sorted({'torch', 'deepspeed'} & set(sys.modules)))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[0] == "CellsJob a/s1 []"


def test_each_failed_cell_of_a_packed_job_has_its_own_whole_error(tmp_path, capfd):
    """Two cells of one job fail with long errors: the job's StageFailed joins both, far past
    what one status line shows; each cell's status reads the cell's own line, whole."""
    errors = {"a/s1": "ConfigError: " + "first " * 80 + "end",
              "a/s2": "DatasetError: " + "second " * 80 + "end"}
    chains = []
    for key, error in errors.items():
        d = tmp_path / key.replace("/", "-")
        write = (f"import json, pathlib, sys; p = pathlib.Path({str(d)!r}); p.mkdir(); "
                 f"(p / 'run.json').write_text(json.dumps({{'stage': 'pretrain', "
                 f"'status': 'failed', 'error': {error!r}}})); sys.exit(2)")
        chains.append(chain_spec(key, [("pretrain", [sys.executable, "-c", write], str(d))]))
    with pytest.raises(StageFailed) as raised:
        CellsJob(chains)()
    assert len(str(raised.value)) > 600
    log = tmp_path / "job.err"
    log.write_text(capfd.readouterr().err + f"StageFailed: {raised.value}\n")
    for key, error in errors.items():
        assert cell_error_line(log, key) == \
            f"StageFailed: {key}: {Path(sys.executable).name} exited with 2: {error}"
    assert cell_error_line(log, "a/s3") is None


@pytest.mark.multiproc
def test_local_throttle_counts_jobs_not_cells(tiny_data, tmp_path):
    """array_parallelism 2 with two cells a job: two jobs (four cells) at once; the third job
    waits for a free slot (a throttle counting cells would have started one job only)."""
    spec = dict(name="throttle", data=[str(tiny_data)], variants=["finetune-only"],
                seeds=[1, 2, 3, 4, 5], config=str(TINY), overrides={"finetune.epochs": 1},
                executor={"kind": "local", "cells_per_job": 2, "array_parallelism": 2,
                          "timeout_min": 10},
                out=str(tmp_path / "runs"))
    run = launch_grid(Grid(**spec))
    try:
        assert len(run.submitted) == 4 and len(jobs_of(run.registry)) == 2
        assert [[c.seed for c in p] for p in run.waiting] == [[5]]
        most_jobs, most_cells = 0, 0

        def watch(states):
            nonlocal most_jobs, most_cells
            running = [k for k, s in states.items() if s.state == "running"]
            most_cells = max(most_cells, len(running))
            most_jobs = max(most_jobs, len({run.registry[k]["job_id"] for k in running}))

        states = run.wait(poll_s=0.5, timeout_s=300, on_change=watch)
    finally:
        run.cancel()
    assert all(s.state == "done" for s in states.values()), states
    assert len(jobs_of(run.registry)) == 3 and most_jobs <= 2 and most_cells == 4


# ---------------------------------------------------------------------- SLURM

@pytest.mark.cluster
@pytest.mark.multiproc
def test_four_cells_two_to_a_job_run_as_an_array_of_two(cluster, tiny_data, tmp_path):
    spec = packed_grid(tmp_path, tiny_data, "pack4", [1, 2, 3, 4])
    run = launch_grid(Grid(**spec))
    keys = [c.key for c in run.cells]
    assert run.submitted == keys
    sub = list((tmp_path / "runs" / "_submitit").glob("*_submission.sh"))
    assert len(sub) == 1 and "#SBATCH --array=0-1%2" in sub[0].read_text()
    registry = json.loads((tmp_path / "runs" / "_grid" / "jobs.json").read_text())
    pairs = jobs_of(registry)
    assert sorted(pairs.values()) == [keys[:2], keys[2:]], pairs
    assert all(registry[k]["cells"] == sorted(pairs[registry[k]["job_id"]]) for k in keys)
    states = run.wait(poll_s=1, timeout_s=400)
    assert all(s.state == "done" for s in states.values()), states
    for c in run.cells:
        res = json.loads((c.finetune_dir / "results.json").read_text())
        assert res["seed"] == c.seed and 0 <= res["test"]["HR@10"] <= 1
    # each job ran its two cells side by side: both keys prefix its training's lines
    for job_id, pair in pairs.items():
        text = job_log(registry[pair[0]])
        for key in pair:
            assert re.search(rf"^\[{re.escape(key)}\] .*epoch 1/", text, re.M), text[-2000:]


def pretrain_alone(cell) -> None:
    """The cell's own pretraining command, run here before the grid is launched."""
    pre, _ = cell.commands(*resolve_commands())
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    res = subprocess.run(pre, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.cluster
@pytest.mark.multiproc
def test_a_failing_cell_leaves_its_partner_done_and_a_relaunch_runs_it_alone(
        cluster, tiny_data, tmp_path, capsys):
    """s2's pretraining is done but its final.pt damaged: its fine-tune fails at --init, while
    s1, in the same job, trains to the end exactly as it does unpacked."""
    spec = packed_grid(tmp_path, tiny_data, "packfail", [1, 2])
    good, bad = Grid(**spec).cells()
    pretrain_alone(bad)
    (bad.pretrain_dir / "final.pt").write_bytes(b"not a checkpoint")
    reference = reference_runs(tiny_data, tmp_path / "ref", [good])
    run = launch_grid(Grid(**spec))
    assert run.submitted == [good.key, bad.key] and len(jobs_of(run.registry)) == 1
    first_job = run.registry[bad.key]["job_id"]
    states = run.wait(poll_s=1, timeout_s=400)
    reference.join(timeout=400)
    assert states[good.key].state == "done", states[good.key]
    assert states[bad.key].state == "failed", states[bad.key]
    assert first_job in states[bad.key].detail and "StageFailed" in states[bad.key].detail
    assert f"{bad.key}: s3rec-finetune exited with 2: CheckpointError: model file " \
        f"{bad.pretrain_dir}/final.pt: damaged or truncated" in states[bad.key].detail
    log = job_log(run.registry[bad.key])
    assert f"(done in the same job: {good.key})" in log, log[-2000:]
    mine = json.loads((good.finetune_dir / "results.json").read_text())
    theirs = json.loads((tmp_path / "ref" / "1" / "finetune" / "results.json").read_text())
    assert mine == theirs
    # a fresh process sees the same through the CLI
    path = write_yaml(tmp_path, spec)
    capsys.readouterr()
    assert grid_cli.main(["status", path]) == 1
    out = capsys.readouterr().out
    assert "done=1" in out and "failed=1" in out and "final.pt" in out, out

    # repaired (the damaged pretraining removed): the relaunch submits the failed cell alone
    shutil.rmtree(bad.pretrain_dir)
    again = launch_grid(Grid(**spec))
    assert again.submitted == [bad.key] and again.skipped == {good.key: "done"}
    assert again.registry[bad.key]["job_id"] != first_job
    assert again.registry[bad.key]["cells"] == [bad.key]
    assert again.registry[good.key]["job_id"] == first_job
    states = again.wait(poll_s=1, timeout_s=400)
    assert all(s.state == "done" for s in states.values()), states
    assert json.loads((good.finetune_dir / "results.json").read_text()) == mine


@pytest.mark.cluster
@pytest.mark.multiproc
@pytest.mark.slow
def test_packed_job_past_its_time_limit_requeues_and_both_cells_resume(cluster, tiny_data,
                                                                       tmp_path):
    """submitit's USR2 (signal_delay_s before timeout_min) reaches both trainings of the job
    mid-pretraining; each saves, CellsJob.checkpoint waits for both and requeues the job, and
    both resume from latest and end exactly as uninterrupted unpacked runs. (Sized as in
    test_grid_slurm, the time limit lifted after the first requeue; the USR2 comes 10 to 40 s
    into the job: pretrainings of 40 s alone, slower side by side and beside the reference.)"""
    run, keys, entry, reference = launch_long_pack(tmp_path, tiny_data, "packtime", 5,
                                                   timeout_min=1, signal_delay_s=50)
    t0 = time.time()
    try:
        def saved_and_requeued() -> bool:
            text = job_log(entry)
            return "Requeued job" in text and all(
                re.search(rf"^\[{re.escape(k)}\] .*checkpoint saved at step", text, re.M)
                for k in keys)
        while not saved_and_requeued():
            st = run.states()
            assert not any(s.state in ("done", "failed") for s in st.values()) \
                and time.time() - t0 < 150, f"no time-limit requeue of both cells: {st}"
            time.sleep(1)
        subprocess.run(["scontrol", "update", f"JobId={entry['job_id']}", "TimeLimit=30"],
                       env=cluster, check=True)
        states = run.wait(poll_s=1, timeout_s=600)
        reference.join(timeout=600)
    except BaseException:
        run.cancel()    # not once done: its scancel would hit a training as it exits
        raise
    assert all(s.state == "done" for s in states.values()), states
    text = job_log(entry)
    assert "Caught signal SIGUSR2" in text, text[-3000:]
    assert_both_resumed_as_their_references(run, text, tmp_path / "ref")


@pytest.mark.cluster
@pytest.mark.multiproc
@pytest.mark.slow
def test_packed_job_preempted_by_slurm_requeues_once_and_both_cells_resume(cluster, tiny_data,
                                                                          tmp_path):
    """SLURM's own preemption (PreemptMode=REQUEUE, the debug partition's GraceTime of 60 s):
    SIGTERM reaches both trainings of a packed job at once, each saves and exits, and the job
    requeues itself once for both (requeue_slurm_job with the two keys). Both resume from
    latest and end exactly as uninterrupted unpacked runs. Pretrainings of >= 40 epochs, about
    40 s alone here: the preemption lands at epoch 3, long before either ends."""
    run, keys, entry, reference = launch_long_pack(tmp_path, tiny_data, "packpreempt", 40)
    t0 = time.time()
    try:
        while not all(re.search(rf"^\[{re.escape(k)}\] \[pretrain\] epoch 3/", job_log(entry),
                                re.M) for k in keys):
            st = run.states()
            assert not any(s.state in ("done", "failed") for s in st.values()) \
                and time.time() - t0 < 300, f"both pretrainings never reached epoch 3: {st}"
            time.sleep(0.5)
        preempt_both_nodes(cluster, tmp_path)
        states = run.wait(poll_s=1, timeout_s=600)
        reference.join(timeout=600)
    except BaseException:
        run.cancel()
        raise
    assert all(s.state == "done" for s in states.values()), states
    text = job_log(entry)
    assert "Bypassing signal SIGTERM" in text, text[-3000:]
    for k in keys:
        assert re.search(rf"^\[{re.escape(k)}\] .*received here: SIGTERM", text, re.M), \
            text[-3000:]
    # one requeue, by the job for both cells, not one per cell
    requeues = re.findall(r"^\[(.*)\] training saved a checkpoint on SLURM's signal "
                          r"\(preemption\); requeueing job", text, re.M)
    assert requeues == [", ".join(keys)], text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert_both_resumed_as_their_references(run, text, tmp_path / "ref")
