"""The typed config: defaults reproduce the reference; bad keys and types are named."""
import re

import pytest

from s3rec.config import Config, ConfigError, config_from_dict, load_config


def test_defaults_are_the_reference_settings():
    c = Config()
    assert (c.model.hidden_size, c.model.num_layers, c.model.num_heads) == (64, 2, 2)
    assert (c.model.max_seq_length, c.model.hidden_dropout, c.model.attention_dropout) == (50, 0.5, 0.5)
    w = c.pretrain.weights
    assert (w.aap, w.mip, w.map, w.sp) == (0.2, 1.0, 1.0, 0.5)
    assert (c.pretrain.batch_size, c.pretrain.lr, c.pretrain.mask_prob) == (100, 1e-3, 0.2)
    assert (c.pretrain.reduction, c.pretrain.pair_form) == ("sum", "original")
    assert (c.finetune.batch_size, c.finetune.epochs, c.finetune.patience) == (256, 200, 10)


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("pretrain:\n  epochs: 3\n  weights: {sp: 0}\nseed: 7\n")
    c = load_config(f, ["pretrain.epochs=5", "model.heads.aap.rank=8"])
    assert c.pretrain.epochs == 5 and c.seed == 7 and c.pretrain.weights.sp == 0.0
    assert c.model.heads.aap.rank == 8


def test_lowrank_variant_makes_aap_and_map_lowrank():
    c = load_config(None, ["variant=s3rec-lowrank", "model.head_rank=4"])
    assert c.head("aap").kind == "lowrank" and c.head("aap").rank == 4
    assert c.head("map").kind == "lowrank"
    assert c.head("mip").kind == "full" and c.head("sp").kind == "full"
    c = load_config(None, ["model.heads.sp.kind=lowrank", "model.heads.sp.rank=2"])
    assert c.head("sp").kind == "lowrank" and c.head("sp").rank == 2


@pytest.mark.parametrize("override, named", [
    ("pretrain.epoch=2", "pretrain.epoch"),
    ("pretrain.epochs=abc", "pretrain.epochs"),
    ("pretrain.lr=true", "pretrain.lr"),
    ("model.heads.map.rank=65", "model.heads.map.rank"),
    ("model.head_rank=100", "model.head_rank"),
    ("variant=bert4rec", "variant"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
    ("deepspeed.adam_kernel=adamw", "deepspeed.adam_kernel"),
    ("nonsense.key=1", "nonsense"),
    ("pretrain.lr=abc", "pretrain.lr"),
    ("pretrain.save_epochs=[a]", "pretrain.save_epochs"),
    ("pretrain.save_epochs=[0]", "pretrain.save_epochs"),
    ("checkpoint.every_steps=-1", "checkpoint.every_steps"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last"),
    ("data.bucket_size=0", "data.bucket_size"),
    ("finetune.eval_batch_size=0", "finetune.eval_batch_size"),
    ("finetune.length_chunks=0", "finetune.length_chunks"),
    ("logging.every_steps=0", "logging.every_steps"),
    ("deepspeed.gradient_clipping=-1", "deepspeed.gradient_clipping"),
])
def test_bad_override_names_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize("override", ["model.hidden_size=[1", 'x="a'])
def test_override_that_is_not_yaml_names_the_override(override):
    named = re.escape(f"override '{override}': value for '{override.split('=')[0]}'")
    with pytest.raises(ConfigError, match=named + " is not valid YAML"):
        load_config(None, [override])


def test_unreadable_config_file_names_the_file(tmp_path):
    folder = tmp_path / "conf.yaml"
    folder.mkdir()
    with pytest.raises(ConfigError, match=r"config file .*conf\.yaml: cannot be read"):
        load_config(folder)
    binary = tmp_path / "latin1.yaml"
    binary.write_bytes(b"model:\n  hidden_size: \xff\n")
    with pytest.raises(ConfigError, match=r"config file .*latin1\.yaml: not UTF-8"):
        load_config(binary)


def test_bad_yaml_key_names_file_and_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  hidden: 32\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*model\.hidden"):
        load_config(f)


def test_round_trip_through_dict():
    c = load_config(None, ["variant=s3rec-lowrank", "seed=3"])
    assert config_from_dict(c.to_dict()) == c


def test_retired_key_is_dropped_from_stored_configs_and_refused_from_users(tmp_path):
    """data.num_workers (never used) is gone: a run.json or checkpoint written before keeps
    loading, while a YAML file or an override naming it stops with the reason."""
    c = load_config(None, ["seed=3"])
    old = c.to_dict()
    old["data"] = {"num_workers": 0, **old["data"]}          # as earlier versions stored it
    assert config_from_dict(old) == c
    with pytest.raises(ConfigError, match=r"'data\.num_workers': removed: it was never used"):
        load_config(None, ["data.num_workers=2"])
    f = tmp_path / "old.yaml"
    f.write_text("data:\n  num_workers: 2\n")
    with pytest.raises(ConfigError, match=r"old\.yaml: config key 'data\.num_workers': removed"):
        load_config(f)


@pytest.mark.parametrize("overrides, message", [
    (["pretrain.compile=max"], r"'pretrain\.compile': expected one of none\|default\|reduce-overhead"),
    (["pretrain.compile=default"], r"needs pretrain\.static_shapes=true"),
    (["pretrain.static_shapes=true", "pretrain.compile=reduce-overhead",
      "deepspeed.zero_stage=3"], r"'pretrain\.compile': not with deepspeed\.zero_stage 3"),
    (["pretrain.static_shapes=true", "pretrain.compile=reduce-overhead",
      "deepspeed.grad_accum=2"], r"'pretrain\.compile': reduce-overhead needs "
                                 r"deepspeed\.grad_accum=1, got 2"),
])
def test_compile_needs_static_shapes_zero_below_3_and_no_accumulation_in_graphs(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
    ok = load_config(None, ["pretrain.static_shapes=true", "pretrain.compile=default"])
    assert ok.pretrain.compile == "default" and Config().pretrain.compile == "none"
    ok = load_config(None, ["pretrain.static_shapes=true", "pretrain.compile=default",
                            "deepspeed.grad_accum=2"])      # no CUDA graph: accumulation is fine
    assert ok.deepspeed.grad_accum == 2


def test_exponent_floats_read_as_floats_from_yaml_and_overrides(tmp_path):
    """PyYAML (YAML 1.1) reads 1e-3 as a string; a float key takes it as the number it is."""
    f = tmp_path / "c.yaml"
    f.write_text("pretrain:\n  lr: 1e-3\n")
    assert load_config(f).pretrain.lr == 0.001
    assert load_config(None, ["finetune.lr=5e-4"]).finetune.lr == 0.0005
