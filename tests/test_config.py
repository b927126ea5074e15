"""The typed config: defaults reproduce the reference; bad keys and types are named."""
import re
import shutil
import subprocess

import pytest

from s3rec.config import Config, ConfigError, config_from_dict, flat_keys, load_config
from s3rec.launch.grid import GridError, load_grid
from tests.train_helpers import REPO, clean_env, tiny_data  # noqa: F401


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


def test_a_key_twice_in_a_config_file_is_refused_naming_its_lines(tmp_path):
    """PyYAML keeps the last value: the first epochs, or a whole first `pretrain:` block, would
    be dropped without a word."""
    f = tmp_path / "twice.yaml"
    f.write_text("pretrain:\n  epochs: 150\n  lr: 0.001\n  epochs: 30\n")
    with pytest.raises(ConfigError, match=r"^config file .*twice\.yaml: key 'epochs' appears twice "
                                          r"in one mapping \(lines 2 and 4\)"):
        load_config(f)
    f.write_text("pretrain:\n  epochs: 150\nseed: 1\npretrain:\n  lr: 0.01\n")
    with pytest.raises(ConfigError, match=r"key 'pretrain' appears twice .*\(lines 1 and 4\)"):
        load_config(f)
    # a merge's keys overridden by the mapping's own are what a merge is for, not a key twice
    f.write_text("x: &base {epochs: 5, lr: 0.01}\npretrain:\n  <<: *base\n  epochs: 7\n")
    with pytest.raises(ConfigError, match="config key 'x'"):       # refused only as unknown
        load_config(f)


def test_a_key_twice_in_an_override_value_or_a_grid_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"override 'model.attr_fields=\{a: 1, a: 2\}': value for "
                                          r"'model.attr_fields': key 'a' appears twice"):
        load_config(None, ["model.attr_fields={a: 1, a: 2}"])
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"name: g\ndata: [{tmp_path}]\nseeds: [1]\nseeds: [2, 3]\n")
    with pytest.raises(GridError, match=r"grid file .*grid\.yaml: key 'seeds' appears twice in "
                                          r"one mapping \(lines 3 and 4\)"):
        load_grid(grid)


def test_yaml_value_pyyaml_cannot_build_names_the_file(tmp_path):
    """PyYAML raises ValueError (not YAMLError) for a date that is none or a 5000-digit int."""
    f = tmp_path / "date.yaml"
    f.write_text("seed: 2024-13-45\n")
    with pytest.raises(ConfigError, match=r"date\.yaml: a value cannot be read: month must be"):
        load_config(f)
    f.write_text(f"pretrain:\n  epochs: {'1' * 5000}\n")
    with pytest.raises(ConfigError, match=r"date\.yaml: a value cannot be read: Exceeds the limit"):
        load_config(f)


def test_round_trip_through_dict():
    c = load_config(None, ["variant=s3rec-lowrank", "seed=3"])
    assert config_from_dict(c.to_dict()) == c


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


# ------------------------------------------------------------------ every value in its range

def _keys_of_type(kind: type) -> list[str]:
    """Dotted keys of Config whose default is exactly `kind` (bool is not an int here)."""
    return [k for k, v in flat_keys(Config().to_dict()).items() if type(v) is kind]


@pytest.mark.parametrize("override", [
    "model.num_heads=0", "model.num_heads=-2", "model.num_heads=3",      # 3 does not divide 64
    "model.hidden_size=0", "model.num_layers=-1", "model.num_layers=0", "model.inner_size=0",
    "model.max_seq_length=0", "model.hidden_dropout=1.5", "model.hidden_dropout=1",
    "model.attention_dropout=-0.1", "model.initializer_range=-0.02", "model.initializer_range=0",
    "model.layer_norm_eps=0", "model.heads.sp.rank=-1", "model.heads.aap.weight_decay=-1",
    "pretrain.weights.aap=.nan", "pretrain.weights.sp=-0.5", "pretrain.mask_prob=1.5",
    "pretrain.lr=-1", "pretrain.lr=0", "finetune.lr=-0.001", "pretrain.lr=1e999",
    "pretrain.adam_beta1=1", "finetune.adam_beta2=1.5", "pretrain.adam_beta2=-0.1",
    "pretrain.weight_decay=-0.1", "pretrain.batch_size=0", "finetune.batch_size=-4",
    "pretrain.epochs=-1", "finetune.patience=-1", "deepspeed.grad_accum=0",
    "deepspeed.zero_stage=-1", "logging.progress_every_s=-1", "seed=-1", "seed=4294967296",
    "seed=2024-13-45",                              # YAML reads a date, and this one is none
    pytest.param("model.heads.map.weight_decay=" + "9" * 400,     # beyond float's range
                 id="model.heads.map.weight_decay=<400 digits>"),
    "model.fast_dropout=1", "logging.tensorboard=0", "logging.profile_steps=[true, 5]",
])
def test_bad_value_is_one_line_naming_the_key(override):
    key = override.split("=", 1)[0]
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert f"'{key}'" in str(e.value) and "\n" not in str(e.value)
    assert len(str(e.value)) < 200 + len(override)


def test_range_error_says_what_was_expected():
    with pytest.raises(ConfigError, match=re.escape(
            "config key 'pretrain.adam_beta1': expected [0, 1), got 1.0")):
        load_config(None, ["pretrain.adam_beta1=1"])
    with pytest.raises(ConfigError, match=re.escape(
            "config key 'model.num_heads': expected >= 1, got 0")):
        load_config(None, ["model.num_heads=0"])


@pytest.mark.parametrize("key", _keys_of_type(int) + _keys_of_type(float))
def test_every_numeric_key_has_a_lower_bound(key):
    """No int or float key takes a large negative number: each has a range."""
    with pytest.raises(ConfigError, match=re.escape(f"config key '{key}': ")):
        load_config(None, [f"{key}=-1000000000"])


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan", "inf", "-Infinity", "1e999"])
@pytest.mark.parametrize("key", _keys_of_type(float))
def test_every_float_key_refuses_nan_and_inf_from_overrides(key, value):
    with pytest.raises(ConfigError, match=re.escape(f"config key '{key}': expected a finite")):
        load_config(None, [f"{key}={value}"])


def test_nan_and_inf_refused_from_yaml_files_and_stored_configs(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("pretrain:\n  weights: {aap: .nan}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: config key 'pretrain\.weights\.aap': "
                                          r"expected a finite number, got nan"):
        load_config(f)
    f.write_text("model:\n  initializer_range: .inf\n")
    with pytest.raises(ConfigError, match=r"'model\.initializer_range': expected a finite"):
        load_config(f)
    stored = Config().to_dict()                 # json.loads reads NaN in a run.json as nan
    stored["finetune"]["lr"] = float("nan")
    with pytest.raises(ConfigError, match=r"'finetune\.lr': expected a finite number"):
        config_from_dict(stored)


@pytest.mark.parametrize("value", ["0", "1"])
@pytest.mark.parametrize("key", _keys_of_type(bool))
def test_bool_keys_refuse_0_and_1(key, value):
    with pytest.raises(ConfigError, match=re.escape(f"config key '{key}': expected bool")):
        load_config(None, [f"{key}={value}"])


def test_values_at_the_ends_of_their_ranges_are_accepted():
    c = load_config(None, [
        "seed=0", "model.hidden_dropout=0", "model.attention_dropout=0.99", "model.num_heads=64",
        "model.max_seq_length=1", "model.head_rank=64", "model.heads.aap.rank=64",
        "pretrain.adam_beta1=0", "pretrain.mask_prob=1", "pretrain.weights.aap=0",
        "pretrain.epochs=0", "finetune.epochs=0", "finetune.patience=0",
        "logging.progress_every_s=0", "deepspeed.gradient_clipping=0", "deepspeed.zero_stage=3",
        "checkpoint.every_steps=0"])
    assert (c.seed, c.model.num_heads, c.model.max_seq_length) == (0, 64, 1)
    assert (c.pretrain.mask_prob, c.model.attention_dropout, c.finetune.patience) == (1.0, 0.99, 0)
    assert load_config(None, ["seed=4294967295"]).seed == 2 ** 32 - 1


@pytest.mark.parametrize("name", ["beauty.yaml", "tiny.yaml"])
def test_shipped_configs_load(name):
    load_config(REPO / "configs" / name)


@pytest.mark.parametrize("grid", sorted((REPO / "configs" / "grids").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_grids_load(grid):
    """load_grid checks every cell's training config (each variant and rank)."""
    assert load_grid(grid).variants


def test_pretrain_with_a_bad_key_exits_with_one_line_and_writes_nothing(tiny_data, tmp_path):
    out = tmp_path / "run"
    p = subprocess.run([shutil.which("s3rec-pretrain"), "--data", str(tiny_data),
                        "--out", str(out), "model.num_heads=0"],
                       capture_output=True, text=True, timeout=120, env=clean_env(), cwd=REPO)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "s3rec-pretrain: error: config key 'model.num_heads': expected >= 1, got 0"]
    assert not out.exists()
