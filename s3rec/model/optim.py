"""Adam parameter groups: per-head weight decay on the head matrices, a base decay elsewhere.

Plain Adam L2 (`torch.optim.Adam(weight_decay=...)`, decay added to the gradient), as the original
optimiser; not AdamW. A head's `weight_decay` applies to its matrix parameters: U and V of a
low-rank head, `weight` of a full head; head biases take the base decay.
"""
from __future__ import annotations

from torch import nn

from s3rec.config import Config


def param_groups(model: nn.Module, cfg: Config, base_decay: float | None = None) -> list[dict]:
    """Groups for torch.optim.Adam: one "base" group (base_decay, default
    cfg.pretrain.weight_decay) and one "head:<name>" group per head whose decay differs (the
    heads' decays as the model was built with them: cfg.head, cfg.field_head).
    Every parameter appears exactly once."""
    base = cfg.pretrain.weight_decay if base_decay is None else base_decay
    head_params: dict[str, list] = {}
    taken: set[int] = set()
    for name in model.head_names():
        decay = model.head_cfgs[name].weight_decay
        if decay == base:
            continue
        params = model.head(name).matrix_params()
        head_params[name] = (params, decay)
        taken.update(id(p) for p in params)
    groups = [{"name": "base", "weight_decay": base,
               "params": [p for p in model.parameters() if id(p) not in taken]}]
    for name, (params, decay) in head_params.items():
        groups.append({"name": f"head:{name}", "weight_decay": decay, "params": params})
    return groups
