"""`s3rec-grid status`: one row per cell, read from its run folders and its job.

    cell                          state    stage     epoch    eta      best valid      job / log
    synthetic/s3rec/rfull/s1      running  pretrain  3/150    2:31:02                  local 4242  runs/demo/_submitit/4242_0_log.err
    synthetic/s3rec/rfull/s2      running  finetune  4/200    <=1:02:05  MRR 0.3123 (e3)  local 4243  runs/demo/_submitit/4243_0_log.err

The stage, epoch and ETA come from the progress record the training keeps in its run.json
(s3rec.engine.progress; at most logging.progress_every_s old), the best validation so far from
the fine-tune's, the job state from SLURM or the local controller (runner.GridRun.state_of).
"""
from __future__ import annotations

from pathlib import Path

from s3rec.engine.progress import clock
from s3rec.launch.grid import Cell, read_run_json
from s3rec.launch.runner import STATES, CellState

COLUMNS = ("cell", "state", "stage", "epoch", "eta", "best valid", "job / log")


def log_path(entry: dict | None) -> str:
    """The job's stderr log, where the training's lines go: recorded at submission, else found
    in its submitit folder."""
    if not entry:
        return ""
    if entry.get("log"):
        return entry["log"]
    found = sorted(Path(entry.get("folder", ".")).glob(f"{entry.get('job_id')}_*log.err"))
    return str(found[0]) if found else ""


def stage_progress(cell: Cell) -> tuple[str, str, str, str]:
    """(stage, epoch e/E, eta, best validation) of the cell's stage under way or last run."""
    # Stages run in order: the last one with a run.json is the one under way (or last run).
    for stage, folder in reversed(cell.stage_dirs):
        info = read_run_json(folder)
        if not info:
            continue
        name = folder.name          # pretrain, finetune, finetune-e<N>
        prog = info.get("progress") or {}
        epochs = prog.get("epochs") or (info.get("config") or {}).get(stage, {}).get("epochs")
        done = info.get("epoch") or 0
        if info.get("status") == "done":
            epoch, eta = f"{done}/{epochs or done}", "done"
        elif prog:
            epoch, eta = f"{prog['epoch']}/{epochs}", clock(prog.get("eta_run_s"))
            patience = (info.get("config") or {}).get(stage, {}).get("patience")
            if stage == "finetune" and patience != 0:
                # the time to the last of its epochs: early stopping may end it sooner
                eta = "<=" + eta
        else:
            epoch, eta = f"{done}/{epochs or '?'}", "?"
        best = prog.get("best_valid") or {}
        best_text = (f"{best['metric']} {best['value']:.4f} (e{best['epoch']})"
                     if best.get("value") is not None else "")
        if stage == "finetune" and info.get("status") == "done":
            best_text = best_text or "results.json"
        return name, epoch, eta, best_text
    return "", "", "", ""


def status_rows(cells: list[Cell], states: dict[str, CellState], registry: dict) -> list[list]:
    rows = []
    for c in cells:
        st = states[c.key]
        stage, epoch, eta, best = stage_progress(c)
        entry = registry.get(c.key)
        job = f"{entry['executor']} {entry['job_id']}" if entry else ""
        log = log_path(entry)
        rows.append([c.key, st.state, stage, epoch, eta, best,
                     "  ".join(x for x in (job, log) if x) or st.detail])
    return rows


def format_status(cells: list[Cell], states: dict[str, CellState], registry: dict) -> str:
    rows = status_rows(cells, states, registry)
    widths = [max(len(str(r[i])) for r in rows + [list(COLUMNS)]) for i in range(len(COLUMNS) - 1)]
    lines = ["  ".join(f"{h:<{w}}" for h, w in zip(COLUMNS, widths)) + "  " + COLUMNS[-1]]
    lines += ["  ".join(f"{str(v):<{w}}" for v, w in zip(r, widths)) + "  " + str(r[-1])
              for r in rows]
    counts = {s: sum(1 for x in states.values() if x.state == s) for s in STATES}
    lines.append("  ".join(f"{s}={n}" for s, n in counts.items()))
    failed = [(c.key, states[c.key].detail) for c in cells if states[c.key].state == "failed"]
    lines += [f"failed {k}: {d}" for k, d in failed]
    return "\n".join(lines)
