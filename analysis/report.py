"""`s3rec-report RUNS --out DIR`: tables, figures and a Markdown report of a tree of run folders.

Writes DIR/runs.csv (one row per run and stage), DIR/scalars.csv (every logged scalar),
DIR/report.md (every figure embedded by relative path, the table beside the paper's numbers,
notes on unfinished and failed runs), DIR/figures/*.png|svg, DIR/lowrank_spectra.csv and
DIR/params_breakdown.csv. Every file is written under a temporary name and renamed.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

from s3rec.analysis.atomic import FIGURE_FORMATS, write_csv, write_text
from s3rec.analysis.compare import DEFAULT_BASELINE, paired_rows, pick_baseline
from s3rec.analysis.field_figures import (field_anatomy_section, field_heads_partial,
                                          fields_section)
from s3rec.analysis.figures import Figure, all_grid_figures
from s3rec.analysis.lowrank_study import conclusion_section
from s3rec.analysis.paper_numbers import PAPER_SOURCE, reference_for
from s3rec.analysis.protocols import protocols_section
from s3rec.analysis.read_runs import (Run, RunFolderError, read_runs, runs_table, scalar_columns,
                                scalars_table, sort_metrics)
from s3rec.analysis.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, mean_interval

LOWRANK_TABLE_RANKS = (1, 2, 4, 8, 16, 32)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="s3rec-report", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path, help="folder of run folders (a grid, or several)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="model file (final.pt, or the authors' state dict) for the low-rank "
                        "analysis; default: the first finished full-rank pretraining's final.pt")
    p.add_argument("--baseline", default=None, metavar="ARM",
                   help="the arm every other arm is tested against, paired by user (an arm as "
                        "the results table names it, e.g. 's3rec' or 'finetune-only'); default: "
                        "s3rec where present")
    p.add_argument("--no-anatomy", action="store_true",
                   help="skip the model-anatomy figures (they build full-size models)")
    p.add_argument("--figures", default="png,svg", choices=["png,svg", "png"],
                   help="figure files: PNG and SVG (default), or PNG only (a report kept in a "
                        "repository)")
    p.add_argument("--no-scalars", action="store_true",
                   help="leave out scalars.csv, every logged point (megabytes for a long grid)")
    return p


# ---------------------------------------------------------------- pieces of the report

def _fmt(vals: list[float]) -> str:
    return mean_interval(vals).fmt() if vals else ""


def _md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _finished_groups(runs: list[Run]):
    """(dataset, protocol) -> arm -> finished fine-tunes; and the count of unfinished ones."""
    groups: dict[tuple[str, str], dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    not_done: Counter = Counter()
    for r in runs:
        key = (r.dataset, str(r.run_json.get("protocol", "")))
        if r.stage == "finetune" and r.status == "done":
            groups[key][r.arm].append(r)
        elif r.stage == "finetune":
            not_done[key + (r.arm,)] += 1
    return groups, not_done


def results_section(runs: list[Run]) -> str:
    """Ours (mean and 95% interval over seeds, finished fine-tunes) beside the published numbers."""
    groups, not_done = _finished_groups(runs)
    if not groups:
        return "No finished fine-tune runs: no results to tabulate.\n"
    out = []
    for (dataset, protocol), arms in sorted(groups.items()):
        ref_metrics, refs = reference_for(dataset, protocol)
        have = sort_metrics({m for rs in arms.values() for r in rs for m in r.test_metrics()})
        metrics = list(ref_metrics) or have
        metrics += [m for m in have if m not in metrics]
        rows = []
        for arm, rs in sorted(arms.items()):
            cells = [_fmt([r.test_metrics()[m] for r in rs if m in r.test_metrics()])
                     for m in metrics]
            seeds = ",".join(str(r.seed) for r in sorted(rs, key=lambda r: r.seed))
            grids = ",".join(sorted({r.grid for r in rs}))
            missing = not_done[(dataset, protocol, arm)]
            rows.append([f"ours: {arm}", f"{len(rs)} ({seeds})"
                         + (f", {missing} not done" if missing else ""), grids, *cells])
        for src, vals in refs.items():
            rows.append([f"**{src}**", "", "published",
                         *[f"{vals[m]:.4f}" if m in vals else "" for m in metrics]])
        out.append(f"### {dataset}, protocol {protocol}\n\n"
                   + _md_table(["", "seeds", "grid", *metrics], rows) + "\n")
        if not refs:
            out.append(f"The paper reports no {protocol} numbers for {dataset}.\n")
    out.append(f"Ours: mean over seeds of the test metrics at the best validation epoch "
               f"(results.json), with its 95% Student-t interval [low, high] where there are two "
               f"seeds or more. Published: {PAPER_SOURCE}.\n")
    return "\n".join(out)


def paired_section(runs: list[Run], baseline: str | None) -> str:
    """Each arm against the baseline arm, paired by test user (s3rec.analysis.compare)."""
    groups, _ = _finished_groups(runs)
    out = []
    for (dataset, protocol), arms in sorted(groups.items()):
        if len(arms) < 2:
            continue
        base = pick_baseline(arms, baseline)
        if base is None:
            out.append(f"- {dataset}, protocol {protocol}: " + (
                f"the baseline `{baseline}` has no finished fine-tune here" if baseline else
                f"no arm named `{DEFAULT_BASELINE}`") + "; choose the baseline with "
                f"`--baseline ARM`, one of: " + ", ".join(f"`{a}`" for a in sorted(arms)))
            continue
        rows, notes = paired_rows(arms, base)
        if rows:
            out.append(f"### {dataset}, protocol {protocol}: against {base}\n\n" + _md_table(
                ["arm", "seeds", "metric", "arm", base, "difference [95%]", "relative", "p"],
                rows) + "\n")
        out += [f"- {n}" for n in notes]
    if not out:
        return ""
    return "\n".join(out) + (
        f"\n\nPaired bootstrap over test users ({BOOTSTRAP_RESAMPLES:,} resamples, seed "
        f"{BOOTSTRAP_SEED}): each user's metric averaged over an arm's seeds, the difference "
        f"arm - baseline resampled by user; interval: 2.5 and 97.5 percentiles of the resampled "
        f"mean difference; p: two-sided. It holds the trained models fixed; the intervals over "
        f"seeds above hold the training's own variation.\n")


def pretraining_section(runs: list[Run]) -> str:
    """Finished fine-tunes by the pretraining they started from (variant, rank, epochs): the
    table to read a pretraining run against its epochs."""
    rows = []
    for r in runs:
        src = r.init
        if r.stage != "finetune" or r.status != "done" or src["init_epochs"] == "":
            continue
        pre = src["init_variant"] or "?"
        if src["init_rank"] not in ("", "full"):
            pre += f" r={src['init_rank']}"
        m = r.test_metrics()
        name = r.path.name if r.cell == "." else f"{r.cell}/{r.path.name}"
        best = r.best_epoch()
        rows.append(((pre, int(src["init_epochs"]), name),
                     [pre, src["init_epochs"], *[f"{m[k]:.4f}" if k in m else ""
                                                 for k in ("HR@10", "NDCG@10", "MRR")],
                      "" if best is None else best, name]))
    if not rows:
        return ""
    return _md_table(["pretraining", "epochs", "test HR@10", "test NDCG@10", "test MRR",
                      "best epoch", "fine-tune run"], [row for _, row in sorted(rows)]) + "\n"


def status_section(runs: list[Run]) -> str:
    counts = Counter((r.stage, r.status) for r in runs)
    rows = [[stage, *[counts.get((stage, s), 0) for s in ("done", "unfinished", "failed")]]
            for stage in sorted({r.stage for r in runs})]
    text = _md_table(["stage", "done", "unfinished", "failed"], rows) + "\n"
    bad = [r for r in runs if r.status != "done"]
    if bad:
        text += ("\n**Unfinished and failed runs** (kept in runs.csv; left out of the means and "
                 "figures):\n\n")
        text += _md_table(["run", "stage", "status", "epochs reached", "error / notes"],
                          [[r.name, r.stage, r.status, r.run_json.get("epoch", ""),
                            "; ".join(filter(None, [r.run_json.get("error") or "", *r.notes]))]
                           for r in bad]) + "\n"
    noted = [r for r in runs if r.status == "done" and r.notes]
    if noted:
        text += "\nNotes on finished runs:\n\n" + "\n".join(
            f"- {r.name} ({r.stage}): {'; '.join(r.notes)}" for r in noted) + "\n"
    return text


def _figure_md(f: Figure) -> str:
    svg = f" ([SVG]({f.stem}.svg))" if "svg" in FIGURE_FORMATS.get() else ""
    return f"### {f.title}\n\n![{f.title}]({f.stem}.png)\n\n{f.caption}{svg}\n"


def default_checkpoint(runs: list[Run]) -> Path | None:
    # Prefer a cell that trained every objective (an ablated head stays at its init), and every
    # attribute field's heads at full rank.
    for r in sorted(runs, key=lambda r: (bool(r.removed), field_heads_partial(r), str(r.path))):
        if (r.stage == "pretrain" and r.status == "done" and r.rank == "full"
                and (r.path / "final.pt").is_file()):
            return r.path / "final.pt"
    return None


def lowrank_section(checkpoint: Path | None, explicit: bool, out: Path, ranks: list[int]) -> str:
    from s3rec.analysis.lowrank import analyse_checkpoint, spectra_figure, write_spectra_csv
    from s3rec.model import CheckpointError
    if checkpoint is None:
        return ("No finished full-rank pretraining with a final.pt under RUNS, and no "
                "--checkpoint given: no low-rank analysis.\n")
    try:
        spectra = analyse_checkpoint(checkpoint)
    except (CheckpointError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) else str(e)    # str(KeyError) adds quotes
        if explicit:    # main reports a CheckpointError as an error line
            raise CheckpointError(f"--checkpoint {msg}") from None
        return f"The default checkpoint {checkpoint} could not be analysed: {msg}\n"
    d = len(spectra[0].singular)
    stem = out / "figures" / "lowrank_spectra"
    spectra_figure(spectra, stem, f"head matrices of {checkpoint}", ranks)
    write_spectra_csv(spectra, out / "lowrank_spectra.csv")
    show = [r for r in LOWRANK_TABLE_RANKS if r < d] + [d]
    rows = [[f"{h.name.upper()} ({h.source})", f"{h.singular[0]:.3g}", f"{h.singular[-1]:.3g}",
             *[f"{h.error_at(r):.3f}" for r in show]] for h in spectra]
    return (f"Checkpoint: `{checkpoint}`.\n\n"
            + _figure_md(Figure("Singular values and truncated-SVD error of the heads",
                                "figures/lowrank_spectra",
                                "Relative Frobenius error of the best rank-r approximation "
                                "(Eckart-Young); vertical lines: the ranks of this grid.")) + "\n"
            + _md_table(["head", "s_max", "s_min", *[f"err r={r}" for r in show]], rows)
            + "\n\nAll ranks: lowrank_spectra.csv.\n")


def anatomy_section(out: Path) -> str:
    from s3rec.analysis.anatomy import all_anatomy_figures, write_breakdown_csv
    res = all_anatomy_figures(out / "figures")
    write_breakdown_csv(res["breakdown"], out / "params_breakdown.csv")
    figs = [Figure("Architecture (full-rank heads)", "figures/architecture_full",
                   "Boxes labelled with the parameter shapes of a built S3RecModel."),
            Figure("Architecture (low-rank AAP/MAP heads, rank 16)",
                   "figures/architecture_lowrank16", "The same, variant s3rec-lowrank."),
            Figure("Attention masks", "figures/attention_masks",
                   "The model's own additive masks for a left-padded sequence."),
            Figure("Low-rank heads", "figures/lowrank_heads",
                   "W = U Vᵀ; parameters of one head counted on real head modules."),
            Figure("Parameters per part", "figures/params_breakdown",
                   "Stacked per part, full rank and AAP/MAP ranks 8, 16, 32. Sizes: released "
                   "Beauty data (12,101 items -> item_size 12,103; 637 attributes -> "
                   "attribute_size 638) and the sizes the paper states "
                   "(12,102 items -> item_size 12,104 = items + padding + mask; 1,221 "
                   "attributes -> attribute_size 1,222 = attributes + padding).")]
    rows = [[r["sizes"], r["heads"], f"{r['total']:,}"] for r in res["breakdown"]]
    return ("\n".join(_figure_md(f) for f in figs) + "\n"
            + _md_table(["sizes", "pretraining heads", "parameters"], rows)
            + "\n\nPer part: params_breakdown.csv.\n")


# ---------------------------------------------------------------- the command

def build_report(runs_dir: Path, out: Path, checkpoint: Path | None = None,
                 anatomy: bool = True, baseline: str | None = None,
                 command: str | None = None, figure_formats: tuple[str, ...] = ("png", "svg"),
                 scalars: bool = True) -> Path:
    """`command`: the command line that made the report, stated at its top so that it can be
    regenerated (everything else in the folder is then the same, byte for byte, apart from the
    `Generated` time). `figure_formats`: png, svg or both; `scalars`: write scalars.csv (every
    logged point: megabytes for a long grid)."""
    token = FIGURE_FORMATS.set(tuple(figure_formats))
    try:
        return _build_report(runs_dir, out, checkpoint, anatomy, baseline, command, scalars)
    finally:
        FIGURE_FORMATS.reset(token)


def _build_report(runs_dir: Path, out: Path, checkpoint: Path | None, anatomy: bool,
                  baseline: str | None, command: str | None, scalars: bool) -> Path:
    if checkpoint is not None and not Path(checkpoint).is_file():   # fail before any work
        from s3rec.model import CheckpointError
        raise CheckpointError(f"--checkpoint {checkpoint} does not exist")
    runs = read_runs(runs_dir)
    if not runs:
        raise SystemExit(f"s3rec-report: no run folders (run.json) under {runs_dir}")
    arms = {r.arm for r in runs if r.stage == "finetune"}
    if baseline is not None and baseline not in arms:
        # Not an error: a grid under way has no fine-tune of the arm yet. Said here and in the
        # report, so that a misspelt name is seen either way.
        print(f"s3rec-report: warning: --baseline {baseline!r}: no fine-tune of that arm under "
              f"{runs_dir} (yet?); its arms: " + (", ".join(map(repr, sorted(arms))) or "none"),
              file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    rows, cols = runs_table(runs)
    write_csv(out / "runs.csv", rows, cols)
    if scalars:
        write_csv(out / "scalars.csv", scalars_table(runs), scalar_columns(runs))
    figs, notes = all_grid_figures(runs, out / "figures")
    ranks = sorted({int(r.rank) for r in runs if r.rank.isdigit()})
    explicit = checkpoint is not None
    ckpt = checkpoint if explicit else default_checkpoint(runs)

    parts = [f"# S3Rec report: {runs_dir}\n",
             f"Generated {datetime.now(timezone.utc).isoformat(timespec='seconds')} from "
             f"{len(runs)} stage folders. Tables: [runs.csv](runs.csv) (one row per run and "
             f"stage)" + (", [scalars.csv](scalars.csv) (every logged scalar)" if scalars else "")
             + ".\n",
             *([f"Regenerate it with `{command}`.\n"] if command else []),
             "## Runs\n", status_section(runs),
             "## Results beside the paper\n", results_section(runs),
             *(["## Arms against the baseline, paired by test user\n", paired]
               if (paired := paired_section(runs, baseline)) else []),
             *(["## Arms under every evaluation protocol\n", by_protocol]
               if (by_protocol := protocols_section(runs)) else []),
             *(["## Fine-tunes by their pretraining epochs\n", pre]
               if (pre := pretraining_section(runs)) else []),
             "## Figures of the grid\n", *[_figure_md(f) for f in figs]]
    if notes:
        parts += ["Figures not drawn (no data in this grid):\n",
                  "\n".join(f"- {n}" for n in notes) + "\n"]
    if by_field := fields_section(runs, out):
        parts += ["## Per attribute field\n", by_field]
    parts += ["## Low-rank analysis of a trained full-rank model\n",
              lowrank_section(ckpt, explicit, out, ranks)]
    if anatomy:
        parts += ["## Model anatomy\n", anatomy_section(out), field_anatomy_section(runs, out)]
    if conclusion := conclusion_section(runs):
        parts += ["## Conclusion: low-rank heads against full heads\n", conclusion]
    report = out / "report.md"
    write_text(report, "\n".join(parts))
    return report


def main(argv: list[str] | None = None) -> int:
    from s3rec.model import CheckpointError
    args = get_args_parser().parse_args(argv)
    try:
        report = build_report(args.runs, args.out, args.checkpoint, anatomy=not args.no_anatomy,
                              baseline=args.baseline,
                              figure_formats=tuple(args.figures.split(",")),
                              scalars=not args.no_scalars,
                              command=shlex.join(["s3rec-report", *(sys.argv[1:] if argv is None
                                                                    else argv)]))
    except (CheckpointError, RunFolderError, OSError) as e:
        print(f"s3rec-report: error: {e}", file=sys.stderr)
        return 2
    print(f"s3rec-report: wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
