"""Attribute fields: a dataset's named attribute vocabularies and their one stacked id space.

Each field has its own vocabulary (ids 1..num_attributes, 0 = padding) and item-to-attribute CSR
on disk (s3rec/data/format.py). The pretraining sampler and the objectives' index see one CSR over
global ids instead: field f's id a is `offset_f + a`, offsets the running sum of the fields'
counts. With one field the global ids are the field's own, so a single-field dataset gives the
same samples, targets and losses as the single attribute vocabulary always did; the heads split
the global targets back per field (s3rec.field_objectives).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from s3rec.config import FIELD_NAME

DEFAULT_FIELD = "attributes"     # the one field of a dataset written before named fields


@dataclass(frozen=True)
class AttributeField:
    name: str
    num_attributes: int          # ids 1..num_attributes
    offset: int                  # global id = offset + field id

    @property
    def size(self) -> int:
        """Rows of the field's embedding table (row 0: padding)."""
        return self.num_attributes + 1


def field_layout(counts: list[tuple[str, int]]) -> tuple[AttributeField, ...]:
    """Fields in the given order, each after the ones before it in the global id space.
    ValueError naming the field when a name is not FIELD_NAME, repeats, or a count is < 0."""
    if not counts:
        raise ValueError("a dataset has at least one attribute field")
    out, offset, seen = [], 0, set()
    for name, n in counts:
        if not isinstance(name, str) or not re.fullmatch(FIELD_NAME, name):
            raise ValueError(f"attribute field name {name!r}: expected a letter, then up to 63 "
                             f"letters, digits or _")
        if name in seen:
            raise ValueError(f"attribute field {name!r} appears twice")
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
            raise ValueError(f"attribute field {name!r}: num_attributes {n!r}, expected an "
                             f"integer >= 0")
        seen.add(name)
        out.append(AttributeField(name, int(n), offset))
        offset += int(n)
    return tuple(out)


def total_attributes(layout: tuple[AttributeField, ...]) -> int:
    return sum(f.num_attributes for f in layout)


def stack_fields(csrs: list[tuple[np.ndarray, np.ndarray]],
                 layout: tuple[AttributeField, ...]) -> tuple[np.ndarray, np.ndarray]:
    """One CSR over global ids from each field's (values, offsets) CSR over the same item rows:
    row i lists field 0's ids of item i, then field 1's (shifted by its offset), ...
    values int32, offsets int64 [rows + 1]. One field is returned as it is."""
    if len(csrs) == 1:
        return csrs[0]
    rows = len(csrs[0][1]) - 1
    counts = np.stack([np.diff(np.asarray(o, dtype=np.int64)) for _, o in csrs])   # [F, rows]
    offsets = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(counts.sum(0), out=offsets[1:])
    values = np.empty(int(offsets[-1]), dtype=np.int32)
    before = offsets[:-1].copy()                   # where each row's next field starts
    for (v, o), f, n in zip(csrs, layout, counts):
        row_of = np.repeat(np.arange(rows), n)                                    # [len(v)]
        within = np.arange(len(v)) - np.repeat(np.asarray(o[:-1], dtype=np.int64), n)
        values[before[row_of] + within] = np.asarray(v, dtype=np.int64) + f.offset
        before += n
    return values, offsets


def split_global(values: np.ndarray, offsets: np.ndarray, layout: tuple[AttributeField, ...]
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """The inverse of stack_fields: each field's CSR (its own ids) from a global-id CSR."""
    if len(layout) == 1:
        return [(values, offsets)]
    rows = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    out = []
    for f in layout:
        keep = (values > f.offset) & (values <= f.offset + f.num_attributes)
        counts = np.bincount(rows[keep], minlength=len(offsets) - 1)
        o = np.zeros(len(offsets), dtype=np.int64)
        np.cumsum(counts, out=o[1:])
        out.append(((values[keep] - f.offset).astype(np.int32), o))
    return out


# ---------------------------------------------------------------- on disk (s3rec/data/format.py)

def attr_datasets(format_version: int, field_name: str) -> tuple[str, str]:
    """The HDF5 names of a field's (values, offsets) in a shard of `format_version`: version 1
    has one vocabulary at attr/values, attr/offsets; version 2 one group per field."""
    if format_version == 1:
        return "attr/values", "attr/offsets"
    return f"attr/{field_name}/values", f"attr/{field_name}/offsets"


def manifest_layout(manifest: dict, path) -> tuple[AttributeField, ...]:
    """The attribute fields of a dataset's manifest (version 1: one field named `attributes`
    of num_attributes ids). DatasetError naming the manifest and key when the version 2 list
    `attribute_fields` is not a list of {"name", "num_attributes", "num_pairs"} whose counts add
    up to num_attributes."""
    from s3rec.data.format import DatasetError
    if manifest["format_version"] == 1:
        return field_layout([(DEFAULT_FIELD, manifest["num_attributes"])])
    recs = manifest.get("attribute_fields")
    if not isinstance(recs, list) or not recs:
        raise DatasetError(f"{path}: key 'attribute_fields' = {recs!r:.60}, expected a non-empty "
                           f"list of {{\"name\", \"num_attributes\", \"num_pairs\"}}")
    for i, rec in enumerate(recs):
        if not isinstance(rec, dict) or set(rec) != {"name", "num_attributes", "num_pairs"}:
            raise DatasetError(f"{path}: attribute_fields[{i}] = {rec!r:.60}, expected an object "
                               f"with keys name, num_attributes, num_pairs")
        if not isinstance(rec["num_pairs"], int) or rec["num_pairs"] < 0:
            raise DatasetError(f"{path}: attribute_fields[{i}].num_pairs = {rec['num_pairs']!r}, "
                               f"expected an integer >= 0")
    try:
        layout = field_layout([(r["name"], r["num_attributes"]) for r in recs])
    except ValueError as e:
        raise DatasetError(f"{path}: key 'attribute_fields': {e}") from None
    if total_attributes(layout) != manifest["num_attributes"]:
        raise DatasetError(f"{path}: attribute_fields count {total_attributes(layout)} "
                           f"attributes, key 'num_attributes' says {manifest['num_attributes']}")
    return layout
