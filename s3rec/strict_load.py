"""YAML and JSON readers that refuse what the standard ones accept silently: a key twice in one
mapping. PyYAML and `json` keep the last value, so a setting pasted again lower down a config,
or a second `pretrain:` block that replaces the first whole, would change a run without a word.
Every reader of a user's YAML or JSON (configs, grids, DeepSpeed JSON, dataset manifests, raw
JSON lines) goes through here; the callers turn DuplicateKey into their own error naming the file.
"""
from __future__ import annotations

import json

import yaml

_MERGE_TAG = "tag:yaml.org,2002:merge"


class DuplicateKey(ValueError):
    """A key twice in one mapping; `line` and `first` are 1-based (None for JSON: `json` gives
    no positions to its hook)."""

    def __init__(self, key, line: int | None = None, first: int | None = None) -> None:
        self.key, self.line, self.first = key, line, first
        where = f" (lines {first} and {line})" if line is not None else ""
        super().__init__(f"key {key!r} appears twice in one mapping{where}; only one value can "
                         f"be meant, and the reader would silently keep the last")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader whose mappings refuse a key given twice. Keys brought in by a merge (`<<:`)
    may still be overridden by the mapping's own keys: that is what a merge is for."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:      # an unhashable key: SafeLoader's own error names it
                    continue
                line = key_node.start_mark.line + 1
                if first is not None:
                    raise DuplicateKey(key, line, first)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str):
    """`yaml.safe_load(text)`, refusing a key twice in one mapping (DuplicateKey)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """`object_pairs_hook` for json.loads: a dict, refusing a key twice (DuplicateKey)."""
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise DuplicateKey(k)
        out[k] = v
    return out


def no_constant(name: str):
    """`parse_constant` for json.loads: NaN and Infinity are no JSON numbers (ValueError)."""
    raise ValueError(f"{name} is not a number (JSON has no {name})")


def load_json(text: str, constants: bool = True):
    """json.loads refusing a key twice (DuplicateKey) and, with constants=False, NaN and
    Infinity (ValueError). Catch json.JSONDecodeError first: it is a ValueError too."""
    if constants:
        return json.loads(text, object_pairs_hook=unique_keys)
    return json.loads(text, object_pairs_hook=unique_keys, parse_constant=no_constant)

