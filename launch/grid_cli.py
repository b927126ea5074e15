"""`s3rec-grid`: run a grid of S3Rec cells locally or on SLURM, and follow it.

    s3rec-grid GRID.yaml [--executor local|slurm] [--dry-run] [--no-wait]
    s3rec-grid status GRID.yaml [--watch [SECONDS]]
    s3rec-grid cancel GRID.yaml
    s3rec-grid --demo --out DIR [--executor local|slurm]

Launching again is safe: finished cells are skipped, queued ones left alone, the rest resubmitted
(their training resumes from checkpoints/latest). Exit status of a launch that waits: 0 when
every cell is done, 1 when a cell failed, 2 for a bad grid file (130 interrupted); `--no-wait`
(slurm): 0 once submitted; `status`: 1 if a cell failed, else 0 (also while cells still run).
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time

from s3rec.launch.grid import Grid, GridError, load_grid
from s3rec.launch.runner import GridRun, format_states, is_active, launch_grid, open_grid


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="s3rec-grid", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("args", nargs="*", help="GRID.yaml, or: status GRID.yaml, cancel GRID.yaml")
    p.add_argument("--executor", choices=("local", "slurm"), help="overrides executor.kind")
    p.add_argument("--dry-run", action="store_true",
                   help="make every check of a launch, then list the cells and their commands")
    p.add_argument("--no-wait", action="store_true", help="submit and return (slurm)")
    p.add_argument("--watch", nargs="?", type=float, const=10.0, default=None, metavar="SECONDS",
                   help="status: print the table again every SECONDS (default 10) until no "
                        "cell is pending in a job or running")
    p.add_argument("--demo", action="store_true", help="synthetic data + a small grid, end to end")
    p.add_argument("--out", help="output folder of --demo")
    return p


def _print_states(states) -> None:
    print(format_states(states), flush=True)


def run(args: argparse.Namespace) -> int:
    if args.demo:
        from s3rec.launch.demo import run_demo
        if not args.out:
            raise GridError("--demo needs --out DIR")
        return run_demo(args.out, executor=args.executor or "local")
    if not args.args:
        raise GridError("give a grid file: s3rec-grid GRID.yaml (see --help)")
    verb, rest = ("launch", args.args) if args.args[0] not in ("status", "cancel") else \
        (args.args[0], args.args[1:])
    if len(rest) != 1:
        raise GridError(f"expected one grid file, got {rest}")
    grid = load_grid(rest[0], executor_kind=args.executor)
    if verb == "status":
        return _status(open_grid(grid), args.watch)
    if verb == "cancel":
        return _report_cancel(grid.name, open_grid(grid))
    if args.dry_run:
        return _dry_run(grid)
    run_ = launch_grid(grid)
    print(f"grid {grid.name}: {len(run_.to_run)} cells submitted, {len(run_.skipped)} skipped "
          f"({grid.executor.kind}; out {grid.out_path})", flush=True)
    if args.no_wait and grid.executor.kind == "slurm":
        return 0
    try:
        states = run_.wait(on_change=_print_states)
    except KeyboardInterrupt:
        print("interrupted: cancelling this grid's jobs", file=sys.stderr, flush=True)
        _report_cancel(grid.name, run_)
        return 130
    return 1 if any(s.state == "failed" for s in states.values()) else 0


def _status(run_: GridRun, watch: float | None) -> int:
    """Per cell: state, stage, epoch, ETA, best validation, job and log (launch/status.py)."""
    from s3rec.launch.status import format_status
    if watch is not None and watch <= 0:
        raise GridError(f"--watch {watch}: expected a positive number of seconds")
    while True:
        states = run_.states()
        print(format_status(run_.cells, states, run_.registry), flush=True)
        if watch is None or not any(is_active(s) for s in states.values()):
            return 1 if any(s.state == "failed" for s in states.values()) else 0
        time.sleep(watch)
        print(flush=True)


def _report_cancel(name: str, run_: GridRun) -> int:
    """Cancel, and say what ended and what did not: a job still running is never 'cancelled'."""
    not_cancelled = run_.cancel()
    for note in run_.stop_notes:
        print(note, file=sys.stderr)
    if not_cancelled:
        print(f"s3rec-grid: could not cancel every job of grid {name}:\n  "
              + "\n  ".join(not_cancelled), file=sys.stderr)
        return 1
    print(f"cancelled the jobs of grid {name}", flush=True)
    return 0


def _dry_run(grid: Grid) -> int:
    """Every check of a launch, then the cells and their commands, quoted for a shell."""
    run_ = open_grid(grid)
    run_.check()
    ex = grid.executor
    for c in run_.cells:
        pre, fines = c.commands()
        print(f"{c.key}  [{'done' if c.is_done() else 'to run'}]")
        if pre:
            print("   ", shlex.join(pre))
        for fine in fines:
            print("   ", shlex.join(fine))
    jobs = -(-sum(not c.is_done() for c in run_.cells) // ex.cells_per_job)
    print(f"{len(run_.cells)} cells, executor {ex.kind}, out {grid.out_path}; {jobs} job"
          f"{'s' * (jobs != 1)} to submit ({ex.cells_per_job} cell{'s' * (ex.cells_per_job != 1)} "
          f"per job, {ex.nodes} node{'s' * (ex.nodes != 1)} x {ex.tasks_per_node} task"
          f"{'s' * (ex.tasks_per_node != 1)} per cell)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        return run(args)
    except GridError as e:
        print(f"s3rec-grid: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
