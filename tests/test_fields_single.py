"""One attribute field is today's model: same losses step by step, same parameter names.

tests/data/fields_single_field_losses.json holds the first 100 logged losses (logging.every_steps=1)
of `s3rec-pretrain` on `synthetic --users 200 --items 150 --attributes 20 --seed 12345` with
configs/tiny.yaml, seed 42, recorded with the single-vocabulary code (the format 1 dataset and
the model with one attribute table), on the default path and with pretrain.static_shapes.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.train_helpers import REPO, command, run, scalars, tiny_data, train_args  # noqa: F401

REFERENCE = Path(__file__).parent / "data" / "fields_single_field_losses.json"


def first_losses(run_dir: Path, n: int = 100) -> dict[str, list[float]]:
    s = scalars(run_dir)
    return {tag: [v for _, v in s[tag][:n]] for tag in sorted(s) if tag.startswith("loss/")}


@pytest.mark.parametrize("path", ["default", "static"])
def test_single_field_first_100_losses_equal_reference(tiny_data, tmp_path, path):
    # 25 steps an epoch: 4 epochs give the 100 steps (each epoch's draws depend on the epoch
    # only, so the count of epochs does not change them)
    extra = ["pretrain.static_shapes=true"] if path == "static" else []
    out = tmp_path / "run"
    run(command("single", "s3rec.pretrain",
                train_args(tiny_data, out, "pretrain.epochs=4", "logging.every_steps=1",
                           "pretrain.save_epochs=[]", *extra)))
    got = first_losses(out)
    want = json.loads(REFERENCE.read_text())[path]
    assert sorted(got) == sorted(want)             # the tags: loss/aap, loss/map, ... as before
    for tag in want:
        assert got[tag] == want[tag], tag           # bit-identical float32 scalars


def test_single_field_dataset_is_one_field_named_attributes(tiny_data):
    from s3rec.data.reader import Dataset
    ds = Dataset(tiny_data)
    assert [(f.name, f.num_attributes, f.offset) for f in ds.attribute_fields] == \
        [("attributes", ds.num_attributes, 0)]
    assert ds.manifest["attribute_fields"][0]["name"] == "attributes"


def test_single_field_parameter_names_are_the_authors():
    from s3rec.config import Config
    from s3rec.model import build_model
    model = build_model(Config(), 12, 7)
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert names == {"item_embeddings", "attribute_embeddings", "position_embeddings",
                     "item_encoder", "LayerNorm", "aap_norm", "mip_norm", "map_norm", "sp_norm"}
