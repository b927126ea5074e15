"""The report's conclusion for a grid of low-rank heads against full heads.

Where a grid has finished fine-tunes of `s3rec` (full AAP/MAP heads) and of `s3rec-lowrank` at
some rank, with the same seeds and otherwise the same settings (dataset, protocol, pretraining
epoch, axis values, removed objectives), each rank is set against the full heads:

- parameters: the pretraining model's total and its heads' (run.json "params"), and what the
  rank saves of each;
- HR@10 and NDCG@10: the mean over seeds of each arm with its 95% t-interval, and the difference
  low-rank - full paired by seed (the same seed draws the same data order and the same init of
  everything but the heads), as a 95% t-interval over the seed pairs and relative to the full
  heads' mean;
- the paired bootstrap over test users of the seed-averaged per-user metric (compare.py), which
  holds the trained models fixed;
- whether the rank stays within TOLERANCE (relative) of the full heads: "yes" only when the whole
  seed interval of the relative difference lies above -TOLERANCE;
- how the relative difference moves from the first pretraining epoch fine-tuned from to the
  last, where the grid fine-tunes from several: each seed's change, as a 95% t-interval over
  the seeds.

Every number comes from results.json, test_ranks.npy and run.json of the run folders.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from s3rec.analysis.compare import arm_users
from s3rec.analysis.read_runs import Run, head_params
from s3rec.analysis.stats import Interval, mean_interval, paired_bootstrap

FULL, LOWRANK = "s3rec", "s3rec-lowrank"
METRICS = ("HR@10", "NDCG@10")
TOLERANCE = 0.01        # "keeps the accuracy": within 1% (relative) of the full heads


def _group_key(r: Run) -> tuple:
    """What must agree for two arms to be compared: everything but the variant and rank."""
    return (r.dataset, str(r.run_json.get("protocol", "")), tuple(sorted(r.axes.items())),
            r.removed)


def _epoch_sort(e) -> tuple:
    return (1, 0) if e == "final" else (0, int(e)) if e != "" else (2, 0)


def _epoch_text(e) -> str:
    return "final" if e == "final" else f"epoch {e}" if e != "" else "-"


def _rel(iv: Interval, base: float) -> Interval:
    return Interval(iv.mean / base, iv.lo / base, iv.hi / base, iv.n)


def _pct(iv: Interval) -> str:
    if iv.n < 2:
        return f"{100 * iv.mean:+.2f}%"
    return f"{100 * iv.mean:+.2f}% [{100 * iv.lo:+.2f}, {100 * iv.hi:+.2f}]"


def _category(rel: Interval) -> str:
    """Where a relative difference stands against the TOLERANCE line: "yes" (the whole interval
    above it), "not shown" (the mean above, the interval reaching below, or one seed), "no"
    (the whole interval below) or "no by the mean" (the mean below, the interval reaching
    above, or one seed: nothing settled)."""
    if rel.n >= 2 and rel.lo >= -TOLERANCE:
        return "yes"
    if rel.mean >= -TOLERANCE:
        return "not shown"
    if rel.n >= 2 and rel.hi < -TOLERANCE:
        return "no"
    return "no by the mean"


def _verdict(rel: Interval) -> str:
    """Within TOLERANCE? yes / not shown (the mean is) / no (the mean is not), and a "no" says
    whether the interval rules the line out too or still reaches it."""
    tol = 100 * TOLERANCE
    cat = _category(rel)
    if cat == "yes":
        return f"yes (the whole interval is above -{tol:.0f}%)"
    if cat == "not shown":
        lo = f"; the interval reaches {100 * rel.lo:+.2f}%" if rel.n >= 2 else \
            " (one seed: no interval)"
        return f"not shown (the mean is within {tol:.0f}%{lo})"
    if rel.n < 2:
        return f"no ({100 * rel.mean:+.2f}%; one seed: no interval)"
    if cat == "no":
        return f"no ({100 * rel.mean:+.2f}%; the whole interval is below -{tol:.0f}%)"
    return (f"no by the mean ({100 * rel.mean:+.2f}%), but the interval reaches "
            f"{100 * rel.hi:+.2f}%: a gap within {tol:.0f}% is not ruled out")


def _in_short(rank: int, rr: list[dict]) -> str:
    """One line answering "does rank `rank` keep the full heads' accuracy?" over every
    pretraining epoch and metric of the grid: yes only where every verdict is yes, no where any
    is a settled no, and otherwise not shown, naming the cells behind the answer."""
    tol = f"{100 * TOLERANCE:.0f}%"
    by: dict[str, list[dict]] = defaultdict(list)
    for r in sorted(rr, key=lambda r: (_epoch_sort(r["epoch"]), METRICS.index(r["metric"]))):
        by[_category(r["rel"])].append(r)

    def where(rows: list[dict]) -> str:
        return ", ".join(f"{r['metric']} at {_epoch_text(r['epoch'])} ({100 * r['rel'].mean:+.2f}%)"
                         for r in rows)

    def unsettled(rows: list[dict], why: str) -> str:
        return "with one seed, no interval" if all(r["rel"].n < 2 for r in rows) else why

    if len(by) == 1 and "yes" in by:
        return (f"- **In short, r = {rank} keeps the full heads' accuracy:** within {tol} on "
                f"{where(by['yes'])}, each seed interval above the line.")
    if by["no"]:
        line = (f"- **In short, r = {rank} does not keep the full heads' accuracy:** more than "
                f"{tol} behind, the whole seed interval too, on {where(by['no'])}")
    else:
        line = f"- **In short, r = {rank} is not shown to keep the full heads' accuracy:** "
        line += "; ".join(x for x in (
            f"within {tol}, the whole interval too, on {where(by['yes'])}" if by["yes"] else "",
            f"within {tol} by the mean on {where(by['not shown'])}, "
            + unsettled(by["not shown"], "but not by the whole interval")
            if by["not shown"] else "",
            f"more than {tol} behind by the mean on {where(by['no by the mean'])}, "
            + unsettled(by["no by the mean"], "the interval reaching the line")
            if by["no by the mean"] else "") if x)
        return line + "; more seeds would settle it."
    rest = [x for x in (
        f"within {tol} on {where(by['yes'])}" if by["yes"] else "",
        f"not settled (the interval reaches across the line) on "
        f"{where(by['not shown'] + by['no by the mean'])}"
        if by["not shown"] or by["no by the mean"] else "") if x]
    return line + ("; " + "; ".join(rest) if rest else "") + "."


def comparisons(runs: list[Run]) -> list[dict]:
    """One dict per (group, pretraining epoch, rank, metric) with both arms' seeds done."""
    done = [r for r in runs if r.stage == "finetune" and r.status == "done"
            and r.variant in (FULL, LOWRANK)]
    by: dict[tuple, dict[tuple, dict[int, Run]]] = defaultdict(lambda: defaultdict(dict))
    for r in done:
        by[(_group_key(r), r.pretrain_from)][(r.variant, r.rank)][r.seed] = r
    out = []
    for (group, epoch), arms in sorted(by.items(), key=lambda kv: (kv[0][0],
                                                                   _epoch_sort(kv[0][1]))):
        full = arms.get((FULL, "full"))
        if not full:
            continue
        ranks = sorted(int(rank) for variant, rank in arms if variant == LOWRANK)
        for rank in ranks:
            low = arms[(LOWRANK, str(rank))]
            seeds = sorted(set(full) & set(low))
            if not seeds:
                continue
            f_runs, l_runs = [full[s] for s in seeds], [low[s] for s in seeds]
            f_users = arm_users("full", f_runs)
            l_users = arm_users("low", l_runs)
            for m in METRICS:
                fv = np.array([r.test_metrics()[m] for r in f_runs])
                lv = np.array([r.test_metrics()[m] for r in l_runs])
                f_iv, l_iv = mean_interval(fv), mean_interval(lv)
                diff = mean_interval(lv - fv)
                paired = None
                if m in f_users.values and m in l_users.values and \
                        f_users.seeds == l_users.seeds == seeds:
                    paired = paired_bootstrap(l_users.values[m], f_users.values[m])
                base = f_iv.mean or 1.0        # a zero mean: the differences as they are
                out.append({"group": group, "epoch": epoch, "rank": rank, "metric": m,
                            "seeds": seeds, "full": f_iv, "low": l_iv, "diff": diff,
                            "rel": _rel(diff, base),
                            "rel_by_seed": {s: float(d) / base
                                            for s, d in zip(seeds, lv - fv)},
                            "paired": paired,
                            "params": (_params(f_runs[0]), _params(l_runs[0]))})
    return out


def _params(r: Run) -> tuple[int | None, int | None]:
    """(total, heads) of the pretraining model the fine-tune started from."""
    p = r.pretrain_params or {}
    return (int(p["total"]) if "total" in p else None), head_params(p)


def conclusion_section(runs: list[Run]) -> str:
    """Markdown: the comparison table and the sentences it supports; "" without such arms."""
    rows = comparisons(runs)
    if not rows:
        return ""
    out = []
    groups = sorted({r["group"] for r in rows})
    for group in groups:
        dataset, protocol, axes, removed = group
        g = [r for r in rows if r["group"] == group]
        title = f"### {dataset}, protocol {protocol}"
        title += "".join(f", {k}={v}" for k, v in axes)
        title += f", without {'+'.join(o.upper() for o in removed)}" if removed else ""
        table = ["| rank | pretraining | metric | seeds | full heads | low-rank | difference "
                 "(paired by seed) | relative | users' paired bootstrap: difference, p | within "
                 f"{100 * TOLERANCE:.0f}% |", "|" + "---|" * 10]
        for r in g:
            p = r["paired"]
            boot = (f"{p.diff:+.4f} [{p.lo:+.4f}, {p.hi:+.4f}], p {p.fmt_p()}" if p else
                    "no per-user ranks")
            table.append(f"| {r['rank']} | {_epoch_text(r['epoch'])} | {r['metric']} | "
                         f"{','.join(map(str, r['seeds']))} | {r['full'].fmt()} | "
                         f"{r['low'].fmt()} | {r['diff'].fmt()} | {_pct(r['rel'])} | {boot} | "
                         f"{_verdict(r['rel'])} |")
        out.append(title + "\n\n" + "\n".join(table) + "\n")
        out.append(_sentences(g))
    out.append(
        "Full heads and low-rank heads are paired by seed; the interval of the difference is "
        "a 95% Student-t interval over the seed pairs, and the relative difference divides it "
        "by the full heads' mean (whose own spread is in its column). The users' bootstrap "
        "(10,000 resamples) compares the seed-averaged models on the same test users. "
        f"\"Within {100 * TOLERANCE:.0f}%\" is yes only when the whole interval of the relative "
        "difference lies above that line; with few seeds a close mean is \"not shown\", not "
        "\"yes\", and a mean beyond it is a \"no\" whose interval may still reach the line, "
        "which the verdict then says.\n")
    return "\n".join(out)


def _gap_change(a: dict, b: dict) -> str:
    """How the relative difference moves from pretraining epoch a to b, paired by seed: both
    epochs' fine-tunes of a seed start from the same pretraining run, so each seed's change is
    one value and their t-interval says whether the gap moved (comparing the two epochs'
    intervals for overlap would hide a consistent move behind the seeds' spread)."""
    seeds = sorted(set(a["rel_by_seed"]) & set(b["rel_by_seed"]))
    head = f"From {_epoch_text(a['epoch'])} to {_epoch_text(b['epoch'])} the gap moves by "
    if not seeds:
        return head + f"{100 * (b['rel'].mean - a['rel'].mean):+.2f} percentage points (no " \
            f"seed has both)."
    iv = mean_interval([b["rel_by_seed"][s] - a["rel_by_seed"][s] for s in seeds])
    said = f"{100 * iv.mean:+.2f} percentage points"
    if iv.n < 2:
        return head + said + " (one seed: no interval)."
    said += (f" [{100 * iv.lo:+.2f}, {100 * iv.hi:+.2f}], paired by seed "
             f"({','.join(map(str, seeds))})")
    if iv.hi < 0:
        return head + said + ": the whole interval is below 0, so the low-rank heads lose " \
            "ground with longer pretraining."
    if iv.lo > 0:
        return head + said + ": the whole interval is above 0, so the low-rank heads gain " \
            "ground with longer pretraining."
    return head + said + ": the interval includes 0, so no change is shown."


def _sentences(g: list[dict]) -> str:
    lines = []
    ranks = sorted({r["rank"] for r in g})
    for rank in ranks:
        rr = [r for r in g if r["rank"] == rank]
        (f_total, f_heads), (l_total, l_heads) = rr[0]["params"]
        if None not in (f_total, l_total, f_heads, l_heads) and f_total and f_heads:
            lines.append(f"- **r = {rank}, parameters:** {l_total:,} against {f_total:,} for "
                         f"full heads: {f_total - l_total:,} fewer "
                         f"({100 * (f_total - l_total) / f_total:.2f}% of the model); in the "
                         f"heads {l_heads:,} against {f_heads:,} "
                         f"({100 * (f_heads - l_heads) / f_heads:.1f}% of the heads).")
        lines.append(_in_short(rank, rr))
        for m in METRICS:
            mm = sorted((r for r in rr if r["metric"] == m), key=lambda r: _epoch_sort(r["epoch"]))
            parts = [f"{_epoch_text(r['epoch'])}: {_pct(r['rel'])}, within "
                     f"{100 * TOLERANCE:.0f}%: {_verdict(r['rel'])}" for r in mm]
            lines.append(f"- **r = {rank}, {m}** relative to full heads: " + "; ".join(parts) + ".")
            if len(mm) >= 2:
                lines.append("  " + _gap_change(mm[0], mm[-1]))
    return "\n".join(lines) + "\n"
