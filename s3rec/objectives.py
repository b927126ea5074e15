"""The pretraining losses (AAP, MIP, MAP, SP) and the fine-tuning losses: functions of tensors.

Defaults reproduce the authors' code exactly (docs/reproduction.md, "Pretraining"); the named
options `reduction` (sum | mean) and `pair_form` (original | logits) depart from it on purpose.
Work is done only where it counts: rows are gathered before the heads, attribute targets stay
sparse, and the encoder runs once on the stacked sequences.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from s3rec.config import FINETUNE_LOSSES
from s3rec.data.batch import PretrainBatch, PretrainIndex
from s3rec.data.finetune_samples import FinetunePlan

OBJECTIVES = ("aap", "mip", "map", "sp")
_BCE_EPS = 1e-12       # BCELoss backward divides by max(p (1 - p), 1e-12)


def _reduce(total: torch.Tensor, count: int | torch.Tensor, reduction: str) -> torch.Tensor:
    """sum: as is; mean: over `count` units, at least 1 (a device tensor count is clamped on the
    device: no read back, as the fixed-shape objectives need)."""
    if reduction == "sum":
        return total
    if reduction == "mean":
        if isinstance(count, torch.Tensor):
            return total / count.clamp(min=1).to(total.dtype)
        return total / max(count, 1)
    raise ValueError(f"reduction must be sum|mean, got {reduction!r}")


# Every loss is computed in float32 at least, also when the model runs in bf16/fp16 (DeepSpeed
# casts it). In bf16, sigmoid(x) rounds to exactly 1 from x ~ 6 (float32: ~17), where BCELoss's
# clamped log and its gradient, which vanishes with p (1 - p), would stop training a confidently
# wrong attribute; and a sum over thousands of terms keeps its precision. In float32 the cast is
# a no-op (the same tensor), so fp32 runs are unchanged (float64 stays float64: gradcheck).
LOSS_DTYPE = torch.float32


def loss_precision(x: torch.Tensor) -> torch.Tensor:
    """x in float32 if it is in a half type (bf16, fp16), else x itself."""
    return x.to(LOSS_DTYPE) if x.dtype in (torch.bfloat16, torch.float16) else x


# ------------------------------------------------------------------ AAP / MAP

class _SparseSigmoidBCE(torch.autograd.Function):
    """sum over [N, A] of BCELoss(sigmoid(x), Y), Y multi-hot given sparsely by (rows, cols).

    Exactly PyTorch's BCELoss on sigmoid outputs: each log term is computed from p = sigmoid(x)
    (log1p(-p), log p) and clamped at -100, and the gradient is BCELoss's
    (p - y) / max(p (1 - p), 1e-12) times sigmoid's p (1 - p), which vanishes where p saturates
    to exactly 0 or 1 (a logits form would keep a gradient of 1 there). The dense sum is the y = 0
    term over every element plus a correction at each target, so no dense Y is built."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(x)                                        # [N, A]
        log_not = torch.log1p(-p).clamp_(min=-100.0)                # y = 0 log term
        p_t = p[rows, cols]                                         # [T]
        total = -log_not.sum() - (p_t.log().clamp_(min=-100.0) - log_not[rows, cols]).sum()
        ctx.save_for_backward(p, rows, cols)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        p, rows, cols = ctx.saved_tensors
        pq = p * (1.0 - p)
        w = pq / pq.clamp(min=_BCE_EPS)                 # 1 unless sigmoid saturates
        g = p * w                                       # (p - 0) * w
        g[rows, cols] -= w[rows, cols]                  # (p - 1) * w at the targets
        return g.mul_(grad), None, None


def sigmoid_bce_sum(logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """BCELoss(sigmoid(logits), Y, reduction='sum'), Y [N, A] 1 at (rows, cols) (no duplicates).
    In float32 at least, whatever the logits' dtype (see LOSS_DTYPE)."""
    return _SparseSigmoidBCE.apply(loss_precision(logits), rows, cols)


def attribute_loss(rows_out: torch.Tensor, attr_table: torch.Tensor, head: torch.nn.Module,
                   target_rows: torch.Tensor, target_cols: torch.Tensor,
                   reduction: str = "sum") -> torch.Tensor:
    """AAP / MAP: BCE of sigmoid(A (W h + b)) against the multi-hot attributes, over all A.

    rows_out [N, d]: encoder outputs at the positions that count; attr_table [A, d]: the whole
    attribute embedding table (row 0 included: a target column that is always 0);
    target_rows/cols [T]: the 1-entries (row in 0..N-1, attribute id), unique pairs.
    reduction: sum (original) | mean (over the N positions)."""
    logits = head(rows_out) @ attr_table.T                         # [N, A]
    return _reduce(sigmoid_bce_sum(logits, target_rows, target_cols), rows_out.shape[0],
                   reduction)


aap_loss = attribute_loss   # at positions neither masked nor padding, head aap_norm
map_loss = attribute_loss   # at masked positions, head map_norm


# ------------------------------------------------------------------ MIP / SP

def pair_loss(pos_logits: torch.Tensor, neg_logits: torch.Tensor, pair_form: str) -> torch.Tensor:
    """Per-pair loss [N] of a positive and a negative score (raw dot products).

    original: -log sigmoid(sigmoid(pos) - sigmoid(neg)) (BCELoss's -100 clamp kept; it never binds
    since the difference lies in [-1, 1]); logits: BCE-with-logits, pos against 1, neg against 0."""
    pos_logits, neg_logits = loss_precision(pos_logits), loss_precision(neg_logits)
    if pair_form == "original":
        diff = torch.sigmoid(pos_logits) - torch.sigmoid(neg_logits)
        return -F.logsigmoid(diff).clamp(min=-100.0)
    if pair_form == "logits":
        return F.softplus(-pos_logits) + F.softplus(neg_logits)
    raise ValueError(f"pair_form must be original|logits, got {pair_form!r}")


def mip_loss(rows_out: torch.Tensor, pos_emb: torch.Tensor, neg_emb: torch.Tensor,
             head: torch.nn.Module, reduction: str = "sum",
             pair_form: str = "original") -> torch.Tensor:
    """MIP over masked positions: rows_out, pos_emb, neg_emb [M, d] (outputs, original item's and
    negative item's embeddings); f(h, e) = (W h + b) . e; reduction mean divides by M."""
    z = head(rows_out)                                              # [M, d]
    loss = pair_loss((z * pos_emb).sum(-1), (z * neg_emb).sum(-1), pair_form)
    return _reduce(loss.sum(), rows_out.shape[0], reduction)


def sp_loss(context: torch.Tensor, pos_seg: torch.Tensor, neg_seg: torch.Tensor,
            head: torch.nn.Module, reduction: str = "sum",
            pair_form: str = "original") -> torch.Tensor:
    """SP: context, pos_seg, neg_seg [B, d] last-position outputs of the segment-masked sequence
    and of the positive / negative segment sequences; s(c, g) = (W c + b) . g."""
    z = head(context)                                               # [B, d]
    loss = pair_loss((z * pos_seg).sum(-1), (z * neg_seg).sum(-1), pair_form)
    return _reduce(loss.sum(), context.shape[0], reduction)


# ------------------------------------------------------------------ one pretraining step

def _weight(weights, name: str) -> float:
    return float(weights[name] if isinstance(weights, Mapping) else getattr(weights, name))


def _targets_at(select: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """select [P] bool over flat positions; pairs [T, 2] (flat position, attribute) ->
    [T', 2] (row among the selected positions, attribute) for the pairs at selected positions."""
    row_of = torch.full((select.numel(),), -1, dtype=torch.int64, device=select.device)
    row_of[select] = torch.arange(int(select.sum()), device=select.device)
    rows = row_of[pairs[:, 0]]
    keep = rows >= 0
    return torch.stack([rows[keep], pairs[keep, 1]], dim=1)


def _unique_pairs(pairs: torch.Tensor, num_cols: int) -> torch.Tensor:
    """Drop repeated (position, attribute) pairs (attributes < num_cols): the multi-hot target is
    a set (the release's attribute lists can repeat an id)."""
    key = torch.unique(pairs[:, 0] * num_cols + pairs[:, 1])
    return torch.stack([key // num_cols, key % num_cols], dim=1)


def zero_losses(model) -> dict[str, torch.Tensor]:
    """{"aap", "mip", "map", "sp", "total"}: all a zero scalar, in the losses' dtype on the
    model's device (the entry of an objective that is not computed)."""
    zero = loss_precision(model.item_embeddings.weight.new_zeros(()))
    return {name: zero for name in (*OBJECTIVES, "total")}


def stacked_encoding(model, batch: PretrainBatch, w: dict[str, float]):
    """The step's one encoder pass (bidirectional): the masked input when AAP, MIP or MAP count
    and the three SP sequences when SP counts, stacked into [kB, L]. Returns (hidden [kB, L, d],
    or None when no objective counts; need_main; need_sp)."""
    need_main = w["aap"] > 0 or w["mip"] > 0 or w["map"] > 0
    need_sp = w["sp"] > 0
    seqs = ([batch.masked_items] if need_main else []) + \
           ([batch.sp_masked, batch.sp_pos, batch.sp_neg] if need_sp else [])
    if not seqs:
        return None, need_main, need_sp
    items = torch.cat(seqs, 0)                                          # [kB, L]
    positions = batch.positions.repeat(len(seqs), 1)                   # [kB, L]
    return model.encode(items, positions, causal=False), need_main, need_sp   # [kB, L, d]


def pretrain_index(batch: PretrainBatch) -> PretrainIndex:
    """Where the objectives of `batch` read (see PretrainIndex). Run on the host (the engine does,
    before the batch goes to the device); on a device it is correct but reads back several times."""
    pairs = batch.attr_index                                            # [T, 2]
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"attr_index must be [T, 2] (flat position, attribute), got "
                         f"{list(pairs.shape)}")
    max_attribute = int(pairs[:, 1].max()) if pairs.numel() else -1
    pairs = _unique_pairs(pairs, max_attribute + 1)
    masked = batch.masked.reshape(-1)                                   # [B*L]
    unmasked = (batch.original_items.reshape(-1) != 0) & ~masked        # [B*L]
    return PretrainIndex(
        unmasked=unmasked.nonzero().squeeze(1), masked=masked.nonzero().squeeze(1),
        aap_targets=_targets_at(unmasked, pairs), map_targets=_targets_at(masked, pairs),
        max_attribute=max_attribute)


def pretrain_losses(model, batch: PretrainBatch, weights, reduction: str = "sum",
                    pair_form: str = "original", mask_id: int | None = None
                    ) -> dict[str, torch.Tensor]:
    """The four losses of one batch and their weighted total.

    One encoder pass (bidirectional) over the masked input and, when SP counts, the three SP
    sequences stacked into [4B, L]. An objective whose weight is 0 is not computed (its entry is
    a zero tensor). Returns {"aap", "mip", "map", "sp", "total"}; with reduction "sum" (the
    original) each is summed over the batch. Rows and targets are read through batch.index
    (computed here when the batch has none), so a step with an index never waits on the
    device. `mask_id`, if given, checks that `masked` agrees with the input."""
    if batch.rows_real is not None:
        raise ValueError("pretrain_losses: a batch padded to a fixed shape (rows_real set) has "
                         "no attribute pairs; use s3rec.static_objectives.pretrain_losses_static")
    w = {name: _weight(weights, name) for name in OBJECTIVES}
    B, L = batch.masked_items.shape
    if mask_id is not None and not torch.equal(batch.masked, batch.masked_items == mask_id):
        raise ValueError("PretrainBatch: `masked` disagrees with masked_items == mask_id")
    out = zero_losses(model)
    hidden, need_main, need_sp = stacked_encoding(model, batch, w)
    if hidden is None:
        return out
    d = hidden.shape[-1]

    if need_main:
        idx = batch.index if batch.index is not None else pretrain_index(batch)
        flat = hidden[:B].reshape(B * L, d)                             # [B*L, d]
        # late: the field objectives build on this module's attribute_loss
        from s3rec.field_objectives import field_attribute_losses
        if (w["aap"] > 0 or w["map"] > 0) and idx.max_attribute >= model.attribute_size:
            raise ValueError(f"attr_index holds attribute {idx.max_attribute} but the model has "
                             f"attribute_size {model.attribute_size}")
        at_masked = (flat.index_select(0, idx.masked)                   # [M, d]
                     if w["map"] > 0 or w["mip"] > 0 else None)
        if w["aap"] > 0:                                                # targets [Ta, 2]
            field_attribute_losses(model, "aap", flat.index_select(0, idx.unmasked),
                                   idx.aap_targets, reduction, out)
        if w["map"] > 0:                                                # targets [Tm, 2]
            field_attribute_losses(model, "map", at_masked, idx.map_targets, reduction, out)
        if w["mip"] > 0:
            emb = model.item_embeddings
            pos = batch.original_items.reshape(-1).index_select(0, idx.masked)   # [M]
            neg = batch.mip_neg.reshape(-1).index_select(0, idx.masked)         # [M]
            out["mip"] = mip_loss(at_masked, emb(pos), emb(neg), model.mip_norm, reduction,
                                  pair_form)
    if need_sp:
        last = hidden[-3 * B:, -1]                                      # [3B, d]
        out["sp"] = sp_loss(last[:B], last[B:2 * B], last[2 * B:], model.sp_norm, reduction,
                            pair_form)
    out["total"] = sum(w[name] * out[name] for name in OBJECTIVES if w[name] > 0)
    return out


# ------------------------------------------------------------------ fine-tuning

def finetune_loss(seq_out: torch.Tensor, pos_emb: torch.Tensor, neg_emb: torch.Tensor,
                  form: str = "original") -> torch.Tensor:
    """Mean over the N non-padding positions of -log sigmoid(h.e+) - log(1 - sigmoid(h.e-)).

    seq_out, pos_emb, neg_emb [N, d]. form "original" is the authors' expression literally
    (1e-24 added inside both logs, which caps each term near 55.3 and zeroes the gradient of
    saturated scores); "logits" is the exact softplus form."""
    pos = loss_precision((seq_out * pos_emb).sum(-1))                   # [N] (see LOSS_DTYPE)
    neg = loss_precision((seq_out * neg_emb).sum(-1))
    n = max(seq_out.shape[0], 1)
    if form == "original":
        loss = -torch.log(torch.sigmoid(pos) + 1e-24) - torch.log(1 - torch.sigmoid(neg) + 1e-24)
    elif form == "logits":
        loss = F.softplus(-pos) + F.softplus(neg)
    else:
        raise ValueError(f"finetune loss form must be original|logits, got {form!r}")
    return loss.sum() / n


# The losses below compare a position's output with item embeddings over the real items only:
# targets and negatives are ids 1..num_items; the embedding table has item_size = num_items + 2
# rows, row 0 the padding and the last mask_id, and neither is ever a candidate. Each is a mean
# over the N real target positions (the loop weighs it by N: any world size, same gradient).

@dataclass(frozen=True)
class FinetuneObjective:
    """The fine-tuning loss (config finetune.loss) and what it needs beyond the batch.

    kind: bce (the original: finetune_loss) | ce | sampled_softmax | gbce.
    chunk_rows: ce computes the logits of this many rows against the whole catalogue at a time.
    log_kq: sampled_softmax: float [num_items + 1] log(K Q(j)) on the loss's device, Q the
      sampling distribution of the batch's K shared negatives (FinetuneSampler.log_sampling_q).
    beta: gbce's weight of the positive term (gbce_beta)."""
    kind: str = "bce"
    chunk_rows: int = 4096
    log_kq: torch.Tensor | None = None
    beta: float = 1.0


class _LogSumExpScores(torch.autograd.Function):
    """[R] logsumexp_j(h_r . e_j) of rows h [R, d] against every row of a table E [I, d].

    One exp pass over the [R, I] logits, in place, and their softmax kept for the backward,
    whose gradient is softmax x g: a cross_entropy would take the exp twice (log_softmax and its
    backward) and fill a dense [R, I] one-hot gradient; on Beauty's 12101 items these passes
    cost more than the three matrix products."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        logits = loss_precision(h @ table.T)                            # [R, I]
        top = logits.amax(1, keepdim=True)                              # [R, 1]
        expd = logits.sub_(top).exp_()                                  # [R, I] in place
        total = expd.sum(1, keepdim=True)                               # [R, 1]
        ctx.save_for_backward(h, table, expd.div_(total))               # softmax [R, I]
        return (top + total.log()).squeeze(1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, table, softmax = ctx.saved_tensors
        g = (softmax * grad[:, None]).to(h.dtype)                       # [R, I]
        return g @ table, g.T @ h


def _ce_rows(rows_out: torch.Tensor, table: torch.Tensor, pos_ids: torch.Tensor) -> torch.Tensor:
    """Sum over rows of the full-softmax cross-entropy: rows_out [R, d], table [I, d] (items
    1..I), pos_ids [R] in 1..I."""
    pos = loss_precision((rows_out * table[pos_ids - 1]).sum(1))        # [R]
    return (_LogSumExpScores.apply(rows_out, table) - pos).sum()


def ce_loss(seq_out: torch.Tensor, table: torch.Tensor, pos_ids: torch.Tensor,
            chunk_rows: int) -> torch.Tensor:
    """Mean over N of logsumexp_j(h.e_j) - h.e_pos, j over every row of `table` [I, d] (the items
    1..I); seq_out [N, d], pos_ids [N] in 1..I.

    `chunk_rows` rows at a time. With more than one chunk each runs under a checkpoint: the
    backward recomputes a chunk's [chunk_rows, I] logits instead of keeping every chunk's, so
    memory holds one chunk whatever N and I. A single chunk is computed directly: it holds one
    chunk's logits either way, and recomputing them would cost another [N, d] x [d, I] product."""
    n = seq_out.shape[0]
    if n <= chunk_rows:
        total = _ce_rows(seq_out, table, pos_ids)
    else:
        # preserve_rng_state off: nothing random in a chunk, nothing to replay
        total = sum(checkpoint(_ce_rows, seq_out[i:i + chunk_rows], table,
                               pos_ids[i:i + chunk_rows], use_reentrant=False,
                               preserve_rng_state=False)
                    for i in range(0, n, chunk_rows))
    return total / max(n, 1)


def sampled_softmax_loss(seq_out: torch.Tensor, pos_emb: torch.Tensor, neg_emb: torch.Tensor,
                         pos_ids: torch.Tensor, neg_ids: torch.Tensor, log_kq_pos: torch.Tensor,
                         log_kq_neg: torch.Tensor) -> torch.Tensor:
    """Sampled softmax with the log-Q correction: mean over N of the cross-entropy of the
    positive (class 0) among [positive, K negatives], every logit s_j = h.e_j - log(K Q(j)).

    seq_out, pos_emb [N, d]; neg_emb [K, d] shared by every row; pos_ids [N], neg_ids [K];
    log_kq_pos [N], log_kq_neg [K]: log(K Q(j)) of each positive and negative (Q(pos) > 0). A
    negative equal to the row's positive (an accidental hit) is left out of that row (-inf)."""
    pos = loss_precision((seq_out * pos_emb).sum(-1))                   # [N]
    neg = loss_precision(seq_out @ neg_emb.T)                           # [N, K]
    pos = pos - log_kq_pos.to(pos.dtype)
    neg = (neg - log_kq_neg.to(neg.dtype)).masked_fill(neg_ids[None, :] == pos_ids[:, None],
                                                       float("-inf"))
    logits = torch.cat([pos[:, None], neg], 1)                          # [N, 1 + K]
    zero = torch.zeros(len(logits), dtype=torch.int64, device=logits.device)
    return F.cross_entropy(logits, zero, reduction="sum") / max(len(logits), 1)


def gbce_beta(negatives: int, num_items: int, t: float) -> float:
    """gSASRec's beta = alpha (t (1 - 1/alpha) + 1/alpha), alpha = k / (num_items - 1) the share
    of the other items sampled per position: t = 0 gives beta = 1 (plain BCE), t = 1 beta =
    alpha (the calibration of Petrov & Macdonald, RecSys 2023)."""
    if num_items < 2:
        raise ValueError(f"gbce needs at least 2 items, got num_items={num_items}")
    alpha = negatives / (num_items - 1)
    return alpha * (t * (1 - 1 / alpha) + 1 / alpha)


def gbce_loss(seq_out: torch.Tensor, pos_emb: torch.Tensor, neg_emb: torch.Tensor,
              beta: float) -> torch.Tensor:
    """gSASRec's generalised BCE: mean over N of
    -(beta log sigmoid(s+) + sum_j log(1 - sigmoid(s_j))) / (1 + k).

    seq_out, pos_emb [N, d]; neg_emb [N, k, d] (k negatives per row). Normalised as gSASRec's
    code, a BCE-with-logits mean over the 1 + k terms of a position, then a mean over positions
    (its positive term is BCE-with-logits of a logit z with sigmoid(z) = sigmoid(s+)^beta, which
    is beta * softplus(-s+)); softplus keeps both terms exact for large scores."""
    pos = loss_precision((seq_out * pos_emb).sum(-1))                   # [N]
    neg = loss_precision(torch.einsum("nd,nkd->nk", seq_out, neg_emb))  # [N, k]
    per_row = (beta * F.softplus(-pos) + F.softplus(neg).sum(-1)) / (1 + neg.shape[1])   # [N]
    return per_row.sum() / max(len(per_row), 1)


def objective_loss(model, flat: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, form: str,
                   objective: FinetuneObjective | None, shared: torch.Tensor | None
                   ) -> torch.Tensor:
    """The loss `objective` (None: bce) at N positions: flat [N, d] outputs, pos [N] targets,
    neg [N] (bce) or [N, k] (gbce) negatives of each position, shared [K] (sampled_softmax)."""
    emb = model.item_embeddings
    kind = "bce" if objective is None else objective.kind
    if kind == "bce":
        return finetune_loss(flat, emb(pos), emb(neg), form)
    if kind == "ce":
        return ce_loss(flat, emb.weight[1:-1], pos, objective.chunk_rows)
    if kind == "gbce":
        if neg.ndim != 2:
            raise ValueError(f"gbce needs [N, k] negatives per position, got {list(neg.shape)}")
        return gbce_loss(flat, emb(pos), emb(neg), objective.beta)
    if kind == "sampled_softmax":
        if shared is None or objective.log_kq is None:
            raise ValueError("sampled_softmax needs the batch's shared negatives and log_kq")
        q = objective.log_kq
        return sampled_softmax_loss(flat, emb(pos), emb(shared), pos, shared, q[pos], q[shared])
    raise ValueError(f"finetune loss must be {'|'.join(FINETUNE_LOSSES)}, got {kind!r}")


def finetune_batch_loss(model, input_ids: torch.Tensor, positions: torch.Tensor,
                        pos_ids: torch.Tensor, neg_ids: torch.Tensor,
                        form: str = "original", targets: torch.Tensor | None = None,
                        objective: FinetuneObjective | None = None,
                        shared: torch.Tensor | None = None) -> torch.Tensor:
    """The fine-tuning loss of one batch: input_ids, positions, pos_ids (targets, 0 = padding)
    [B, L], neg_ids [B, L] (bce) or [B, L, k] (gbce); causal encoding, loss at positions whose
    target is not padding (`targets`: their flat indices into B*L, if known on the host; else
    found here). `objective`: which loss (None: bce, `form`); `shared` [K]: sampled_softmax's."""
    hidden = model.encode(input_ids, positions, causal=True)           # [B, L, d]
    if targets is None:
        targets = (pos_ids > 0).reshape(-1).nonzero().squeeze(1)        # [N]
    flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, targets)   # [N, d]
    pos = pos_ids.reshape(-1).index_select(0, targets)                  # [N]
    neg = neg_ids.flatten(0, 1).index_select(0, targets)                # [N] or [N, k]
    return objective_loss(model, flat, pos, neg, form, objective, shared)


def finetune_plan(input_ids: torch.Tensor, pos_ids: torch.Tensor, chunks: int) -> FinetunePlan:
    """The length groups of a batch (FinetunePlan): rows sorted by length (stable), cut into
    `chunks` groups, each trimmed to its longest row; target positions per group. Meant for the
    host (the engine runs it before the copy); on a device it reads back once."""
    B, L = input_ids.shape
    chunks = max(1, min(chunks, B))
    if chunks == 1:
        # one group, the whole batch; also a batch of no rows (a rank's share of a short last
        # batch), which the loss then still runs through the model: its 0 reaches the same
        # parameters as on the other ranks, whose gradient reduction expects every one
        t = (pos_ids > 0).reshape(-1).nonzero().squeeze(1)
        return FinetunePlan(rows=[torch.arange(B, device=input_ids.device)], keep=[L],
                            targets=[t], total=int(t.numel()))
    lengths = (input_ids > 0).sum(1)                                    # [B]
    order = torch.argsort(lengths, stable=True)
    maxlen = lengths[order].tolist()
    rows, keep, targets = [], [], []
    for c in range(chunks):                                             # chunks <= B: none empty
        lo, hi = B * c // chunks, B * (c + 1) // chunks
        r = order[lo:hi]
        k = max(int(maxlen[hi - 1]), 1)                                  # longest row of the group
        rows.append(r)
        keep.append(k)
        targets.append((pos_ids[r, L - k:] > 0).reshape(-1).nonzero().squeeze(1))
    return FinetunePlan(rows=rows, keep=keep, targets=targets,
                        total=sum(int(t.numel()) for t in targets))


def finetune_batch_loss_chunked(model, input_ids: torch.Tensor, positions: torch.Tensor,
                                pos_ids: torch.Tensor, neg_ids: torch.Tensor, chunks: int,
                                form: str = "original", plan: FinetunePlan | None = None,
                                objective: FinetuneObjective | None = None,
                                shared: torch.Tensor | None = None) -> torch.Tensor:
    """`finetune_batch_loss` of the same batch, computed over `chunks` groups of rows of similar
    length, each trimmed to its own longest row. Rows never attend to each other and positions
    are absolute, so this is the same mean over the same positions with far less padding
    (a random batch of 256 Beauty users is padded to ~50; its rows average ~8 items).
    input_ids, positions, pos_ids [B, L], neg_ids [B, L] or [B, L, k] (their rows follow the
    groups); `plan` (FinetunePlan): the groups, cut on the host (else cut here by finetune_plan);
    `objective`, `shared` as finetune_batch_loss (shared [K] goes whole to every group)."""
    if plan is None:
        plan = finetune_plan(input_ids, pos_ids, chunks)
    L = input_ids.shape[1]
    if len(plan.rows) == 1 and plan.keep[0] == L:                      # one group: the whole batch
        return finetune_batch_loss(model, input_ids, positions, pos_ids, neg_ids, form,
                                   plan.targets[0], objective, shared)
    total = input_ids.new_zeros((), dtype=torch.float32)
    for rows, keep, targets in zip(plan.rows, plan.keep, plan.targets):
        ids, pos, tgt, neg = (t.index_select(0, rows)[:, L - keep:]
                              for t in (input_ids, positions, pos_ids, neg_ids))
        part = finetune_batch_loss(model, ids, pos, tgt, neg, form, targets, objective, shared)
        total = total + part * targets.numel()                         # back to a sum
    return total / max(plan.total, 1)
