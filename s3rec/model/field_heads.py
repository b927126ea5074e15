"""Names and configs of the per-field modules: each attribute field's table and AAP / MAP heads.

One field keeps the authors' names (`attribute_embeddings`, heads `aap`, `map`: parameters
`aap_norm.*`, `map_norm.*`), whatever the field is called, so a single-field model is today's
model parameter for parameter and the authors' checkpoint loads into it. Several fields:
`attribute_embeddings_<field>`, heads `aap_<field>`, `map_<field>` (`aap_<field>_norm.*`).
"""
from __future__ import annotations

from s3rec.config import FIELD_OBJECTIVES, Config, HeadConfig
from s3rec.data.fields import AttributeField


def table_name(fields: tuple[AttributeField, ...], field_name: str) -> str:
    return "attribute_embeddings" if len(fields) == 1 else f"attribute_embeddings_{field_name}"


def field_head_name(fields: tuple[AttributeField, ...], field_name: str, objective: str) -> str:
    return objective if len(fields) == 1 else f"{objective}_{field_name}"


def head_names(fields: tuple[AttributeField, ...]) -> tuple[str, ...]:
    """Every head, in the order the model builds them (aap..., mip, map..., sp: for one field
    the authors' order, which decides the random draws of their initialisation)."""
    def per_field(objective: str) -> list[str]:
        return [field_head_name(fields, f.name, objective) for f in fields]
    return (*per_field("aap"), "mip", *per_field("map"), "sp")


def head_configs(cfg: Config, fields: tuple[AttributeField, ...]) -> dict[str, HeadConfig]:
    """The effective config of every head by head name: mip and sp from `cfg.head`, each field's
    aap / map from `cfg.field_head` (model.fields.<field> over model.heads)."""
    unknown = sorted(set(cfg.model.fields) - {f.name for f in fields})
    if unknown:
        raise ValueError(f"config key 'model.fields.{unknown[0]}': the dataset has no attribute "
                         f"field {unknown[0]!r} (its fields: {', '.join(f.name for f in fields)})")
    out: dict[str, HeadConfig] = {"mip": cfg.head("mip"), "sp": cfg.head("sp")}
    for f in fields:
        for objective in FIELD_OBJECTIVES:
            out[field_head_name(fields, f.name, objective)] = cfg.field_head(f.name, objective)
    return {name: out[name] for name in head_names(fields)}


def fields_of_state(state) -> tuple[AttributeField, ...] | None:
    """The field layout a state dict was saved with: None for the one-field layout
    (`attribute_embeddings.weight`), else the fields of its `attribute_embeddings_<f>` tables in
    their saved order (their offsets follow that order, as the dataset's)."""
    from s3rec.data.fields import field_layout
    prefix, suffix = "attribute_embeddings_", ".weight"
    tables = [(k[len(prefix):-len(suffix)], int(v.shape[0]) - 1) for k, v in state.items()
              if k.startswith(prefix) and k.endswith(suffix)]
    return field_layout(tables) if tables else None


def state_attribute_size(state) -> int | None:
    """The attribute_size a state dict was made for (1 + every field's ids), None without an
    attribute table."""
    one = state.get("attribute_embeddings.weight")
    if one is not None:
        return int(one.shape[0])
    rows = [int(v.shape[0]) - 1 for k, v in state.items()
            if k.startswith("attribute_embeddings_") and k.endswith(".weight")]
    return 1 + sum(rows) if rows else None
