"""Model-anatomy figures, computed from the real model classes (s3rec.model), not from a drawing.

- architecture: boxes and arrows labelled with the dimensions of a built S3RecModel;
- attention masks: the additive masks of s3rec.model.encoder.attention_bias for a left-padded
  example (bidirectional in pretraining, causal in fine-tuning);
- low-rank heads: W = U V^T and the parameters of one head at each rank, counted on real heads;
- parameter breakdown per layer (stacked bars), full rank and ranks 8/16/32, at two sizes.
- heads per attribute field: each field's AAP and MAP head of a trained model of several
  fields (parameters; singular values, the r of a low-rank head), labelled by field.

Sizes (item_size = items + 2: padding 0 and mask_id; attribute_size = attributes + 1):
- released Beauty data: 12,101 items and 637 attributes -> item_size 12,103, attribute_size 638
  (the shapes of the authors' Beauty-epochs-150.pt);
- the sizes the paper states: 12,102 items and 1,221 attributes -> item_size
  12,104, attribute_size 1,222.
Both with hidden 64, 2 layers, 2 attention heads, length 50 (the defaults of s3rec.config).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch, Rectangle  # noqa: E402

from s3rec.analysis.atomic import save_figure, write_csv  # noqa: E402
from s3rec.config import FIELD_OBJECTIVES, HEAD_NAMES, HeadConfig, load_config  # noqa: E402
from s3rec.model import S3RecModel, build_model, make_head  # noqa: E402
from s3rec.model.encoder import attention_bias  # noqa: E402
from s3rec.model.field_heads import field_head_name, fields_of_state  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    label: str
    item_size: int
    attribute_size: int


RELEASED_BEAUTY = Sizes("released Beauty data (12,101 items, 637 attributes)", 12_103, 638)
PAPER_BEAUTY = Sizes("paper's stated sizes (12,102 items, 1,221 attributes)", 12_104, 1_222)
BREAKDOWN_RANKS = (None, 8, 16, 32)   # None = full rank (variant s3rec)


def model_for(rank: int | None, sizes: Sizes, overrides: tuple[str, ...] = ()) -> S3RecModel:
    """The real model: variant s3rec (rank None) or s3rec-lowrank at `rank`."""
    over = ["variant=s3rec"] if rank is None else ["variant=s3rec-lowrank",
                                                   f"model.head_rank={rank}"]
    cfg = load_config(None, [*over, *overrides])
    return build_model(cfg, sizes.item_size, sizes.attribute_size)


# ---------------------------------------------------------------- parameter breakdown

def breakdown(model: S3RecModel) -> dict[str, int]:
    """Parameters per part, in drawing order: embeddings, input LayerNorm, each encoder layer
    (attention and FFN), each head."""
    parts: dict[str, int] = {}
    for name, p in model.named_parameters():
        bits = name.split(".")
        if bits[0] == "item_encoder":      # item_encoder.layer.{i}.{attention|intermediate}...
            block = "attention" if bits[3] == "attention" else "FFN"
            key = f"layer {bits[2]} {block}"
        elif bits[0].endswith("_norm"):
            key = f"{bits[0][:-5].upper()} head"
        else:
            key = bits[0].replace("_", " ")
        parts[key] = parts.get(key, 0) + p.numel()
    return parts


def breakdown_table(sizes_list=(RELEASED_BEAUTY, PAPER_BEAUTY), ranks=BREAKDOWN_RANKS,
                    overrides: tuple[str, ...] = ()) -> list[dict]:
    rows = []
    for sizes in sizes_list:
        for r in ranks:
            m = model_for(r, sizes, overrides)
            parts = breakdown(m)
            assert sum(parts.values()) == m.param_counts()["total"]
            rows.append({"sizes": sizes.label, "item_size": sizes.item_size,
                         "attribute_size": sizes.attribute_size,
                         "heads": "full" if r is None else f"AAP/MAP rank {r}",
                         "parts": parts, "total": sum(parts.values())})
    return rows


def write_breakdown_csv(rows: list[dict], path: Path) -> None:
    parts = list(dict.fromkeys(k for r in rows for k in r["parts"]))
    flat = [{**{k: v for k, v in r.items() if k != "parts"}, **r["parts"]} for r in rows]
    write_csv(path, flat, ["sizes", "item_size", "attribute_size", "heads", *parts, "total"])


def breakdown_figure(rows: list[dict], out_stem: Path) -> None:
    sizes = list(dict.fromkeys(r["sizes"] for r in rows))
    parts = list(dict.fromkeys(k for r in rows for k in r["parts"]))
    cmap = plt.get_cmap("tab20")
    colors = {p: cmap(i % 20) for i, p in enumerate(parts)}
    fig, axes = plt.subplots(len(sizes), 2, figsize=(12, 3.6 * len(sizes)), squeeze=False)
    for i, s in enumerate(sizes):
        rs = [r for r in rows if r["sizes"] == s]
        labels = [r["heads"].replace("AAP/MAP rank ", "rank ") for r in rs]
        for j, (ax, keep) in enumerate(((axes[i][0], parts),
                                        (axes[i][1], [p for p in parts if "embeddings" not in p]))):
            bottom = [0] * len(rs)
            for p in keep:
                vals = [r["parts"].get(p, 0) for r in rs]
                ax.bar(labels, vals, bottom=bottom, color=colors[p], label=p, width=0.6)
                bottom = [b + v for b, v in zip(bottom, vals)]
            for x, b in enumerate(bottom):
                ax.text(x, b, f"{b:,}", ha="center", va="bottom", fontsize=8)
            ax.set_ylabel("parameters (count)")
            ax.set_xlabel("pretraining heads (rank of AAP and MAP)")
            ax.ticklabel_format(axis="y", style="plain")
            ax.margins(y=0.12)
            which = "all parameters" if j == 0 else "without embedding tables"
            ax.set_title(f"{s}:\n{which}", fontsize=9.5)
    handles = [Patch(color=colors[p], label=p) for p in parts]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8.5)
    fig.tight_layout()
    save_figure(fig, out_stem)
    plt.close(fig)


# ---------------------------------------------------------------- low-rank heads

def head_param_counts(d: int, ranks) -> list[tuple[int, int, int]]:
    """(rank, low-rank head parameters, full head parameters) counted on real heads; they equal
    2 d r + d and d d + d."""
    full = sum(p.numel() for p in make_head(HeadConfig(kind="full"), d).parameters())
    out = []
    for r in ranks:
        low = make_head(HeadConfig(kind="lowrank", rank=r), d)
        out.append((r, sum(p.numel() for p in low.parameters()), full))
    return out


def lowrank_figure(d: int, out_stem: Path, mark=(4, 8, 16, 32)) -> list[tuple[int, int, int]]:
    counts = head_param_counts(d, range(1, d + 1))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1.1, 1]})
    # Left: the shapes, to scale, for r = d/4.
    r = max(1, d // 4)
    unit = 2.0 / d
    a1.add_patch(Rectangle((0, 0), d * unit, d * unit, fc="tab:blue", alpha=0.5))
    a1.text(d * unit / 2, d * unit / 2, f"W\n{d}×{d}", ha="center", va="center")
    a1.text(d * unit + 0.25, d * unit / 2, "=", fontsize=18, va="center", ha="center")
    x0 = d * unit + 0.5
    a1.add_patch(Rectangle((x0, 0), r * unit, d * unit, fc="tab:orange", alpha=0.6))
    a1.text(x0 + r * unit / 2, -0.12, f"U\n{d}×{r}", ha="center", va="top")
    a1.text(x0 + r * unit + 0.2, d * unit / 2, "×", fontsize=16, va="center", ha="center")
    x1 = x0 + r * unit + 0.4
    a1.add_patch(Rectangle((x1, d * unit - r * unit), d * unit, r * unit, fc="tab:green",
                           alpha=0.6))
    a1.text(x1 + d * unit / 2, d * unit - r * unit - 0.08, f"Vᵀ  {r}×{d}", ha="center", va="top")
    a1.text(0, -0.55, f"head(h) = W h + b = U (Vᵀ h) + b, shown for r = {r}\n"
                      f"full: d·d + d = {d * d + d:,} parameters; "
                      f"low-rank: 2·d·r + d = {2 * d * r + d:,}", fontsize=9, va="top")
    a1.set_xlim(-0.1, x1 + d * unit + 0.1)
    a1.set_ylim(-1.0, d * unit + 0.1)
    a1.set_aspect("equal")
    a1.axis("off")
    a1.set_title("Low-rank head: W = U Vᵀ")
    # Right: parameters of one head against rank.
    ranks = [c[0] for c in counts]
    a2.plot(ranks, [c[1] for c in counts], label="low-rank head: 2·d·r + d")
    a2.axhline(counts[0][2], color="k", ls="--", label=f"full head: d·d + d = {counts[0][2]:,}")
    for m in mark:
        if m <= d:
            n = counts[m - 1][1]
            a2.plot([m], [n], "o", color="tab:orange")
            a2.annotate(f"r={m}: {n:,}", (m, n), textcoords="offset points", xytext=(6, -12),
                        fontsize=8)
    a2.axvline(d / 2, color="gray", lw=0.8, ls=":")
    a2.text(d / 2, counts[0][2] * 0.55, " break-even r = d/2", fontsize=8, color="gray")
    a2.set_xlabel(f"rank r (d = {d})")
    a2.set_ylabel("parameters of one head (count)")
    a2.set_title("Head parameters against rank (counted on real heads)")
    a2.legend(loc="upper left")
    fig.tight_layout()
    save_figure(fig, out_stem)
    plt.close(fig)
    return counts


# ---------------------------------------------------------------- heads per attribute field

@dataclass(frozen=True)
class FieldHeadFacts:
    field: str
    objective: str           # aap | map
    head: str                # the head's name (its parameters: <head>_norm.*)
    rank: int | None         # r of a low-rank head (U is d x r); None: a full head
    params: int              # the head's parameters (matrix or factors, and bias)
    singular: tuple          # singular values of W (U V^T for a low-rank head), descending

    @property
    def label(self) -> str:
        kind = "full" if self.rank is None else f"rank {self.rank}"
        return f"{self.field} {self.objective.upper()} ({kind})"


def field_head_facts(state) -> list[FieldHeadFacts]:
    """Each attribute field's AAP and MAP head of a state dict, field by field (the dataset's
    order). ValueError for a one-field state: its heads are the plain aap / map."""
    from s3rec.analysis.lowrank import head_matrix
    fields = fields_of_state(state)
    if fields is None:
        raise ValueError("the state dict has one attribute field (attribute_embeddings.weight): "
                         "no per-field heads")
    out = []
    for f in fields:
        for o in FIELD_OBJECTIVES:
            name = field_head_name(fields, f.name, o)
            prefix = f"{name}_norm."
            u = state.get(prefix + "U")
            w, _ = head_matrix(state, name)
            out.append(FieldHeadFacts(
                f.name, o, name, None if u is None else int(u.shape[1]),
                sum(int(v.numel()) for k, v in state.items() if k.startswith(prefix)),
                tuple(torch.linalg.svdvals(w).tolist())))
    return out


def field_heads_figure(state, out_stem: Path, title: str) -> list[FieldHeadFacts]:
    """Parameters of every field's AAP and MAP head (bars grouped by field) and their singular
    values (a low-rank head: its r non-zero ones; full heads dashed, for reference)."""
    facts = field_head_facts(state)
    fields = list(dict.fromkeys(h.field for h in facts))
    field_color = {f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(fields)}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11.5, 4.2))
    width = 0.8 / len(FIELD_OBJECTIVES)
    for j, o in enumerate(FIELD_OBJECTIVES):
        for i, f in enumerate(fields):
            h = next(x for x in facts if x.field == f and x.objective == o)
            x = i + (j - (len(FIELD_OBJECTIVES) - 1) / 2) * width
            a1.bar(x, h.params, width, color=field_color[f], hatch="//" if o == "map" else None,
                   edgecolor="white")
            a1.text(x, h.params, f"{o.upper()}\n{'full' if h.rank is None else f'r={h.rank}'}"
                                 f"\n{h.params:,}", ha="center", va="bottom", fontsize=8)
    a1.set_xticks(range(len(fields)), [f"field {f}" for f in fields])
    a1.set_ylabel("parameters of the head (count)")
    a1.set_title("AAP (plain) and MAP (hatched) head of each field")
    a1.margins(y=0.25)
    for h in facts:
        n = len(h.singular) if h.rank is None else h.rank
        a2.plot(range(1, n + 1), h.singular[:n], color=field_color[h.field],
                ls="--" if h.rank is None else "-", lw=1 if h.rank is None else 2,
                marker="o" if h.objective == "aap" else "s", ms=3, label=h.label)
    a2.set_yscale("log")
    a2.set_xlabel("index i (descending)")
    a2.set_ylabel("singular value s_i of W (log scale)")
    a2.set_title("Spectrum of each field's heads (low-rank: its r values)")
    a2.legend(loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, out_stem)
    plt.close(fig)
    return facts


# ---------------------------------------------------------------- attention masks

EXAMPLE_ITEMS = (0, 0, 0, 17, 4, 91, 23, 8)   # a left-padded sequence of 5 items (L = 8)


def masks(items=EXAMPLE_ITEMS) -> dict[str, torch.Tensor]:
    """The model's own additive masks for one sequence, as [L, L] (query, key)."""
    x = torch.tensor([items])                                           # [1, L]
    L = x.shape[1]
    bidir = attention_bias(x, causal=False, dtype=torch.float32)       # [1, 1, 1, L]
    causal = attention_bias(x, causal=True, dtype=torch.float32)       # [1, 1, L, L]
    return {"pretraining (bidirectional)": bidir[0, 0].expand(L, L),
            "fine-tuning (causal)": causal[0, 0]}


def masks_figure(out_stem: Path, items=EXAMPLE_ITEMS) -> dict[str, torch.Tensor]:
    ms = masks(items)
    labels = [f"{i}\n{'pad' if v == 0 else v}" for i, v in enumerate(items)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for ax, (title, m) in zip(axes, ms.items()):
        masked = (m < 0).float()
        ax.imshow(masked, cmap="Greys", vmin=0, vmax=1.6)
        value = m.min().item()
        for q in range(m.shape[0]):   # the value in each visible cell; masked cells are grey
            for k in range(m.shape[1]):
                if m[q, k] == 0:
                    ax.text(k, q, "0", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(items)), labels, fontsize=8)
        ax.set_yticks(range(len(items)), labels, fontsize=8)
        ax.set_xlabel("key: position / item id")
        ax.set_ylabel("query: position / item id")
        ax.set_title(f"{title}\nadded to the scores: 0 = visible (white), "
                     f"{value:.0e} = masked (grey)", fontsize=9.5)
    fig.suptitle("Attention masks from s3rec.model.encoder.attention_bias "
                 f"(left-padded example, L = {len(items)})", fontsize=10)
    fig.text(0.5, 0.01, "Fine-tuning rows of padding queries see no key; their outputs never "
                        "reach a loss or a score.", ha="center", fontsize=8.5)
    fig.tight_layout()
    save_figure(fig, out_stem)
    plt.close(fig)
    return ms


# ---------------------------------------------------------------- architecture diagram

def _shape(model: S3RecModel, name: str) -> str:
    p = dict(model.named_parameters())[name]
    return "×".join(str(s) for s in p.shape)


def architecture_facts(model: S3RecModel) -> dict:
    """The dimensions the diagram shows, read from the instance (not from the config)."""
    layer0 = model.item_encoder.layer[0]
    ffn = layer0.intermediate
    heads = {}
    for n in HEAD_NAMES:
        h = model.head(n)
        heads[n] = (f"W {_shape(model, f'{n}_norm.weight')}" if hasattr(h, "weight") and
                    isinstance(getattr(h, "weight"), torch.nn.Parameter)
                    else f"U {_shape(model, f'{n}_norm.U')}, V {_shape(model, f'{n}_norm.V')}")
    return {
        "item_emb": _shape(model, "item_embeddings.weight"),
        "attr_emb": _shape(model, "attribute_embeddings.weight"),
        "pos_emb": _shape(model, "position_embeddings.weight"),
        "d": model.item_embeddings.weight.shape[1],
        "L": model.position_embeddings.weight.shape[0],
        "layers": len(model.item_encoder.layer),
        "attn_heads": layer0.attention.num_heads, "head_size": layer0.attention.head_size,
        "ffn": "→".join(str(n) for n in (ffn.dense_1.in_features, ffn.dense_1.out_features,
                                          ffn.dense_2.out_features)),
        "heads": heads, "total": model.param_counts()["total"],
    }


def _box(ax, x, y, w, h, text, color):
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02",
                                fc=color, ec="k", lw=0.8, alpha=0.9))
    ax.text(x, y, text, ha="center", va="center", fontsize=8.5)


def _arrow(ax, a, b):
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=10, lw=0.9, color="k"))


def architecture_figure(model: S3RecModel, out_stem: Path, title: str) -> dict:
    f = architecture_facts(model)
    fig, ax = plt.subplots(figsize=(12, 7.2))
    ax.set_xlim(0, 12)
    ax.set_ylim(0, 10)
    ax.axis("off")
    L, d = f["L"], f["d"]
    _box(ax, 2.0, 9.3, 3.2, 0.7, f"item ids [B, L ≤ {L}]\n(left-padded, 0 = padding)", "#eeeeee")
    _box(ax, 6.0, 9.3, 3.2, 0.7, f"positions [B, L]\nabsolute in the {L}-slot window", "#eeeeee")
    _box(ax, 2.0, 8.0, 3.2, 0.8, f"item_embeddings\n{f['item_emb']}", "#cfe2f3")
    _box(ax, 6.0, 8.0, 3.2, 0.8, f"position_embeddings\n{f['pos_emb']}", "#cfe2f3")
    _arrow(ax, (2.0, 8.95), (2.0, 8.4))
    _arrow(ax, (6.0, 8.95), (6.0, 8.4))
    _box(ax, 4.0, 6.8, 4.2, 0.7, f"sum → LayerNorm({d}) → dropout   [B, L, {d}]", "#d9ead3")
    _arrow(ax, (2.0, 7.6), (3.4, 7.15))
    _arrow(ax, (6.0, 7.6), (4.6, 7.15))
    enc = (f"item_encoder: {f['layers']} × post-LN layer\n"
           f"self-attention: {f['attn_heads']} heads × {f['head_size']}, Q/K/V/out {d}×{d}\n"
           f"+ residual, LayerNorm\n"
           f"FFN {f['ffn']} (GELU) + residual, LayerNorm\n"
           f"mask: bidirectional (pretrain) | causal (fine-tune)")
    _box(ax, 4.0, 5.0, 5.4, 1.9, enc, "#fff2cc")
    _arrow(ax, (4.0, 6.45), (4.0, 5.95))
    _box(ax, 4.0, 3.45, 3.4, 0.6, f"H  [B, L, {d}]", "#d9ead3")
    _arrow(ax, (4.0, 4.05), (4.0, 3.75))
    # Pretraining heads on the right, fine-tuning score at the bottom.
    targets = {"aap": f"· attribute_embeddings {f['attr_emb']}\n(every unmasked position)",
               "map": f"· attribute_embeddings {f['attr_emb']}\n(masked positions)",
               "mip": f"· item embedding of the masked item\n(vs one negative)",
               "sp": "· encoding of the segment\n(vs a negative segment)"}
    for i, n in enumerate(("aap", "mip", "map", "sp")):
        y = 8.3 - i * 1.55
        _box(ax, 9.95, y, 3.7, 1.15, f"{n.upper()} head ({n}_norm): {f['heads'][n]}\n{targets[n]}",
             "#f4cccc" if "U " in f["heads"][n] else "#ead1dc")
        _arrow(ax, (5.75, 3.6), (8.05, y - 0.3))
    last_item = int(f["item_emb"].split("×")[0]) - 2     # rows: padding, items, mask id
    _box(ax, 4.0, 1.6, 6.0, 1.0, f"fine-tuning: score(item) = H[:, last] · item_embeddings row\n"
                                 f"(sampled: answer + 99 negatives; full: items 1..{last_item})",
         "#cfe2f3")
    _arrow(ax, (4.0, 3.15), (4.0, 2.1))
    ax.text(0.1, 0.35, f"{title} — {f['total']:,} parameters; dimensions read from the model "
                       f"instance", fontsize=9)
    ax.set_title("S3Rec architecture", fontsize=12)
    save_figure(fig, out_stem)
    plt.close(fig)
    return f


# ---------------------------------------------------------------- all of them

def all_anatomy_figures(out: Path, sizes: Sizes = RELEASED_BEAUTY,
                        ranks=BREAKDOWN_RANKS) -> dict:
    """Writes every anatomy figure under `out`; returns the numbers shown (for the report)."""
    out.mkdir(parents=True, exist_ok=True)
    full = model_for(None, sizes)
    low = model_for(16, sizes)
    facts = {"full": architecture_figure(full, out / "architecture_full",
                                         f"variant s3rec, {sizes.label}"),
             "lowrank": architecture_figure(low, out / "architecture_lowrank16",
                                            f"variant s3rec-lowrank (rank 16), {sizes.label}")}
    masks_figure(out / "attention_masks")
    counts = lowrank_figure(full.cfg.hidden_size, out / "lowrank_heads")
    rows = breakdown_table(ranks=ranks)
    breakdown_figure(rows, out / "params_breakdown")
    return {"facts": facts, "head_counts": counts, "breakdown": rows}
