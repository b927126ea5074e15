"""Several attribute fields: the config shape, the layout, each field's table and heads, the
per-field AAP / MAP losses (default and fixed-shape paths) against a dense transcription."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from s3rec.config import Config, ConfigError, load_config
from s3rec.data.batch import pad_pretrain_batch
from s3rec.data.fields import field_layout, split_global, stack_fields
from s3rec.model import build_model, param_groups
from s3rec.objectives import pretrain_losses
from s3rec.static_objectives import pretrain_losses_static
from tests.test_objectives import ATTR_SIZE, ITEM_SIZE, MAX_LEN, NUM_ATTRS, make_batch
from tests.test_static_objectives import table_of

LAYOUT = field_layout([("genre", 4), ("brand", NUM_ATTRS - 4)])     # global ids 1..4, 5..9


def two_field_model(seed: int = 0, *overrides: str):
    cfg = load_config(None, ["model.max_seq_length=12", "model.hidden_size=16",
                             "model.inner_size=32", *overrides])
    torch.manual_seed(seed)
    model = build_model(cfg, ITEM_SIZE, ATTR_SIZE, fields=LAYOUT)
    with torch.no_grad():        # larger than the N(0, 0.02) init: losses away from their start
        for f in LAYOUT:
            model.attribute_table(f.name).weight.mul_(60)
    return model.eval(), cfg


def dense_field_loss(model, batch, field, objective: str) -> torch.Tensor:
    """BCELoss(sigmoid(head(h) E_f^T), Y_f, sum) at the positions the objective reads, Y_f the
    multi-hot of the item's ids in field f (its own ids, column 0 = padding), from scratch."""
    B, L = batch.masked_items.shape
    hidden = model.encode(torch.cat([batch.masked_items, batch.sp_masked, batch.sp_pos,
                                     batch.sp_neg]), batch.positions.repeat(4, 1), causal=False)
    flat = hidden[:B].reshape(B * L, -1)
    masked = batch.masked.reshape(-1)
    rows = masked if objective == "map" else (batch.original_items.reshape(-1) != 0) & ~masked
    y = torch.zeros(B * L, field.size)
    for p, a in batch.attr_index.tolist():
        if field.offset < a <= field.offset + field.num_attributes:
            y[p, a - field.offset] = 1
    logits = model.field_head(field.name, objective)(flat[rows]) @ \
        model.attribute_table(field.name).weight.T
    return F.binary_cross_entropy(torch.sigmoid(logits), y[rows], reduction="sum")


def test_stack_and_split_are_inverse_and_shift_each_field():
    a = (np.array([1, 3, 2], np.int32), np.array([0, 0, 2, 3, 3]))
    b = (np.array([2, 1, 1], np.int32), np.array([0, 0, 1, 3, 3]))
    layout = field_layout([("x", 3), ("y", 2)])
    values, offsets = stack_fields([a, b], layout)
    assert offsets.tolist() == [0, 0, 3, 6, 6]
    assert values.tolist() == [1, 3, 5, 2, 4, 4]          # row by row: x's ids, then y's + 3
    for (v, o), (v0, o0) in zip(split_global(values, offsets, layout), [a, b]):
        assert v.tolist() == v0.tolist() and o.tolist() == o0.tolist()


@pytest.mark.parametrize("counts,expect", [
    ([], "at least one attribute field"), ([("a b", 1)], "'a b'"),
    ([("x", 1), ("x", 2)], "appears twice"), ([("x", -1)], "num_attributes -1")])
def test_bad_layouts_are_named(counts, expect):
    with pytest.raises(ValueError, match=expect):
        field_layout(counts)


def test_two_fields_have_their_own_tables_and_heads():
    model, _ = two_field_model(0, "model.fields.brand.aap.kind=lowrank",
                               "model.fields.brand.aap.rank=3")
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes["attribute_embeddings_genre.weight"] == (5, 16)
    assert shapes["attribute_embeddings_brand.weight"] == (6, 16)
    assert shapes["aap_genre_norm.weight"] == (16, 16)
    assert shapes["aap_brand_norm.U"] == (16, 3)
    assert {"map_genre_norm.weight", "map_brand_norm.weight", "mip_norm.weight",
            "sp_norm.weight"} <= set(shapes)
    assert not any(n.startswith(("attribute_embeddings.", "aap_norm.", "map_norm."))
                   for n in shapes)


def test_field_config_inherits_model_heads_key_by_key():
    cfg = load_config(None, ["model.heads.aap.weight_decay=0.5",
                             "model.fields.brand.aap.kind=lowrank",
                             "model.fields.brand.aap.rank=3", "model.fields.brand.map.weight=0.25"])
    brand = cfg.field_head("brand", "aap")
    assert (brand.kind, brand.rank, brand.weight_decay, brand.weight) == ("lowrank", 3, 0.5, 1.0)
    assert cfg.field_head("brand", "map").weight == 0.25
    genre = cfg.field_head("genre", "aap")
    assert (genre.kind, genre.weight_decay, genre.weight) == ("full", 0.5, 1.0)
    assert cfg.model.fields == {"brand": {"aap": {"kind": "lowrank", "rank": 3},
                                          "map": {"weight": 0.25}}}
    lowrank = load_config(None, ["variant=s3rec-lowrank", "model.head_rank=4"])
    assert (lowrank.field_head("genre", "map").kind, lowrank.field_head("genre", "map").rank) \
        == ("lowrank", 4)


@pytest.mark.parametrize("override,expect", [
    ("model.fields.brand.aap.rank=-1", "model.fields.brand.aap.rank': expected >= 0"),
    ("model.fields.brand.map.weight=-0.5", "model.fields.brand.map.weight': expected >= 0"),
    ("model.fields.brand.aap.kind=dense", "model.fields.brand.aap.kind': expected full|lowrank"),
    ("model.fields.brand.aap.rank=99", "rank 99 is larger than the hidden size"),
    ("model.fields.brand.mip.rank=2", "keys among aap|map"),
    ("model.fields.brand.aap.colour=2", "unknown config key 'model.fields.brand.aap.colour'"),
    ("model.fields.brand.aap.weight=nan", "expected a finite number"),
    ("model.fields.brand.aap.rank=two", "expected int"),
    ("model.fields.9x.aap.rank=2", "a field name is a letter"),
    ("model.fields=3", "expected a mapping"),
])
def test_bad_field_keys_are_named(override, expect):
    with pytest.raises(ConfigError, match=expect.replace("|", r"\|")):
        load_config(None, [override])


def test_a_field_the_dataset_lacks_is_a_config_error():
    cfg = load_config(None, ["model.fields.colour.aap.rank=2"])
    with pytest.raises(ConfigError, match="no attribute field 'colour' .*genre, brand"):
        build_model(cfg, ITEM_SIZE, ATTR_SIZE, fields=LAYOUT)


def test_field_weight_decay_gets_its_own_param_group():
    model, cfg = two_field_model(0, "model.fields.brand.aap.weight_decay=0.1")
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert set(groups) == {"base", "head:aap_brand"}
    assert groups["head:aap_brand"]["params"][0] is model.field_head("brand", "aap").weight
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_per_field_losses_equal_the_dense_transcription(reduction):
    model, cfg = two_field_model(1, "model.fields.brand.map.weight=0.5")
    batch, _ = make_batch(3, B=5, L=7)
    out = pretrain_losses(model, batch, cfg.pretrain.weights, reduction)
    counts = {"aap": ((batch.original_items != 0) & ~batch.masked).sum(), "map": batch.masked.sum()}
    for objective in ("aap", "map"):
        for f in LAYOUT:
            want = dense_field_loss(model, batch, f, objective)
            want = want / counts[objective] if reduction == "mean" else want
            assert torch.allclose(out[f"{objective}.{f.name}"], want, rtol=1e-5), (objective, f)
    assert torch.allclose(out["map"], out["map.genre"] + 0.5 * out["map.brand"])
    assert torch.allclose(out["aap"], out["aap.genre"] + out["aap.brand"])
    w = cfg.pretrain.weights
    assert torch.allclose(out["total"], w.aap * out["aap"] + w.mip * out["mip"]
                          + w.map * out["map"] + w.sp * out["sp"])


def test_static_path_equals_default_path_with_two_fields():
    model, cfg = two_field_model(2, "model.fields.genre.aap.weight=0.3")
    batch, _ = make_batch(5, B=5, L=7)
    ref = pretrain_losses(model, batch, cfg.pretrain.weights)
    got = pretrain_losses_static(model, pad_pretrain_batch(batch, rows=8, length=MAX_LEN),
                                 table_of(batch), cfg.pretrain.weights)
    assert set(got) == set(ref)
    for name in ref:
        assert torch.allclose(got[name], ref[name], rtol=1e-5, atol=1e-6), name


def test_a_field_of_weight_0_is_not_computed():
    model, cfg = two_field_model(0, "model.fields.brand.aap.weight=0",
                                 "model.fields.brand.map.weight=0")
    batch, _ = make_batch(0)
    out = pretrain_losses(model, batch, cfg.pretrain.weights)
    assert "aap.brand" not in out and "map.brand" not in out
    assert torch.equal(out["aap"], out["aap.genre"])
    out["total"].backward()
    assert model.attribute_table("brand").weight.grad is None
    assert model.attribute_table("genre").weight.grad is not None


def test_two_field_state_round_trips_and_names_its_layout():
    from s3rec.model.field_heads import fields_of_state, state_attribute_size
    model, cfg = two_field_model(0)
    state = model.state_dict()
    assert fields_of_state(state) == LAYOUT
    assert state_attribute_size(state) == ATTR_SIZE
    again = build_model(cfg, ITEM_SIZE, ATTR_SIZE, init_state=state)   # layout from the state
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), state.values()))
    one = build_model(Config(), ITEM_SIZE, ATTR_SIZE).state_dict()
    assert fields_of_state(one) is None and state_attribute_size(one) == ATTR_SIZE
