"""AAP and MAP over a model's attribute fields: each field's head against its own table.

The batch's attribute targets are global ids (s3rec/data/fields.py); field f's targets are those
in offset_f + 1 .. offset_f + num_attributes, shifted back to its own ids. Returned per
objective: `aap` (or `map`) = sum over fields of weight_f * loss_f, the term that
pretrain.weights.aap multiplies, and with several fields also `aap.<field>` = loss_f (unweighted:
the curve of the field's own objective). One field is computed exactly as the single-vocabulary
objective (same tensors, same operations), so its losses are bit-identical to it.
"""
from __future__ import annotations

import torch

from s3rec.objectives import _reduce, attribute_loss
from s3rec.static_objectives import dense_sigmoid_bce


def field_loss_names(model, weights) -> list[str]:
    """The per-field loss names (`aap.<field>`, `map.<field>`) computed under `weights`
    (pretrain.weights): none for one field (its loss is `aap` itself), none for a field of
    weight 0 or an objective of weight 0."""
    fields = model.attribute_fields
    if len(fields) == 1:
        return []
    return [f"{o}.{f.name}" for o in ("aap", "map") if getattr(weights, o) > 0
            for f in fields if model.field_weight(f.name, o) > 0]


def _per_field(model, objective: str, out: dict, loss_of) -> None:
    """out[objective.field] = loss_of(field) for every field of weight > 0, and out[objective]
    their weighted sum (left as it was when every field's weight is 0)."""
    parts = []
    for f in model.attribute_fields:
        w = model.field_weight(f.name, objective)
        if w <= 0:
            continue
        loss = loss_of(f)
        out[f"{objective}.{f.name}"] = loss
        parts.append((w, loss))
    if parts:
        out[objective] = sum(w * loss for w, loss in parts)


def field_attribute_losses(model, objective: str, rows_out: torch.Tensor, targets: torch.Tensor,
                           reduction: str, out: dict) -> None:
    """AAP or MAP of the default path into `out`: rows_out [N, d] (the positions that count),
    targets [T, 2] (row in 0..N-1, global attribute id), unique pairs."""
    fields = model.attribute_fields
    if len(fields) == 1:
        f = fields[0]
        out[objective] = attribute_loss(rows_out, model.attribute_table(f.name).weight,
                                        model.field_head(f.name, objective), targets[:, 0],
                                        targets[:, 1], reduction)
        return
    cols = targets[:, 1]

    def loss_of(f):
        mine = (cols > f.offset) & (cols <= f.offset + f.num_attributes)          # [T]
        return attribute_loss(rows_out, model.attribute_table(f.name).weight,
                              model.field_head(f.name, objective), targets[mine, 0],
                              cols[mine] - f.offset, reduction)

    _per_field(model, objective, out, loss_of)


def field_attribute_losses_static(model, objective: str, flat: torch.Tensor,
                                  targets: torch.Tensor, rows: torch.Tensor, reduction: str,
                                  out: dict) -> None:
    """AAP or MAP at fixed shapes into `out`: flat [P, d] (every position), targets bool
    [P, 1 + all fields' ids] (the global multi-hot of each position's item), rows [P] 0/1 (the
    positions that count). Each field reads its columns, with the always-0 column of its padding
    row in front, as the default path scores its table's row 0."""
    fields = model.attribute_fields
    dt = flat.dtype
    if len(fields) == 1:
        f = fields[0]
        logits = model.field_head(f.name, objective)(flat) @ model.attribute_table(f.name).weight.T
        out[objective] = _reduce(dense_sigmoid_bce(logits, targets, rows.to(dt)), rows.sum(),
                                 reduction)
        return

    def loss_of(f):
        mine = torch.cat([torch.zeros_like(targets[:, :1]),
                          targets[:, f.offset + 1:f.offset + f.size]], 1)         # [P, size]
        logits = model.field_head(f.name, objective)(flat) @ model.attribute_table(f.name).weight.T
        return _reduce(dense_sigmoid_bce(logits, mine, rows.to(dt)), rows.sum(), reduction)

    _per_field(model, objective, out, loss_of)
