"""The report per attribute field: a field's head rank against the test metrics, removing a
field's AAP or MAP, and the per-field heads of the model anatomy.

A dataset of several attribute fields (s3rec/data/fields.py) gives each field its own AAP and MAP
head (s3rec/model/field_heads.py), set by model.fields.<field>.<aap|map>.{kind, rank, weight}
(s3rec/config.py). A fine-tune's field heads are read from the config of the pretraining it
started from (its run.json), resolved as training resolves them (`Config.field_head`:
model.heads, the variant, rank 0 = model.head_rank), so whatever set them counts - a grid axis,
an override, a YAML - and so do runs off the launcher's folder layout. A field's objective is
removed where the field's weight is 0 while pretrain.weights.<objective> is not (a weight of 0
there removes it for every field: the grid's ablation figure).

- field_rank_<field>_<objective>_<dataset>_<protocol>: test metrics against the rank of one
  field's head, where finished fine-tunes differ in it other than through the grid's rank axis
  (metric_vs_rank draws that one); a line per setting of everything else, seeds pooled; runs
  whose head is full rank as horizontal lines.
- field_ablation_<field>_<dataset>_<protocol>: a bar per setting of the field's weights, beside
  the same settings otherwise, where one of them is 0.
Spread over seeds: the 95% Student-t interval of the mean (s3rec.analysis.stats), as in
s3rec.analysis.figures.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from s3rec.analysis.figures import (Figure, _colors, _done_finetunes, _headline, _save, _stats,
                                    _tag, metric_bars, plt)
from s3rec.analysis.read_runs import Run
from s3rec.config import (FIELD_OBJECTIVES, NO_RESULT_KEYS, ConfigError, config_from_dict,
                          flat_keys)

_TABLE = "attribute_embeddings_"     # a multi-field model's tables: attribute_embeddings_<field>


@dataclass(frozen=True)
class FieldHead:
    """One field's AAP or MAP head in one pretraining."""
    field: str
    objective: str              # aap | map
    rank: str                   # "full", or the low-rank head's rank as text
    weight: float               # the field's factor: model.fields.<field>.<objective>.weight
    objective_weight: float     # pretrain.weights.<objective>

    @property
    def removed(self) -> bool:
        """Left out by the field's own weight (not by the objective's, which removes it for
        every field)."""
        return self.weight == 0 and self.objective_weight > 0


@dataclass
class FieldRun:
    """A finished fine-tune of a multi-field dataset and its pretraining's field heads."""
    run: Run
    pretrain: Run
    heads: dict                 # (field, objective) -> FieldHead
    settings: dict              # key -> JSON text: every setting that may change a result but
                                #   the seed (field heads resolved, the fine-tune's own finetune.*)


def rank_key(field: str, objective: str) -> str:
    return f"model.fields.{field}.{objective}.rank"


def weight_key(field: str, objective: str) -> str:
    return f"model.fields.{field}.{objective}.weight"


def run_fields(pre: Run) -> tuple[str, ...]:
    """The attribute fields of a pretraining, from its model's tables (run.json params:
    attribute_embeddings_<field>, in the dataset's order); () for a one-field model."""
    return tuple(k[len(_TABLE):] for k in (pre.run_json.get("params") or {})
                 if k.startswith(_TABLE))


def field_heads(cfg, fields) -> dict[tuple[str, str], FieldHead]:
    out = {}
    for f in fields:
        for o in FIELD_OBJECTIVES:
            h = cfg.field_head(f, o)
            out[(f, o)] = FieldHead(f, o, "full" if h.kind == "full" else str(h.rank),
                                    float(h.weight), float(getattr(cfg.pretrain.weights, o)))
    return out


def _settings(cfg, ft: Run, heads: dict) -> dict[str, str]:
    """The pretraining's flat config with its heads resolved (model.heads.aap / map and
    model.head_rank are in the field heads now), the fine-tune's finetune.* and init epochs."""
    def keep(k: str) -> bool:
        return k != "seed" and not k.startswith(("model.fields.", "model.heads.", "model.head_rank",
                                                 "finetune.", *NO_RESULT_KEYS))
    flat = {k: v for k, v in flat_keys(cfg.to_dict()).items() if keep(k)}
    flat.update({k: v for k, v in flat_keys(ft.run_json["config"]).items()
                 if k.startswith("finetune.") and not k.startswith(NO_RESULT_KEYS)})
    for n in ("mip", "sp"):
        flat.update({f"model.heads.{n}.{k}": v for k, v in dataclasses.asdict(cfg.head(n)).items()})
    for (f, o), h in heads.items():
        full = cfg.field_head(f, o)
        flat.update({f"model.fields.{f}.{o}.{k}": v for k, v in dataclasses.asdict(full).items()
                     if k not in ("kind", "rank")})
        flat[rank_key(f, o)] = int(h.rank) if h.rank.isdigit() else h.rank
    flat["init_epochs"] = ft.init.get("init_epochs", "")
    return {k: json.dumps(v, sort_keys=True) for k, v in flat.items()}


def field_runs(runs: list[Run]) -> list[FieldRun]:
    """The finished fine-tunes whose pretraining (the run its --init came from, else its cell's)
    is a model of several attribute fields; others are left out."""
    pre_by_path = {r.path.resolve(): r for r in runs if r.stage == "pretrain"}
    pre_by_cell = {r.cell: r for r in runs if r.stage == "pretrain"}
    out = []
    for r in runs:
        if r.stage != "finetune" or r.status != "done":
            continue
        init = r.run_json.get("init")
        pre = pre_by_path.get(Path(str(init)).resolve().parent) if init else None
        pre = pre or pre_by_cell.get(r.cell)
        fields = run_fields(pre) if pre else ()
        if len(fields) < 2:
            continue
        try:
            cfg = config_from_dict(pre.run_json["config"])
        except ConfigError:      # not from read_runs, which refuses it naming the file
            continue
        heads = field_heads(cfg, fields)
        out.append(FieldRun(r, pre, heads, _settings(cfg, r, heads)))
    return out


def _short(key: str) -> str:
    return key.removeprefix("model.fields.")


def line_labels(groups: list[dict], max_keys: int = 3) -> list[str]:
    """A label per settings group that tells it from the others: the keys that differ, or a
    hash of the settings where more than `max_keys` do."""
    names = sorted({k for g in groups for k in g if len({h.get(k) for h in groups}) > 1})
    if not names:
        return ["" for _ in groups]
    if len(names) > max_keys:
        return ["settings " + hashlib.sha1(json.dumps(g, sort_keys=True).encode()).hexdigest()[:8]
                for g in groups]
    return [", ".join(f"{_short(n)}={g.get(n, '-')}" for n in names) for g in groups]


def _group(frs: list[FieldRun], drop: set[str]) -> list[tuple[dict, list[FieldRun]]]:
    """(settings, runs) per setting of everything but the keys in `drop` and the seed."""
    by: dict[str, list[FieldRun]] = {}
    for fr in frs:
        rest = {k: v for k, v in fr.settings.items() if k not in drop}
        by.setdefault(json.dumps(rest, sort_keys=True), []).append(fr)
    return [(json.loads(k), by[k]) for k in sorted(by)]


def _labelled(groups: list[tuple[dict, list[FieldRun]]]) -> list[tuple[str, list[FieldRun]]]:
    """(label, runs): each group named by what tells it from the others shown beside it."""
    labels = line_labels([g for g, _ in groups])
    return [(lab or "all runs", rs) for lab, (_, rs) in zip(labels, groups)]


def _values(frs: list[FieldRun], metric: str) -> list[float]:
    return [fr.run.test_metrics()[metric] for fr in frs if metric in fr.run.test_metrics()]


# ---------------------------------------------------------------- metric against a field's rank

def rank_sweeps(frs: list[FieldRun]) -> list[tuple[str, str]]:
    """(field, objective) whose head rank differs between runs that train it, other than as the
    run's rank axis (the rank of model.heads) does."""
    out = []
    for key in sorted({k for fr in frs for k in fr.heads}):
        on = [fr for fr in frs if not fr.heads[key].removed]
        ranks = {fr.heads[key].rank for fr in on}
        if (len(ranks) > 1 and any(x.isdigit() for x in ranks)
                and any(fr.heads[key].rank != fr.run.rank for fr in on)):
            out.append(key)
    return out


def rank_lines(frs: list[FieldRun], field: str, objective: str
               ) -> dict[str, dict[str, list[FieldRun]]]:
    """The rank figure's data: line label -> the head's rank ("full" or digits) -> its runs (the
    seeds pooled), over the runs that train the head."""
    key = (field, objective)
    on = [fr for fr in frs if not fr.heads[key].removed]
    out: dict[str, dict[str, list[FieldRun]]] = {}
    for lab, group in _labelled(_group(on, {rank_key(field, objective)})):
        for fr in group:
            out.setdefault(lab, {}).setdefault(fr.heads[key].rank, []).append(fr)
    return out


def field_rank_figure(frs: list[FieldRun], field: str, objective: str, out: Path,
                      dataset: str, protocol: str) -> Figure:
    lines = rank_lines(frs, field, objective)
    on = [fr for by_rank in lines.values() for rs in by_rank.values() for fr in rs]
    metrics = _headline([fr.run for fr in on])
    colors = _colors(lines)
    ranks = sorted({int(x) for by_rank in lines.values() for x in by_rank if x.isdigit()})
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.4 * len(metrics), 4.2), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for lab, by_rank in lines.items():
            xs = sorted(int(x) for x in by_rank if x.isdigit())
            st = [_stats(_values(by_rank[str(x)], m)) for x in xs]
            if xs:
                seeds = ", ".join(f"r{x}: {len(by_rank[str(x)])}" for x in xs)
                ax.plot(xs, [s[0] for s in st], "o-", color=colors[lab],
                        label=f"{lab} (seeds {seeds})")
                ax.fill_between(xs, [s[1] for s in st], [s[2] for s in st], color=colors[lab],
                                alpha=0.2, linewidth=0)
            if by_rank.get("full") and (vals := _values(by_rank["full"], m)):
                mean, lo, hi = _stats(vals)
                ax.axhline(mean, color=colors[lab], ls="--",
                           label=f"{lab} (full rank, {len(vals)} seeds)")
                ax.axhspan(lo, hi, color=colors[lab], alpha=0.12, linewidth=0)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(x) for x in ranks])
        ax.minorticks_off()
        ax.set_xlabel(f"rank of field {field}'s {objective.upper()} head (log scale)")
        ax.set_ylabel(f"test {m} ({protocol})")
        ax.set_title(f"{dataset}: test {m} against {field} {objective.upper()} rank")
    axes[0][0].legend(loc="best")
    fig.tight_layout()
    stem = _save(fig, out, f"field_rank_{field}_{objective}_{_tag(dataset, protocol)}")
    return Figure(f"Test metric against the rank of field {field}'s {objective.upper()} head "
                  f"({dataset}, {protocol})", stem,
                  f"x: {rank_key(field, objective)} as the pretraining resolved it. Line: mean "
                  f"over seeds; band: its 95% interval; one line per setting of the other keys. "
                  f"Horizontal lines: that head at full rank.")


# ---------------------------------------------------------------- removing a field's objectives

def _state_label(fr: FieldRun, field: str) -> str:
    heads = [fr.heads[(field, o)] for o in FIELD_OBJECTIVES]
    gone = [h.objective.upper() for h in heads if h.removed]
    odd = [f"{h.objective.upper()}x{h.weight:g}" for h in heads if not h.removed and h.weight != 1]
    text = f"w/o {field} {'+'.join(gone)}" if gone else f"{field}: all objectives"
    return text + (f" ({', '.join(odd)})" if odd else "")


def ablated_fields(frs: list[FieldRun]) -> list[str]:
    return sorted({f for fr in frs for (f, _), h in fr.heads.items() if h.removed})


def ablation_bars(frs: list[FieldRun], field: str) -> list[tuple[str, list[FieldRun]]]:
    """The ablation figure's data: (bar label, runs) for each setting of the field's weights,
    grouped by the other settings, in the groups where one of the field's objectives is
    removed; the setting with the field's objectives on first."""
    weights = {weight_key(field, o) for o in FIELD_OBJECTIVES}
    bars = []
    groups = [(g, rs) for g, rs in _group(frs, weights)    # those with a removal to compare
              if any(fr.heads[(field, o)].removed for fr in rs for o in FIELD_OBJECTIVES)]
    for lab, group in _labelled(groups):
        states = defaultdict(list)
        for fr in group:
            states[_state_label(fr, field)].append(fr)
        for state in sorted(states, key=lambda s: (s.startswith("w/o"), s)):
            bars.append((state if lab == "all runs" else f"{lab}\n{state}", states[state]))
    return bars


def field_ablation_figure(frs: list[FieldRun], field: str, out: Path, dataset: str,
                          protocol: str) -> Figure:
    bars = ablation_bars(frs, field)
    metrics = _headline([fr.run for fr in frs])
    colors = _colors(metrics)
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.7 * len(bars) + 2), 4.4))
    metric_bars(ax, [group for _, group in bars], metrics, colors, width, _values,
                [lab for lab, _ in bars], f"test metric ({protocol})",
                f"{dataset}: removing field {field}'s pretraining objectives", tick_size=8)
    fig.tight_layout()
    stem = _save(fig, out, f"field_ablation_{field}_{_tag(dataset, protocol)}")
    return Figure(f"Ablation of field {field}'s AAP and MAP ({dataset}, {protocol})", stem,
                  f"Bar: mean over seeds; whisker: its 95% interval. 'w/o {field} X': "
                  f"{weight_key(field, 'x')} = 0 in the pretraining's run.json config; beside it "
                  f"the runs of the same other settings.")


# ---------------------------------------------------------------- all of them, and the report

def all_field_figures(runs: list[Run], out: Path) -> tuple[list[Figure], list[str]]:
    """Every per-field figure under `out`, and notes on what was not drawn; nothing at all for
    grids without a dataset of several attribute fields."""
    out = Path(out)
    frs = field_runs(runs)
    figs, notes = [], []
    by_group = defaultdict(list)
    for fr in frs:
        by_group[(fr.run.dataset, str(fr.run.run_json.get("protocol", "")))].append(fr)
    if by_group:
        out.mkdir(parents=True, exist_ok=True)
    for (dataset, protocol), group in sorted(by_group.items()):
        sweeps, ablated = rank_sweeps(group), ablated_fields(group)
        figs += [field_rank_figure(group, f, o, out, dataset, protocol) for f, o in sweeps]
        figs += [field_ablation_figure(group, f, out, dataset, protocol) for f in ablated]
        if not sweeps:
            notes.append(f"field rank ({dataset}, {protocol}): no field's AAP or MAP head rank "
                         f"differs between finished fine-tunes")
        if not ablated:
            notes.append(f"field ablation ({dataset}, {protocol}): no finished fine-tune whose "
                         f"pretraining set a field's weight to 0")
    return figs, notes


def fields_section(runs: list[Run], out: Path) -> str:
    """The report's per-field figures (under out/figures), or "" without multi-field runs."""
    from s3rec.analysis.report import _figure_md
    figs, notes = all_field_figures(runs, out / "figures")
    if not figs and not notes:
        return ""
    text = "\n".join(_figure_md(f) for f in figs)
    if notes:
        text += "\nFigures not drawn:\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    return text


def pretrain_field_heads(pre: Run) -> dict[tuple[str, str], FieldHead]:
    """The field heads of a pretraining of several fields; {} for one field."""
    fields = run_fields(pre)
    if len(fields) < 2:
        return {}
    try:
        return field_heads(config_from_dict(pre.run_json["config"]), fields)
    except ConfigError:
        return {}


def field_heads_partial(pre: Run) -> tuple[bool, bool]:
    """(a field objective removed, a field head low-rank) in a pretraining: what keeps it from
    showing every head trained at full rank."""
    heads = pretrain_field_heads(pre).values()
    return (any(h.removed or h.objective_weight == 0 for h in heads),
            any(h.rank != "full" for h in heads))


def anatomy_checkpoint(runs: list[Run]) -> Path | None:
    """A finished multi-field pretraining's final.pt: preferably one with a low-rank field head
    and none of its field objectives removed (a removed head stays at its init)."""
    picks = []
    for r in runs:
        if (r.stage == "pretrain" and r.status == "done" and pretrain_field_heads(r)
                and (r.path / "final.pt").is_file()):
            gone, low = field_heads_partial(r)
            picks.append(((gone, not low, str(r.path)), r.path / "final.pt"))
    return min(picks)[1] if picks else None


def field_anatomy_section(runs: list[Run], out: Path) -> str:
    """The per-field heads of the model anatomy (s3rec.analysis.anatomy.field_heads_figure) for
    the checkpoint `anatomy_checkpoint` picks, or "" where there is none."""
    from s3rec.analysis.anatomy import field_heads_figure
    from s3rec.analysis.report import _figure_md, _md_table
    from s3rec.model import read_state_dict
    ckpt = anatomy_checkpoint(runs)
    if ckpt is None:
        return ""
    (out / "figures").mkdir(parents=True, exist_ok=True)
    facts = field_heads_figure(read_state_dict(ckpt), out / "figures" / "field_heads",
                               f"heads per attribute field of {ckpt}")
    rows = [[h.field, h.objective.upper(), f"{h.head}_norm",
             "full" if h.rank is None else f"rank {h.rank}", f"{h.params:,}",
             f"{h.singular[0]:.3g}", f"{h.singular[(h.rank or len(h.singular)) - 1]:.3g}"]
            for h in facts]
    return (_figure_md(Figure("Heads per attribute field", "figures/field_heads",
                              f"Checkpoint `{ckpt}`. Left: parameters of each field's AAP and MAP "
                              f"head, counted on the saved tensors. Right: singular values of "
                              f"each head's W (U Vᵀ for a low-rank head: its r non-zero values; "
                              f"full heads dashed)."))
            + "\n" + _md_table(["field", "objective", "module", "head", "parameters", "s_max",
                                "s_min"], rows) + "\n")
