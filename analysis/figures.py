"""Figures of a grid: metric against rank, parameters against metric, learning curves, ablation
bars, pretraining losses, and ours against the paper.

Every function takes the runs (analysis.read_runs.Run) and an output folder, writes PNG and SVG,
and returns (figures, notes): figures as `Figure(title, stem, caption)`, notes saying what was
skipped and why (a grid without ablation runs has no ablation figure; that is not an error).
Spread over seeds is always drawn as the 95% Student-t interval of the mean over seeds
(s3rec.analysis.stats.mean_interval; none for a single seed), the line or marker being the mean.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from s3rec.analysis.atomic import save_figure  # noqa: E402
from s3rec.analysis.paper_numbers import reference_for  # noqa: E402
from s3rec.analysis.read_runs import OBJECTIVES, Run, sort_metrics  # noqa: E402
from s3rec.analysis.stats import mean_interval  # noqa: E402

plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "legend.fontsize": 8.5,
                     "axes.grid": True, "grid.alpha": 0.3})
HEADLINE = ("HR@10", "NDCG@10")


@dataclass
class Figure:
    title: str
    stem: str          # path relative to the report folder, without extension
    caption: str


def _save(fig, out: Path, name: str) -> str:
    save_figure(fig, out / name)
    plt.close(fig)
    return f"{out.name}/{name}"


def metric_bars(ax, groups: list, metrics: list[str], colors: dict, width: float,
                values, labels: list[str], ylabel: str, title: str,
                tick_size: float | None = None) -> None:
    """One bar per group and metric, side by side: the mean over seeds with its 95% interval
    as the error bar, its value written above; `values(group, metric)` gives the seeds'; each
    group labelled with its number of runs."""
    ax.set_xticks(range(len(groups)), [f"{lab}\n(n={len(g)})" for lab, g in zip(labels, groups)],
                  fontsize=tick_size)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    for j, m in enumerate(metrics):
        for i, group in enumerate(groups):
            vals = values(group, m)
            if not vals:
                continue
            mean, lo, hi = _stats(vals)
            x = i + (j - (len(metrics) - 1) / 2) * width
            ax.bar(x, mean, width, color=colors[m], label=m if i == 0 else None,
                   yerr=[[mean - lo], [hi - mean]], capsize=3)
            ax.text(x, hi, f"{mean:.3f}", ha="center", va="bottom", fontsize=8)
    ax.legend(loc="lower right")
    ax.margins(y=0.12)


def _stats(values: list[float]) -> tuple[float, float, float]:
    """Mean and its 95% interval over seeds."""
    iv = mean_interval(values)
    return iv.mean, iv.lo, iv.hi


def _colors(keys) -> dict:
    cmap = plt.get_cmap("tab10")
    return {k: cmap(i % 10) for i, k in enumerate(sorted(keys))}


def _done_finetunes(runs: list[Run]) -> dict[tuple[str, str], list[Run]]:
    """(dataset, protocol) -> done fine-tune runs."""
    out = defaultdict(list)
    for r in runs:
        if r.stage == "finetune" and r.status == "done":
            out[(r.dataset, str(r.run_json.get("protocol", "")))].append(r)
    return dict(sorted(out.items()))


def _by_arm(runs: list[Run]) -> dict[str, list[Run]]:
    out = defaultdict(list)
    for r in runs:
        out[r.arm].append(r)
    return dict(sorted(out.items()))


def _metric_values(runs: list[Run], metric: str) -> list[float]:
    return [r.test_metrics()[metric] for r in runs if metric in r.test_metrics()]


def _headline(runs: list[Run]) -> list[str]:
    """HR@10 and NDCG@10 where logged, else the first two metrics there are."""
    have = set().union(*(r.test_metrics().keys() for r in runs)) if runs else set()
    picked = [m for m in HEADLINE if m in have]
    return picked or sort_metrics(have)[:2]


def _tag(dataset: str, protocol: str) -> str:
    return f"{dataset}_{protocol}".replace("/", "-").replace(" ", "")


# ---------------------------------------------------------------- (a) metric against rank

def metric_vs_rank(runs: list[Run], out: Path) -> tuple[list[Figure], list[str]]:
    figs, notes = [], []
    for (dataset, protocol), fts in _done_finetunes(runs).items():
        plain = [r for r in fts if not r.removed]
        ranked = [r for r in plain if r.rank != "full" and "/" not in r.rank]
        if not ranked:
            notes.append(f"metric against rank ({dataset}, {protocol}): no finished low-rank "
                         f"fine-tunes")
            continue
        metrics = _headline(plain)
        fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4), squeeze=False)
        # One line per arm without its rank: runs of other settings (other grids, or other
        # cells of a grid: their arm suffix) are never pooled as seeds.
        lines = sorted({r.rank_line for r in ranked})
        fulls = _by_arm([r for r in plain if r.rank == "full"])
        colors = _colors(lines + list(fulls))
        all_ranks = sorted({int(r.rank) for r in ranked})
        for ax, m in zip(axes[0], metrics):
            for v in lines:
                by_rank = defaultdict(list)
                for r in ranked:
                    if r.rank_line == v and m in r.test_metrics():
                        by_rank[int(r.rank)].append(r.test_metrics()[m])
                xs = sorted(by_rank)
                st = [_stats(by_rank[x]) for x in xs]
                seeds = ", ".join(f"r{x}: {len(by_rank[x])}" for x in xs)
                ax.plot(xs, [s[0] for s in st], "o-", color=colors[v],
                        label=f"{v} (seeds {seeds})")
                ax.fill_between(xs, [s[1] for s in st], [s[2] for s in st], color=colors[v],
                                alpha=0.2, linewidth=0)
            for arm, rs in fulls.items():
                vals = _metric_values(rs, m)
                if not vals:
                    continue
                mean, lo, hi = _stats(vals)
                ls = "--" if rs[0].variant == "s3rec" else ":"
                ax.axhline(mean, color=colors[arm], ls=ls,
                           label=f"{arm} (full rank, {len(vals)} seeds)")
                ax.axhspan(lo, hi, color=colors[arm], alpha=0.12, linewidth=0)
            ax.set_xscale("log", base=2)
            ax.set_xticks(all_ranks, [str(x) for x in all_ranks])
            ax.minorticks_off()
            ax.set_xlabel("head rank r of AAP/MAP (log scale)")
            ax.set_ylabel(f"test {m} ({protocol})")
            ax.set_title(f"{dataset}: test {m} against head rank")
        axes[0][0].legend(loc="best")
        fig.tight_layout()
        stem = _save(fig, out, f"metric_vs_rank_{_tag(dataset, protocol)}")
        figs.append(Figure(f"Test metric against head rank ({dataset}, {protocol})", stem,
                           "Line: mean over seeds; band: its 95% interval. Horizontal lines: "
                           "full-rank variants (band = their 95% interval)."))
    return figs, notes


# ---------------------------------------------------------------- (b) parameters against metric

def params_vs_metric(runs: list[Run], out: Path) -> tuple[list[Figure], list[str]]:
    from s3rec.analysis.read_runs import head_params
    figs, notes = [], []
    for (dataset, protocol), fts in _done_finetunes(runs).items():
        arms = _by_arm([r for r in fts if r.pretrain_params.get("total")])
        if len(arms) < 2:
            notes.append(f"parameters against metric ({dataset}, {protocol}): fewer than two "
                         f"arms with parameter counts in run.json")
            continue
        m = _headline(fts)[0]
        colors = _colors(arms)
        markers = "osD^v<>Pp*"
        fig, axes = plt.subplots(1, 2, figsize=(10.5, 4), squeeze=False)
        for i, (arm, rs) in enumerate(arms.items()):
            vals = _metric_values(rs, m)
            if not vals:
                continue
            mean, lo, hi = _stats(vals)
            for ax, x in ((axes[0][0], int(rs[0].pretrain_params["total"])),
                          (axes[0][1], head_params(rs[0].pretrain_params))):
                ax.errorbar([x], [mean], yerr=[[mean - lo], [hi - mean]], fmt=markers[i % 10],
                            color=colors[arm], capsize=3, ms=7, label=f"{arm} (n={len(vals)})")
        axes[0][0].set_xlabel("parameters of the pretraining model (count)")
        axes[0][1].set_xlabel("parameters in the four pretraining heads (count)")
        for ax in axes[0]:
            ax.set_ylabel(f"test {m} ({protocol})")
            ax.ticklabel_format(axis="x", style="plain", useOffset=False)
            ax.tick_params(axis="x", labelrotation=20)
        axes[0][0].set_title(f"{dataset}: {m} against model size")
        axes[0][1].set_title(f"{dataset}: {m} against head size")
        axes[0][1].legend(loc="best")
        fig.tight_layout()
        stem = _save(fig, out, f"params_vs_metric_{_tag(dataset, protocol)}")
        figs.append(Figure(f"Parameters against {m} ({dataset}, {protocol})", stem,
                           "Marker: mean over seeds; bar: its 95% interval. Parameters from the cell's "
                           "pretraining run.json."))
    return figs, notes


# ---------------------------------------------------------------- (c) learning curves

def _mean_band(curves: list[tuple[list[int], list[float]]]):
    """Mean and its 95% interval at each step that any curve has (curves of different lengths:
    a step's interval is over the curves that reach it)."""
    at = defaultdict(list)
    for xs, ys in curves:
        for x, y in zip(xs, ys):
            at[x].append(y)
    xs = sorted(at)
    st = [_stats(at[x]) for x in xs]
    return xs, [m for m, _, _ in st], [lo for _, lo, _ in st], [hi for _, _, hi in st]


def learning_curves(runs: list[Run], out: Path) -> tuple[list[Figure], list[str]]:
    figs, notes = [], []
    for (dataset, protocol), fts in _done_finetunes(runs).items():
        tags = sort_metrics({t[6:] for r in fts for t in r.scalars if t.startswith("valid/")})
        prefer = [m for m in ("MRR", "NDCG@10", "NDCG@20", "HR@10") if m in tags]
        metrics = (prefer or tags)[:2]
        if not metrics:
            notes.append(f"learning curves ({dataset}, {protocol}): no valid/<metric> scalars")
            continue
        arms = _by_arm(fts)
        colors = _colors(arms)
        fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4), squeeze=False)
        for ax, m in zip(axes[0], metrics):
            for arm, rs in arms.items():
                curves = [r.curve(f"valid/{m}") for r in rs if f"valid/{m}" in r.scalars]
                if not curves:
                    continue
                xs, mean, lo, hi = _mean_band(curves)
                ax.plot(xs, mean, color=colors[arm], label=f"{arm} (n={len(curves)})")
                ax.fill_between(xs, lo, hi, color=colors[arm], alpha=0.2, linewidth=0)
            ax.set_xlabel("fine-tuning epoch")
            ax.set_ylabel(f"validation {m} ({protocol})")
            ax.set_title(f"{dataset}: validation {m}")
        axes[0][-1].legend(loc="lower right")
        fig.tight_layout()
        stem = _save(fig, out, f"learning_curves_{_tag(dataset, protocol)}")
        figs.append(Figure(f"Fine-tuning learning curves ({dataset}, {protocol})", stem,
                           "Finished fine-tunes only. Line: mean over seeds at each epoch; band: "
                           "its 95% interval. Runs stop at different epochs (early stopping)."))
    return figs, notes


# ---------------------------------------------------------------- (d) ablation bars

def ablation_bars(runs: list[Run], out: Path) -> tuple[list[Figure], list[str]]:
    figs, notes = [], []
    found_any = False
    for (dataset, protocol), fts in _done_finetunes(runs).items():
        ablated = [r for r in fts if r.removed]
        if not ablated:
            continue
        found_any = True
        # Reference: the same variant and rank with every objective on.
        keys = {(r.variant, r.rank) for r in ablated}
        arms = _by_arm([r for r in fts if (r.variant, r.rank) in keys])
        metrics = _headline(fts)
        fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(arms) * len(metrics) / 2 + 3), 4.2))
        width = 0.8 / len(metrics)
        names = sorted(arms, key=lambda a: (" w/o " in a, a))
        colors = _colors(metrics)
        metric_bars(ax, [arms[a] for a in names], metrics, colors, width, _metric_values, names,
                    f"test metric ({protocol})", f"{dataset}: removing one pretraining objective")
        fig.tight_layout()
        stem = _save(fig, out, f"ablation_{_tag(dataset, protocol)}")
        figs.append(Figure(f"Ablation of the pretraining objectives ({dataset}, {protocol})",
                           stem, "Bar: mean over seeds; whisker: its 95% interval. 'w/o X' = pretraining "
                           "weight of X set to 0 (read from run.json config pretrain.weights)."))
    if not found_any:
        notes.append("ablation bars: no finished fine-tune of a cell whose pretraining had an "
                     "objective weight of 0")
    return figs, notes


# ---------------------------------------------------------------- (e) pretraining losses

SMOOTH_POINTS = 20   # a curve of n points is smoothed over n // SMOOTH_POINTS logged points


def _smooth(curve: tuple[list[int], list[float]]) -> tuple[list[int], list[float]]:
    """Trailing moving average: per-step losses of length-bucketed batches jump with the
    prefix length of each batch; the trend is what the figure is for."""
    xs, ys = curve
    w = max(1, len(ys) // SMOOTH_POINTS)
    if w == 1:
        return xs, ys
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y - (ys[i - w] if i >= w else 0.0)
        out.append(acc / min(i + 1, w))
    return xs, out


def pretrain_losses(runs: list[Run], out: Path) -> tuple[list[Figure], list[str]]:
    figs, notes = [], []
    pre = defaultdict(list)
    for r in runs:
        if r.stage == "pretrain" and r.status == "done":
            pre[r.dataset].append(r)
    if not pre:
        notes.append("pretraining losses: no finished pretraining runs")
    for dataset, rs in sorted(pre.items()):
        names = [o for o in (*OBJECTIVES, "total") if any(f"loss/{o}" in r.scalars for r in rs)]
        prefix, xlabel = "loss/", "optimizer step"
        if not names:  # only per-epoch losses were logged
            names = [o for o in (*OBJECTIVES, "total")
                     if any(f"epoch/loss_{o}" in r.scalars for r in rs)]
            prefix, xlabel = "epoch/loss_", "pretraining epoch"
        if not names:
            notes.append(f"pretraining losses ({dataset}): no loss scalars")
            continue
        arms = _by_arm(rs)
        colors = _colors(arms)
        ncol = min(3, len(names))
        nrow = math.ceil(len(names) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 3.4 * nrow), squeeze=False)
        for k, name in enumerate(names):
            ax = axes[k // ncol][k % ncol]
            lows, highs = [], []
            for arm, group in arms.items():
                if name in group[0].removed:
                    continue  # weight 0: the objective is not trained (its tag may log 0)
                curves = [_smooth(r.curve(prefix + name)) for r in group
                          if prefix + name in r.scalars]
                if not curves:
                    continue
                xs, mean, lo, hi = _mean_band(curves)
                lows.append(min(lo))
                highs.append(max(hi))
                ax.plot(xs, mean, color=colors[arm], label=arm, lw=1.2)
                ax.fill_between(xs, lo, hi, color=colors[arm], alpha=0.2, linewidth=0)
            # Log scale only where it helps: positive values spanning more than a decade.
            use_log = bool(lows) and min(lows) > 0 and max(highs) / min(lows) > 10
            if use_log:
                ax.set_yscale("log")
            ax.set_title(f"{name.upper() if name != 'total' else 'weighted total'} loss")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("loss per sample" + (" (log scale)" if use_log else ""))
        for k in range(len(names), nrow * ncol):
            axes[k // ncol][k % ncol].axis("off")
        handles, labels = [], []
        for ax in axes.flat:  # the union of arms, some of which skip an objective
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        fig.suptitle(f"{dataset}: pretraining losses (mean over seeds, band: 95% interval)")
        if len(names) < nrow * ncol:  # an empty panel holds the legend
            axes[-1][-1].legend(handles, labels, loc="center", title="arm")
            fig.tight_layout()
        else:
            fig.tight_layout(rect=(0, 0.08, 1, 1))
            fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)))
        stem = _save(fig, out, f"pretrain_losses_{_tag(dataset, 'pretrain')}")
        figs.append(Figure(f"Pretraining loss per objective ({dataset})", stem,
                           f"Unweighted per-objective losses as logged ({prefix}<name>), "
                           f"trailing mean over 1/{SMOOTH_POINTS} of each curve; the total is "
                           f"the weighted sum. Arms with an objective's weight at 0 are left out "
                           f"of its panel. Log scale where the values span more than a decade."))
    return figs, notes


# ---------------------------------------------------------------- (f) ours against the paper

def vs_paper(runs: list[Run], out: Path) -> tuple[list[Figure], list[str]]:
    figs, notes = [], []
    for (dataset, protocol), fts in _done_finetunes(runs).items():
        metrics, refs = reference_for(dataset, protocol)
        if not refs:
            notes.append(f"ours against the paper ({dataset}, {protocol}): the paper reports no "
                         f"numbers for this dataset and protocol")
            continue
        arms = _by_arm(fts)
        series = {f"ours: {a} (n={len(rs)})": {m: _stats(_metric_values(rs, m))
                                               for m in metrics if _metric_values(rs, m)}
                  for a, rs in arms.items()}
        series.update({k: {m: (v[m], v[m], v[m]) for m in metrics} for k, v in refs.items()})
        names = list(series)
        colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
        fig, ax = plt.subplots(figsize=(max(7.0, 0.35 * len(names) * len(metrics) + 2), 4.2))
        width = 0.8 / len(names)
        for i, n in enumerate(names):
            xs, ys, err = [], [], [[], []]
            for j, m in enumerate(metrics):
                if m in series[n]:
                    mean, lo, hi = series[n][m]
                    xs.append(j + (i - (len(names) - 1) / 2) * width)
                    ys.append(mean)
                    err[0].append(mean - lo)
                    err[1].append(hi - mean)
            ours = n.startswith("ours")
            ax.bar(xs, ys, width, yerr=err if ours else None, capsize=2, color=colors[n],
                   hatch=None if ours else "//", edgecolor="white", label=n)
        ax.set_xticks(range(len(metrics)), metrics)
        ax.set_ylabel(f"test metric ({protocol})")
        ax.set_title(f"{dataset}: ours (mean, 95% interval over seeds) and published numbers")
        ax.legend(loc="upper left", ncol=2)
        ax.set_ylim(0, 1.3 * max(v[0] for s in series.values() for v in s.values()))
        fig.tight_layout()
        stem = _save(fig, out, f"vs_paper_{_tag(dataset, protocol)}")
        figs.append(Figure(f"Ours against the paper ({dataset}, {protocol})", stem,
                           "Hatched: published (analysis/paper_numbers.py cites the source)."))
    return figs, notes


GRID_FIGURES = (metric_vs_rank, params_vs_metric, learning_curves, ablation_bars,
                pretrain_losses, vs_paper)


def all_grid_figures(runs: list[Run], out: Path) -> tuple[list[Figure], list[str]]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figs, notes = [], []
    for fn in GRID_FIGURES:
        f, n = fn(runs, out)
        figs += f
        notes += n
    return figs, notes
