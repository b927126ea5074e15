"""Grid and launcher safety: values that would rewrite a job script, commands printed so that
they paste back exactly, --dry-run making the checks of a launch, a lone run's rendezvous on
loopback, and cancel checking that what it stopped has ended.

Real processes throughout: submitit's local controller, Python processes that trap signals,
bash sourcing slurm/common.sh. SLURM itself cannot run here: its squeue/scancel are small
scripts on PATH (the tests say `fake_slurm`).
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from s3rec.launch import grid_cli, job as job_mod, runner, slurm_state
from s3rec.launch.grid import load_grid
from tests.train_helpers import REPO, TINY, clean_env


@pytest.fixture
def grid_yaml(tmp_path):
    """A one-cell local grid file over a dataset folder that exists; returns a factory."""
    data = tmp_path / "beauty"
    data.mkdir()
    (data / "manifest.json").write_text("{}")

    def make(executor: dict | None = None, **keys) -> Path:
        grid = {"name": "g", "data": [str(data)], "variants": ["finetune-only"], "seeds": [1],
                "out": str(tmp_path / "runs"), "overrides": {"finetune.epochs": 1},
                "executor": {"kind": "local", "array_parallelism": 1, "timeout_min": 30,
                             **(executor or {})}, **keys}
        path = tmp_path / "grid.yaml"
        path.write_text(json.dumps(grid))
        return path
    return make


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = grid_cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- 6. values that reach a script

@pytest.mark.parametrize("executor,key", [
    ({"partition": "debug\nrm -rf x #"}, "executor.partition"),
    ({"account": "proj\r#SBATCH --qos=high"}, "executor.account"),
    ({"qos": "normal\x00"}, "executor.qos"),
    ({"additional": {"constraint": "a100\ntouch pwned"}}, "executor.additional.constraint"),
    ({"additional": {"comment": "x\x1b[2K"}}, "executor.additional.comment"),
    ({"additional": {"gres\nrm -rf x #": "gpu:1"}}, "executor.additional"),
    ({"additional": {"gres": ["gpu:1"]}}, "executor.additional.gres"),
])
@pytest.mark.parametrize("dry_run", [False, True])
def test_control_characters_in_executor_values_are_refused(grid_yaml, tmp_path, capsys,
                                                           executor, key, dry_run):
    path = grid_yaml({"kind": "slurm", "signal_delay_s": 60, **executor})
    code, out, err = cli([str(path)] + ["--dry-run"] * dry_run, capsys)
    assert code == 2 and out == ""
    assert err.startswith(f"s3rec-grid: {path}: key '{key}'") and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()        # nothing written to the grid folder


@pytest.mark.parametrize("keys,key", [({"out": "runs\n#SBATCH --x"}, "out"),
                                      ({"data": ["beauty\rx"]}, "data[0]")])
def test_control_characters_in_paths_are_refused(grid_yaml, tmp_path, capsys, keys, key):
    path = grid_yaml(**keys)
    code, _, err = cli([str(path), "--dry-run"], capsys)
    assert code == 2 and f"key '{key}': control character" in err


def test_plain_sbatch_options_still_pass(grid_yaml):
    grid = load_grid(grid_yaml({"kind": "slurm", "signal_delay_s": 60, "partition": "gpu",
                                "additional": {"gres": "gpu:1", "exclusive": True,
                                               "nice": 10}}))
    assert grid.executor.additional["gres"] == "gpu:1"


# ---------------------------------------------------------------- 9. commands that paste back

HOSTILE = "it's a $(touch marker) x"


def _hostile_config(tmp_path: Path) -> Path:
    folder = tmp_path / "con fig"
    folder.mkdir()
    config = folder / f"{HOSTILE}.yaml"
    shutil.copy(TINY, config)
    return config


def _runs_in_bash_without_side_effect(line: str, cwd: Path) -> None:
    """bash expands the printed line as it would when pasted; nothing in it may run."""
    subprocess.run(["bash", "-c", f"true {line}"], cwd=cwd, check=True)
    assert not (cwd / "marker").exists()


def test_dry_run_prints_commands_that_paste_back(grid_yaml, tmp_path, capsys):
    path = grid_yaml(config=str(_hostile_config(tmp_path)))
    code, out, _ = cli([str(path), "--dry-run"], capsys)
    assert code == 0
    printed = [ln.strip() for ln in out.splitlines() if ln.startswith("    ")]
    expected = [c.commands()[1][0] for c in load_grid(path).cells()]
    assert [shlex.split(ln) for ln in printed] == expected
    for ln in printed:
        _runs_in_bash_without_side_effect(ln, tmp_path)


def test_cell_job_logs_its_commands_quoted(tmp_path, capsys):
    cmd = [sys.executable, "-c", "pass", HOSTILE, "a  b"]
    with pytest.raises(job_mod.StageFailed):     # no run.json: the stage did not finish
        job_mod.CellsJob([job_mod.chain_spec("k", [("finetune", cmd, tmp_path)])])()
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[k] $ "))
    assert shlex.split(line[len("[k] $ "):]) == cmd
    _runs_in_bash_without_side_effect(line[len("[k] $ "):], tmp_path)


def test_sbatch_log_line_is_quoted(tmp_path):
    """run_stage (slurm/common.sh) prints the srun command it runs; srun is a shell function
    here, which the batch shell calls as it would the real one."""
    args = ["s3rec-pretrain", "--out", str(tmp_path / "r un"), HOSTILE]
    script = (f"source {shlex.quote(str(REPO / 'slurm' / 'common.sh'))}\n"
              "srun() { :; }\n"
              f"run_stage {shlex.quote(str(tmp_path / 'run'))} final.pt {shlex.join(args)}\n")
    res = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         env=clean_env(), timeout=30)
    line = next(ln for ln in res.stdout.splitlines() if "[s3rec] job" in ln)
    command = line.split(" $ ", 1)[1]
    assert shlex.split(command) == ["srun", "--kill-on-bad-exit=1", *args]
    _runs_in_bash_without_side_effect(command, tmp_path)


def _lock_held(path: Path):
    held = runner.GridRun(load_grid(path))
    held._take_lock()
    return held


@pytest.mark.parametrize("fault", ["missing dataset", "no sbatch", "launch running"])
def test_dry_run_makes_the_checks_of_a_launch(grid_yaml, tmp_path, monkeypatch, capsys, fault):
    path = grid_yaml()
    held = None
    if fault == "missing dataset":
        (tmp_path / "beauty" / "manifest.json").unlink()
    elif fault == "no sbatch":
        path = grid_yaml({"kind": "slurm", "signal_delay_s": 60})
        monkeypatch.setattr(runner.shutil, "which",
                            lambda name: None if name in ("sbatch", "srun") else f"/bin/{name}")
    else:
        held = _lock_held(path)
    try:
        dry = cli([str(path), "--dry-run"], capsys)
        launch = cli([str(path)], capsys)
    finally:
        if held is not None:
            held.release()
    assert dry[0] == launch[0] == 2 and dry[1] == launch[1] == ""
    assert dry[2] == launch[2] and len(dry[2].splitlines()) == 1


def test_lone_run_listens_on_loopback_only():
    """The process group of a one-process run: every listening socket on loopback."""
    probe = ("import json, psutil\n"
             "from s3rec import distributed\n"
             "distributed.setup()\n"
             "print(json.dumps([c.laddr.ip for c in psutil.Process().net_connections('inet')"
             " if c.status == psutil.CONN_LISTEN]))\n")
    env = clean_env()
    env.pop("GLOO_SOCKET_IFNAME")    # whatever the caller chose, a lone run stays on loopback
    res = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    ips = json.loads(res.stdout.strip().splitlines()[-1])
    assert all(ip in ("127.0.0.1", "::1") for ip in ips), ips


# ---------------------------------------------------------------- 10. cancel checks it stopped

def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _running(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those not ended (a zombie has: only its exit status waits to be read)."""
    out = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


def _sigint_ignored(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(next(ln for ln in status.splitlines() if ln.startswith("SigIgn:")).split()[1], 16)
    return bool(mask & (1 << (signal.SIGINT - 1)))


def test_cancel_stops_a_local_grid_launched_with_sigint_ignored(grid_yaml, monkeypatch, capsys):
    """As under `nohup s3rec-grid ... &`: the controller must still stop on cancel's SIGINT."""
    path = grid_yaml()
    grid = load_grid(path)
    monkeypatch.setattr(runner, "make_job", lambda cells, exes: job_mod.CellsJob([
        job_mod.chain_spec(c.key, [("finetune", [sys.executable, "-c", "import time; "
                                                 "time.sleep(120)"], c.finetune_dir)])
        for c in cells]))
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        run_ = runner.launch_grid(grid)
    finally:
        signal.signal(signal.SIGINT, previous)
    ctl = int(run_.registry[grid.cells()[0].key]["job_id"])
    try:
        deadline = time.monotonic() + 60
        while len(_running(_tree(ctl))) < 3:     # controller, its task, the task's training child
            assert time.monotonic() < deadline, "the cell's job never started its child"
            time.sleep(0.2)
        tree = _tree(ctl)
        assert not any(_sigint_ignored(p.pid) for p in tree)
        run_.release()                           # as when the launch has gone
        code, out, err = cli(["cancel", str(path)], capsys)
        assert code == 0 and "cancelled the jobs of grid g" in out
        assert "ended on" not in err             # SIGINT was enough
        assert _running(tree) == []
    finally:
        for p in _running(_tree(ctl)) if psutil.pid_exists(ctl) else []:
            p.kill()


STUBBORN = """
import signal, subprocess, sys, time
for s in {signals}:
    signal.signal(s, signal.SIG_IGN)
if sys.argv[1] == "parent":
    subprocess.Popen([sys.executable, __file__, "child"])
time.sleep(120)
"""


@pytest.mark.parametrize("ignores,ends_on", [(("SIGINT",), "SIGTERM"),
                                              (("SIGINT", "SIGTERM"), "SIGKILL")])
def test_cancel_escalates_on_a_job_that_ignores_its_signals(grid_yaml, tmp_path, monkeypatch,
                                                            capsys, ignores, ends_on):
    """A controller (and its child) trapping the signals: cancel goes on to the next one, kills
    the orphan too, and says what it took."""
    path = grid_yaml()
    grid = load_grid(path)
    folder = grid.out_path / "_submitit"
    script = tmp_path / "stubborn.py"
    script.write_text(STUBBORN.format(signals="[" + ", ".join(f"signal.{s}" for s in ignores)
                                      + "]"))
    ctl = subprocess.Popen([sys.executable, str(script), "parent", "-m",
                            "submitit.local._local", str(folder)], start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while len(_running(_tree(ctl.pid))) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        tree = _tree(ctl.pid)
        entry = {"executor": "local", "job_id": str(ctl.pid), "folder": str(folder),
                 "submitted": "then"}
        registry = grid.out_path / "_grid" / "jobs.json"
        registry.parent.mkdir(parents=True)
        registry.write_text(json.dumps({grid.cells()[0].key: entry}))
        monkeypatch.setattr(slurm_state, "STOP_WAIT_S", 1.0, raising=False)
        code, out, err = cli(["cancel", str(path)], capsys)
        assert code == 0 and "cancelled" in out
        assert f"local job {ctl.pid} ended on {ends_on}" in err
        assert _running(tree) == []
    finally:
        for p in _running(_tree(ctl.pid)) if psutil.pid_exists(ctl.pid) else []:
            p.kill()
        ctl.wait()


def _fake_slurm(tmp_path: Path, monkeypatch, scancel: str, squeue: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("scancel", scancel), ("squeue", squeue)):
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(slurm_state, "STOP_WAIT_S", 1.5, raising=False)
    monkeypatch.setattr(slurm_state, "SLURM_CANCEL_WAIT_S", 1.5)


@pytest.mark.parametrize("obeys", [True, False])
def test_fake_slurm_cancel_reports_a_job_still_queued(grid_yaml, tmp_path, monkeypatch, capsys,
                                                      obeys):
    path = grid_yaml({"kind": "slurm", "signal_delay_s": 60})
    grid = load_grid(path)
    gone = tmp_path / "cancelled"
    scancel = f"touch {gone}\n" if obeys else "exit 0\n"
    squeue = f'[ -e {gone} ] || echo "77 RUNNING"\n'
    _fake_slurm(tmp_path, monkeypatch, scancel, squeue)
    registry = grid.out_path / "_grid" / "jobs.json"
    registry.parent.mkdir(parents=True)
    registry.write_text(json.dumps({grid.cells()[0].key: {
        "executor": "slurm", "job_id": "77", "folder": str(tmp_path), "submitted": "then"}}))
    code, out, err = cli(["cancel", str(path)], capsys)
    if obeys:
        assert code == 0 and "cancelled" in out
    else:
        assert code == 1 and "cancelled the jobs" not in out
        assert "SLURM job 77: still RUNNING" in err
