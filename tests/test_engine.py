"""Engine parts in one process: the derived DeepSpeed config, micro-batch splitting, and a real
DeepSpeed engine (world size 1, gloo) around a tiny stand-in model for checkpoints and resume."""
import importlib.metadata
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from packaging.specifiers import SpecifierSet
from torch import nn

from s3rec.config import NO_RESULT_KEYS, ConfigError, load_config
from s3rec.data.batch import PretrainBatch
from s3rec.engine import checkpoint as ckpt
from s3rec.engine.deepspeed_setup import HOST_TRIMS, build_ds_config, initialize
from s3rec.engine.deepspeed_trims import WRITTEN_FOR
from s3rec.engine.loop import split_rows
from s3rec.engine.profile import count_ops

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "deepspeed"
DEEPSPEED = importlib.metadata.version("deepspeed")
# deepspeed.host_trims is refused outside the DeepSpeed releases it was written for (tested below
# with the version string replaced); there, the trims' own tests have nothing to run.
needs_trims = pytest.mark.skipif(
    not SpecifierSet(WRITTEN_FOR).contains(DEEPSPEED, prereleases=True),
    reason=f"deepspeed.host_trims: written for DeepSpeed {WRITTEN_FOR}, not {DEEPSPEED}")


# ------------------------------------------------------------------ the derived config

def test_batch_sizes_multiply_out():
    cfg = load_config(None, ["pretrain.batch_size=100", "deepspeed.grad_accum=5"])
    c = build_ds_config(cfg, "pretrain", world_size=2, device_type="cpu")
    assert c["train_batch_size"] == 100
    assert c["train_micro_batch_size_per_gpu"] * c["gradient_accumulation_steps"] * 2 == 100
    assert c["train_micro_batch_size_per_gpu"] == 10


def test_indivisible_global_batch_names_the_key():
    cfg = load_config(None, ["finetune.batch_size=255"])
    with pytest.raises(ConfigError, match="finetune.batch_size"):
        build_ds_config(cfg, "finetune", world_size=2, device_type="cpu")


def test_optimizer_is_plain_adam_with_config_values():
    cfg = load_config(None, ["pretrain.lr=0.002", "pretrain.adam_beta2=0.98"])
    opt = build_ds_config(cfg, "pretrain", 1, "cpu")["optimizer"]
    assert opt["type"] == "Adam" and opt["params"]["adam_w_mode"] is False
    assert opt["params"]["lr"] == 0.002 and opt["params"]["betas"] == [0.9, 0.98]
    assert opt["params"]["torch_adam"] is True and opt["params"]["weight_decay"] == 0.0


def test_precision_rules_on_cpu():
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        build_ds_config(load_config(None, ["deepspeed.precision=fp16", "deepspeed.zero_stage=2"]),
                        "pretrain", 1, "cpu")
    with pytest.raises(ConfigError, match="zero_stage >= 1"):
        build_ds_config(load_config(None, ["deepspeed.precision=bf16"]), "pretrain", 1, "cpu")
    c = build_ds_config(load_config(None, ["deepspeed.precision=bf16", "deepspeed.zero_stage=1"]),
                        "pretrain", 1, "cpu")
    assert c["bf16"]["enabled"] and not c["fp16"]["enabled"]
    c = build_ds_config(load_config(None, ["deepspeed.precision=fp16", "deepspeed.zero_stage=2"]),
                        "pretrain", 1, "cuda")
    assert c["fp16"]["enabled"]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_deepspeed_file_merges(path):
    cfg = load_config(None, [f"deepspeed.config_file={path}"])
    device = "cuda" if "fp16" in path.name or "zero0-bf16" in path.name else "cpu"
    c = build_ds_config(cfg, "pretrain", 1, device)
    stage = int(path.name[4])
    assert c["zero_optimization"]["stage"] == stage == cfg.deepspeed.zero_stage
    want = "bf16" if "bf16" in path.name else "fp16" if "fp16" in path.name else "fp32"
    assert cfg.deepspeed.precision == want
    assert c["train_batch_size"] == cfg.pretrain.batch_size


def test_file_setting_a_derived_key_differently_is_an_error(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"train_batch_size": 64}))
    with pytest.raises(ConfigError, match="train_batch_size.*pretrain.batch_size"):
        build_ds_config(load_config(None, [f"deepspeed.config_file={f}"]), "pretrain", 1, "cpu")
    f.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        build_ds_config(load_config(None, [f"deepspeed.config_file={f}"]), "pretrain", 1, "cpu")


def test_a_key_twice_in_the_deepspeed_file_is_refused(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text('{"zero_optimization": {"stage": 2, "stage": 0}}')    # json keeps the last
    with pytest.raises(ConfigError, match=r"deepspeed config .*ds\.json: key 'stage' appears twice"):
        build_ds_config(load_config(None, [f"deepspeed.config_file={f}"]), "pretrain", 1, "cpu")


def test_unreadable_deepspeed_file_names_the_file(tmp_path):
    folder = tmp_path / "dsdir.json"
    folder.mkdir()
    with pytest.raises(ConfigError, match=r"deepspeed\.config_file.*dsdir\.json cannot be read"):
        build_ds_config(load_config(None, [f"deepspeed.config_file={folder}"]), "pretrain", 1,
                        "cpu")
    binary = tmp_path / "latin1.json"
    binary.write_bytes(b'{"bf16": "\xff"}')
    with pytest.raises(ConfigError, match=r"deepspeed config .*latin1\.json: not UTF-8"):
        build_ds_config(load_config(None, [f"deepspeed.config_file={binary}"]), "pretrain", 1,
                        "cpu")


@pytest.mark.parametrize("content, key, expected", [
    ({"zero_optimization": {"stage": "two"}}, "zero_optimization.stage", "0, 1, 2 or 3"),
    ({"zero_optimization": {"stage": 2.5}}, "zero_optimization.stage", "0, 1, 2 or 3"),
    ({"zero_optimization": {"stage": True}}, "zero_optimization.stage", "0, 1, 2 or 3"),
    ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage", "0, 1, 2 or 3"),
    ({"zero_optimization": [2]}, "zero_optimization", "a JSON object"),
    ({"bf16": True}, "bf16", "a JSON object"),
    ({"fp16": {"enabled": "yes"}}, "fp16.enabled", "true or false"),
], ids=["stage-word", "stage-fraction", "stage-bool", "stage-4", "zero-list", "bf16-bool",
        "fp16-enabled-word"])
def test_file_values_of_the_wrong_type_name_the_key(tmp_path, content, key, expected):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=rf"ds\.json: '{re.escape(key)}' must be {expected}"):
        build_ds_config(load_config(None, [f"deepspeed.config_file={f}"]), "pretrain", 1, "cpu")


def test_file_choosing_zero3_under_a_compiled_step_is_an_error(tmp_path):
    """The config's cross-key rules hold for what a DeepSpeed file chooses: pretrain.compile
    cannot run at ZeRO 3, whether the stage comes from deepspeed.zero_stage or from the file."""
    f = tmp_path / "z3.json"
    f.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    cfg = load_config(None, ["pretrain.static_shapes=true", "pretrain.compile=default",
                             f"deepspeed.config_file={f}"])
    with pytest.raises(ConfigError, match=r"z3\.json: config key 'pretrain\.compile': not with "
                                          r"deepspeed\.zero_stage 3"):
        build_ds_config(cfg, "pretrain", 1, "cpu")


# ------------------------------------------------------------------ micro-batches

def test_split_rows_rebases_sparse_attribute_targets():
    B, L = 5, 3
    t = lambda: torch.arange(B * L).reshape(B, L)
    pairs = torch.tensor([[r * L + c, 1 + (r + c) % 4] for r in range(B) for c in range(L)])
    batch = PretrainBatch(masked_items=t(), positions=t(), original_items=t(), mip_neg=t(),
                          masked=t() % 2 == 0, sp_masked=t(), sp_pos=t(), sp_neg=t(),
                          attr_index=pairs)
    parts = split_rows(batch, 2)
    assert [p.masked_items.shape[0] for p in parts] == [2, 3]
    for p, lo in zip(parts, (0, 2)):
        for flat, attr in p.attr_index.tolist():
            r, c = divmod(flat, L)
            assert attr == 1 + (r + lo + c) % 4          # the same target, re-based rows
        assert len(p.attr_index) == p.masked_items.numel()
    assert torch.equal(torch.cat([p.sp_neg for p in parts]), batch.sp_neg)


# ------------------------------------------------------------------ a real engine, world size 1

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.lin = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.5)


def tiny_loss(m, x):
    h = m.drop(m.lin(m.emb(x)))                          # [B, 8]
    return (h @ m.emb.weight.T).logsumexp(-1).sum()      # reads the table outside a forward


# what setup() and DeepSpeed put into os.environ the first time (RANK, LOCAL_RANK, ...)
_GROUP_ENV: dict = {}


@pytest.fixture(scope="module")
def single_process():
    """A world of one in this pytest process. The process group is made once and never
    destroyed: DeepSpeed caches the groups of the first one, so a module that destroyed it and
    made another would leave the next module's engines on an unregistered group. The variables
    setup() and DeepSpeed write into os.environ (DeepSpeed reads LOCAL_RANK at every engine)
    are there during a module that asks for this fixture only: after it, every later test's
    subprocess would inherit them and take itself for a launched rank."""
    import os
    from s3rec import distributed as dist
    saved = dict(os.environ)
    if not _GROUP_ENV:
        info = dist.setup()
        _GROUP_ENV.update({k: v for k, v in os.environ.items() if saved.get(k) != v})
    else:
        info = dist.setup()
        os.environ.update(_GROUP_ENV)
    try:
        yield info
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _engine(stage=0, host_trims=False):
    torch.manual_seed(0)
    m = Tiny()
    cfg = load_config(None, ["pretrain.batch_size=4", f"deepspeed.zero_stage={stage}",
                             f"deepspeed.host_trims={host_trims}"])
    return initialize(m, [{"params": list(m.parameters())}],
                      build_ds_config(cfg, "pretrain", 1, "cpu"))


def _steps(engine, n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, 30, (4,), generator=g)
        loss = engine(tiny_loss, x)
        engine.backward(loss)
        engine.step()
        out.append(loss.item())
    return out


def test_packed_copy_keeps_every_tensor_cpu_stands_in_for_gpu():
    """The one-copy-per-dtype transfer used for CUDA devices (pinned buffers need a GPU; the
    packing and splitting are the same on the CPU), through a real batch with its host plan
    (nested dataclass, lists of tensors, ints)."""
    import dataclasses
    from s3rec.data.batch import move_batch
    from s3rec.data.finetune_samples import FinetuneBatch
    from s3rec.objectives import finetune_plan
    g = torch.Generator().manual_seed(0)
    items = torch.randint(0, 9, (4, 3), generator=g).T                  # not contiguous
    target = torch.randint(0, 9, (3, 4), generator=g)
    target[0] = 0                                                       # an empty target group
    batch = FinetuneBatch(users=torch.arange(3), items=items,
                          positions=torch.arange(4).expand(3, 4), target_pos=target,
                          target_neg=torch.randint(0, 9, (3, 4), generator=g))
    batch = dataclasses.replace(batch, plan=finetune_plan(items, target, 3))
    out = move_batch(batch, "cpu", pack=True)
    pairs = [(getattr(out, f.name), getattr(batch, f.name)) for f in dataclasses.fields(batch)
             if f.name != "plan" and getattr(batch, f.name) is not None]   # bce: no loss negatives
    assert out.loss_negatives is None and out.shared_negatives is None
    pairs += list(zip(out.plan.rows + out.plan.targets, batch.plan.rows + batch.plan.targets))
    for a, b in pairs:
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    assert (out.plan.keep, out.plan.total) == (batch.plan.keep, batch.plan.total)
    # one buffer per dtype: the int64 tensors are views of the same storage
    assert out.items.untyped_storage().data_ptr() == out.plan.rows[0].untyped_storage().data_ptr()
    # a pretraining batch: bool and int64 fields, nested index with an int
    from s3rec.objectives import pretrain_index
    from tests.test_objectives import make_batch
    pb, _ = make_batch(0)
    pb = dataclasses.replace(pb, index=pretrain_index(pb))
    po = move_batch(pb, "cpu", pack=True)
    assert po.masked.dtype == torch.bool and torch.equal(po.masked, pb.masked)
    assert torch.equal(po.index.map_targets, pb.index.map_targets)
    assert po.index.max_attribute == pb.index.max_attribute


def test_engine_runs_without_deepspeeds_synchronising_throughput_timer(single_process):
    """DeepSpeed's throughput timer would synchronise the device at every forward and step; the
    derived config turns it off (a file may turn it back on)."""
    engine = _engine()
    assert engine.tput_timer.config.enabled is False
    cfg = load_config(None, ["pretrain.batch_size=4"])
    assert build_ds_config(cfg, "pretrain", 1, "cpu")["timers"] == {"throughput": {"enabled": False}}


def test_bf16_nonfinite_check_is_a_config_key_and_a_file_may_not_contradict_it(tmp_path):
    """DeepSpeed's per-step bf16 inf/NaN test (~9 kernels a parameter and a device sync) is off
    unless deepspeed.bf16_skip_nonfinite asks for it; a file saying otherwise names the key."""
    base = ["deepspeed.precision=bf16", "deepspeed.zero_stage=2"]
    c = build_ds_config(load_config(None, base), "pretrain", 1, "cpu")
    assert c["bf16"] == {"enabled": True, "check_grad_overflow": False}
    c = build_ds_config(load_config(None, base + ["deepspeed.bf16_skip_nonfinite=true"]),
                        "pretrain", 1, "cpu")
    assert c["bf16"]["check_grad_overflow"] is True
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"bf16": {"enabled": True, "check_grad_overflow": True}}))
    with pytest.raises(ConfigError, match="check_grad_overflow.*deepspeed.bf16_skip_nonfinite"):
        build_ds_config(load_config(None, [f"deepspeed.config_file={f}", "deepspeed.zero_stage=2"]),
                        "pretrain", 1, "cpu")


def test_zero_per_step_grad_norm_is_off_only_where_deepspeed_does_not_need_it():
    """ZeRO 1-2 without clipping: no per-step norm (the loop takes it at log steps); kept for
    clipping, ZeRO 1 with bf16 (DeepSpeed's BF16 optimizer) and stage 0 (no such key)."""
    def zo(*keys):
        return build_ds_config(load_config(None, list(keys)), "pretrain", 1, "cpu")[
            "zero_optimization"]
    assert zo("deepspeed.zero_stage=2")["compute_grad_norm"] is False
    assert zo("deepspeed.zero_stage=1")["compute_grad_norm"] is False
    assert zo("deepspeed.zero_stage=2", "deepspeed.precision=bf16")["compute_grad_norm"] is False
    assert "compute_grad_norm" not in zo("deepspeed.zero_stage=1", "deepspeed.precision=bf16")
    assert "compute_grad_norm" not in zo("deepspeed.zero_stage=2", "deepspeed.gradient_clipping=1")
    assert "compute_grad_norm" not in zo("deepspeed.zero_stage=0")
    assert "compute_grad_norm" not in zo("deepspeed.zero_stage=3")


@pytest.mark.parametrize("skip", [True, False], ids=["skip_nonfinite", "default"])
def test_bf16_zero2_step_on_a_nan_gradient_skips_only_when_asked(single_process, skip):
    """A real bf16 ZeRO-2 engine on CPU, one step whose loss is NaN: with the check the weights
    stay as they were; without it (the default) the NaN reaches them, which the loss log shows."""
    torch.manual_seed(0)
    m = Tiny()
    cfg = load_config(None, ["pretrain.batch_size=4", "deepspeed.zero_stage=2",
                             "deepspeed.precision=bf16", f"deepspeed.bf16_skip_nonfinite={skip}"])
    engine = initialize(m, [{"params": list(m.parameters())}],
                        build_ds_config(cfg, "pretrain", 1, "cpu"))
    _steps(engine, 2, seed=1)
    before = [p.detach().float().clone() for p in engine.module.parameters()]
    loss = engine(tiny_loss, torch.randint(0, 30, (4,))) * float("nan")
    engine.backward(loss)
    engine.step()
    after = [p.detach().float() for p in engine.module.parameters()]
    if skip:
        assert all(torch.equal(a, b) for a, b in zip(after, before))
    else:
        assert any(a.isnan().any() for a in after)


class TinyWithUnused(Tiny):
    def __init__(self):
        super().__init__()
        self.unused = nn.Linear(3, 3)      # never in the loss: its gradient stays None


def _accumulated_steps(engine, micro_batches: int = 6) -> int:
    """Run `micro_batches` micro-batches of 2 (grad_accum=2: an optimizer step every second)
    with fixed data and dropout; returns the ATen operators of the last one, a boundary."""
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(2)
    ops = 0
    for i in range(micro_batches):
        x = torch.randint(0, 30, (2,), generator=g)

        def micro():
            engine.backward(engine(tiny_loss, x))
            engine.step()
        if i == micro_batches - 1:
            ops = count_ops(micro)
        else:
            micro()
    return ops


@needs_trims
def test_world1_zero0_skips_the_allreduce_with_identical_weights(single_process):
    """World size 1, ZeRO 0: our engine skips DeepSpeed's all-reduce of the gradients with
    themselves, and fills missing gradients and clears them after the step from a parameter list
    made once. Against DeepSpeed's own path (the overrides removed) on the same batches, with
    gradient accumulation, weight decay and a parameter that gets no gradient (DeepSpeed gives it
    zeros, which Adam's decay then moves): bit-identical weights, fewer operators per step."""
    cfg = load_config(None, ["pretrain.batch_size=4", "deepspeed.grad_accum=2",
                             "pretrain.weight_decay=0.1", "deepspeed.host_trims=true"])
    engines = []
    for skip in (True, False):
        torch.manual_seed(0)
        m = TinyWithUnused()
        e = initialize(m, [{"params": list(m.parameters()), "weight_decay": 0.1}],
                       build_ds_config(cfg, "pretrain", 1, "cpu"))
        assert "allreduce_gradients" in vars(e) and "zero_grad" in vars(e)
        if not skip:
            del e.allreduce_gradients, e.zero_grad     # DeepSpeed's own methods again
        engines.append(e)
    ops = [_accumulated_steps(e) for e in engines]
    skip, ds = engines
    unused_before = TinyWithUnused().unused.weight        # seed differs: just not all zeros
    assert not torch.equal(skip.module.model.unused.weight, unused_before)
    for (name, a), b in zip(skip.module.named_parameters(), ds.module.parameters()):
        assert torch.equal(a, b), name
    assert ops[0] < ops[1] - 10, ops


@pytest.mark.parametrize("stage,precision", [(1, "fp32"), (2, "fp32"), (1, "bf16"), (2, "bf16")])
def test_world1_zero_without_contiguous_gradients_has_identical_weights(single_process, stage,
                                                                         precision):
    """World size 1, ZeRO 1-2: contiguous_gradients defaults to off (nothing to reduce, the
    buffer is a copy per parameter for nothing). Against DeepSpeed's default (on), with
    accumulation: bit-identical weights, fewer operators per step."""
    cfg = load_config(None, ["pretrain.batch_size=4", "deepspeed.grad_accum=2",
                             f"deepspeed.zero_stage={stage}", f"deepspeed.precision={precision}"])
    assert build_ds_config(cfg, "pretrain", 2, "cpu")["zero_optimization"].get(
        "contiguous_gradients") is None                # DeepSpeed's default where ranks reduce
    engines, ops = [], []
    for contiguous in (False, True):
        ds_config = build_ds_config(cfg, "pretrain", 1, "cpu")
        assert ds_config["zero_optimization"]["contiguous_gradients"] is False
        ds_config["zero_optimization"]["contiguous_gradients"] = contiguous
        torch.manual_seed(0)
        m = Tiny()
        e = initialize(m, [{"params": list(m.parameters())}], ds_config)
        ops.append(_accumulated_steps(e))
        engines.append(e)
    for (name, a), b in zip(engines[0].module.named_parameters(), engines[1].module.parameters()):
        assert torch.equal(a, b), name
    masters = [e.optimizer.single_partition_of_fp32_groups for e in engines]   # fp32 masters
    assert all(torch.equal(a, b) for a, b in zip(*masters))
    assert ops[0] < ops[1], ops


@pytest.mark.parametrize("stage,precision,comm", [(1, "fp32", None), (2, "fp32", None),
                                                  (1, "bf16", None), (2, "bf16", None),
                                                  (2, "fp32", "bf16")])
@needs_trims
def test_world1_zero12_skips_the_reduce_with_identical_weights(single_process, stage, precision,
                                                                comm):
    """World size 1, ZeRO 1-2: our engine skips DeepSpeed's flatten / all-reduce with itself /
    copy back of every gradient bucket, and repoints the parameters at the flat buffer after a
    step only if they moved. Against DeepSpeed's own path (the overrides removed), with
    accumulation, weight decay and a parameter without gradient: bit-identical weights and fp32
    masters, fewer operators. A communication dtype narrower than the gradients rounds them:
    DeepSpeed's path is kept there (same operators)."""
    cfg = load_config(None, ["pretrain.batch_size=4", "deepspeed.grad_accum=2",
                             "pretrain.weight_decay=0.1", f"deepspeed.zero_stage={stage}",
                             f"deepspeed.precision={precision}", "deepspeed.host_trims=true"])
    engines, ops = [], []
    for skip in (True, False):
        ds_config = build_ds_config(cfg, "pretrain", 1, "cpu")
        if comm:
            ds_config["communication_data_type"] = comm
        torch.manual_seed(0)
        m = TinyWithUnused()
        e = initialize(m, [{"params": list(m.parameters()), "weight_decay": 0.1}], ds_config)
        assert {"allreduce_and_copy", "_update_model_bit16_weights"} <= set(vars(e.optimizer))
        if not skip:                                   # DeepSpeed's own methods again
            del e.optimizer.allreduce_and_copy, e.optimizer._update_model_bit16_weights
        ops.append(_accumulated_steps(e))
        engines.append(e)
    for (name, a), b in zip(engines[0].module.named_parameters(), engines[1].module.parameters()):
        assert torch.equal(a, b), name
    masters = [e.optimizer.single_partition_of_fp32_groups for e in engines]
    assert all(torch.equal(a, b) for a, b in zip(*masters))
    flat = engines[0].optimizer.bit16_groups_flat[0]
    for p in engines[0].module.parameters():          # still slices of the flat buffer
        assert p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    n = len(list(engines[0].module.parameters()))
    # repointing is 4 operators a parameter; the reduce ~3 a parameter and a few a bucket
    saved = ops[1] - ops[0]
    assert saved == 4 * n if comm else saved > 4 * n + 2 * n, (ops, n)


@needs_trims
def test_zero12_reduce_is_deepspeeds_own_beyond_one_rank_or_with_overlap(single_process):
    """The skip is for one rank without overlap_comm only: there DeepSpeed's method stays."""
    cfg = load_config(None, ["pretrain.batch_size=4", "deepspeed.zero_stage=2",
                             "deepspeed.host_trims=true"])
    ds_config = build_ds_config(cfg, "pretrain", 1, "cpu")
    ds_config["zero_optimization"]["overlap_comm"] = True
    m = Tiny()
    e = initialize(m, [{"params": list(m.parameters())}], ds_config)
    assert "allreduce_and_copy" not in vars(e.optimizer)


@needs_trims
def test_zero12_repoints_the_parameters_when_the_flat_buffer_moved(single_process):
    """The repointing our ZeRO 1-2 step skips still happens where the buffer moved (as DeepSpeed's
    state offload and reload move it)."""
    e = _engine(2, host_trims=True)
    _steps(e, 2, seed=1)
    opt = e.optimizer
    flat = opt.bit16_groups_flat[0]
    flat.data = flat.data.clone()                  # the same values elsewhere
    ptr = flat.untyped_storage().data_ptr()
    assert all(p.untyped_storage().data_ptr() != ptr for p in e.module.parameters())
    opt._update_model_bit16_weights(0)
    assert all(p.untyped_storage().data_ptr() == ptr for p in e.module.parameters())
    assert all(torch.equal(p.detach().reshape(-1), flat[o:o + p.numel()])
               for p, o in zip(opt.round_robin_bit16_groups[0], opt.round_robin_bit16_offsets[0]))


def _replaced_methods(obj) -> list[str]:
    """Names of `obj`'s class methods that an instance attribute shadows."""
    return [k for k, v in vars(obj).items()
            if callable(v) and callable(getattr(type(obj), k, None))]


@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (1, "fp32"), (2, "bf16")])
def test_default_engine_replaces_no_deepspeed_method(single_process, stage, precision):
    """Off by default (deepspeed.host_trims): the engine and its optimizer keep every one of
    DeepSpeed's own methods, so a DeepSpeed whose internals differ runs the default path as
    DeepSpeed wrote it."""
    cfg = load_config(None, ["pretrain.batch_size=4", f"deepspeed.zero_stage={stage}",
                             f"deepspeed.precision={precision}"])
    ds_config = build_ds_config(cfg, "pretrain", 1, "cpu")
    m = Tiny()
    e = initialize(m, [{"params": list(m.parameters())}], ds_config)
    _steps(e, 1, seed=0)
    assert _replaced_methods(e) == [] and _replaced_methods(e.optimizer) == []
    assert ds_config[HOST_TRIMS] is False                 # recorded in run.json as it ran


def test_host_trims_refuse_another_deepspeed_monkeypatched_version(monkeypatch):
    """The trims replace DeepSpeed internals of the releases they were written for; asked for on
    another (the installed version string replaced: one DeepSpeed per environment), the config is
    refused with the key and both versions, before any engine exists."""
    import deepspeed
    cfg = load_config(None, ["pretrain.batch_size=4", "deepspeed.host_trims=true"])
    for written_for in ("0.19.8", "0.19.8+local"):
        monkeypatch.setattr(deepspeed, "__version__", written_for)
        assert build_ds_config(cfg, "pretrain", 1, "cpu")[HOST_TRIMS] is True
    for other in ("0.19.7", "0.20.0", "not-a-version"):     # 0.19.7 lacks a method replaced
        monkeypatch.setattr(deepspeed, "__version__", other)
        with pytest.raises(ConfigError) as e:
            build_ds_config(cfg, "pretrain", 1, "cpu")
        msg = str(e.value)
        assert "'deepspeed.host_trims'" in msg and "0.19.8" in msg and other in msg, msg
        assert "\n" not in msg


def test_host_trims_change_no_result_and_a_file_may_not_set_them(tmp_path):
    """Bit-identical (the tests above), so a resume or a done grid cell may differ in it; the
    switch is ours, so a DeepSpeed file contradicting it names the config key."""
    assert "deepspeed.host_trims".startswith(NO_RESULT_KEYS)
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({HOST_TRIMS: True}))
    cfg = load_config(None, ["pretrain.batch_size=4", f"deepspeed.config_file={f}"])
    with pytest.raises(ConfigError, match=f"'{HOST_TRIMS}'.*set it with deepspeed.host_trims"):
        build_ds_config(cfg, "pretrain", 1, "cpu")


@pytest.mark.parametrize("stage,host_trims",
                         [(0, False), (2, False), pytest.param(2, True, marks=needs_trims)])
def test_checkpoint_round_trip_restores_model_optimizer_and_rng(single_process, tmp_path, stage,
                                                                host_trims):
    """Also at ZeRO 2, where the loaded engine's parameters must read its flat buffer (with
    deepspeed.host_trims the step repoints them only when they moved:
    s3rec.engine.deepspeed_trims)."""
    root = tmp_path / "checkpoints"
    a = _engine(stage, host_trims)
    _steps(a, 3, seed=1)
    random.seed(5); np.random.seed(5); torch.manual_seed(5)
    ckpt.save(a, root, ckpt.step_tag(3), {"trainer": {"global_step": 3}, "world_size": 1},
              keep_last=2)
    expected = _steps(a, 3, seed=2) + [random.random(), float(np.random.rand())]
    b = _engine(stage, host_trims)                 # fresh weights, fresh optimizer
    state = ckpt.load(b, root, ckpt.read_latest(root), world_size=1)
    assert state["trainer"]["global_step"] == 3
    got = _steps(b, 3, seed=2) + [random.random(), float(np.random.rand())]
    assert got == expected                         # dropout draws and Adam moments included


def test_latest_pruning_and_world_size_check(single_process, tmp_path):
    root = tmp_path / "checkpoints"
    e = _engine()
    for step in (1, 2, 3):
        _steps(e, 1, seed=step)
        ckpt.save(e, root, ckpt.step_tag(step), {"trainer": {}, "world_size": 1}, keep_last=2)
    ckpt.save_best(e, root, 3, {"trainer": {}, "world_size": 1})
    names = sorted(p.name for p in root.iterdir())
    assert names == ["best", "best-epoch-0003", "latest", "step-00000002", "step-00000003"]
    assert ckpt.read_latest(root) == "step-00000003"
    with pytest.raises(ckpt.ResumeError, match="world size 1"):
        ckpt.load(e, root, "step-00000003", world_size=2)
    (root / "latest").write_text("step-00000009")
    with pytest.raises(ckpt.ResumeError, match="not a folder"):
        ckpt.read_latest(root)


def test_best_is_named_like_latest_and_a_killed_save_leaves_the_previous_best_whole(
        single_process, tmp_path):
    """Before, the best epoch was saved over the folder best/ itself: a kill while saving left
    half-written weights that the end of fine-tuning then tested."""
    root = tmp_path / "checkpoints"
    e = _engine()
    state = {"trainer": {}, "world_size": 1}
    assert ckpt.read_best(root) is None
    _steps(e, 1, seed=1)
    assert ckpt.save_best(e, root, 1, state) == ckpt.read_best(root) == "best-epoch-0001"
    _steps(e, 1, seed=2)
    best2 = {k: v.clone() for k, v in e.module.state_dict().items()}
    assert ckpt.save_best(e, root, 2, state) == ckpt.read_best(root) == "best-epoch-0002"
    assert not (root / "best-epoch-0001").exists()            # the older best goes
    _steps(e, 1, seed=3)
    real_save = e.save_checkpoint

    def killed(save_dir, tag, **kw):          # the process dies with the tag half-written
        (Path(save_dir) / tag).mkdir(parents=True)
        (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"\x00" * 10)
        raise KeyboardInterrupt
    e.save_checkpoint = killed
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_best(e, root, 3, state)
    e.save_checkpoint = real_save
    assert ckpt.read_best(root) == "best-epoch-0002"
    fresh = _engine()
    ckpt.load(fresh, root, ckpt.read_best(root), world_size=1, module_only=True)
    assert all(torch.equal(fresh.module.state_dict()[k], v) for k, v in best2.items())
    # epoch 2 validated again after a resume: a fresh name, never the tag `best` names
    assert ckpt.save_best(e, root, 2, state) == "best-epoch-0002.1"
    # a run saved before best tags: its folder best/ is read, then replaced by the name
    old = tmp_path / "old"
    ckpt.save(e, old, ckpt.BEST, state, keep_last=2, make_latest=False)
    assert ckpt.read_best(old) == "best"
    assert ckpt.save_best(e, old, 4, state) == ckpt.read_best(old) == "best-epoch-0004"


def test_consolidated_weights_equal_the_module(single_process, tmp_path):
    e = _engine(stage=0)
    _steps(e, 2, seed=3)
    ckpt.save(e, tmp_path, "t", {"trainer": {}, "world_size": 1}, keep_last=1)
    sd = ckpt.full_state_dict(e, "fp32")
    from_folder = ckpt.consolidate_folder(tmp_path, "t")
    assert set(sd) == set(from_folder) == {"emb.weight", "lin.weight", "lin.bias"}
    for k in sd:
        assert torch.equal(sd[k], from_folder[k])


@pytest.mark.parametrize("stage", [0, 1])
def test_consolidating_a_damaged_tag_names_it(single_process, tmp_path, stage):
    """--init RUN with a cut-off checkpoint file: before, zero_to_fp32's or torch.load's own
    traceback (ZeRO 0 reads the model states, ZeRO 1-3 the optimizer states)."""
    e = _engine(stage=stage)
    _steps(e, 1, seed=3)
    ckpt.save(e, tmp_path, "t", {"trainer": {}, "world_size": 1}, keep_last=1)
    f = next((tmp_path / "t").glob("*optim_states.pt" if stage else "*model_states.pt"))
    f.write_bytes(f.read_bytes()[:500])
    with pytest.raises(ckpt.ResumeError, match="could not read its weights") as caught:
        ckpt.consolidate_folder(tmp_path, "t")
    assert str(tmp_path / "t") in str(caught.value)


# ------------------------------------------------------------------ sharded evaluation

def _eval_view(users=37, num_items=120, seed=0):
    from s3rec.data.eval_views import EvalView
    rng = np.random.default_rng(seed)
    lens = rng.integers(3, 30, size=users)
    items = rng.integers(1, num_items + 1, size=int(lens.sum())).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    negs = rng.integers(1, num_items + 1, size=(users, 99))
    return EvalView(items, offsets, num_items, "test", negs, max_len=20)


def test_length_batches_cover_each_share_once_at_one_length():
    from s3rec.engine.evaluate import length_batches
    view = _eval_view()
    for world in (1, 2, 3):
        got = np.concatenate([u for r in range(world) for u in length_batches(view, 4, r, world)])
        assert sorted(got.tolist()) == list(range(view.num_users))
        for r in range(world):
            for u in length_batches(view, 4, r, world):
                assert len(u) <= 4 and len(set(view.length[u].tolist())) == 1


def test_metrics_do_not_depend_on_the_eval_batch_size(single_process):
    from s3rec.engine.evaluate import evaluate
    from s3rec.model import build_model, param_groups
    view = _eval_view()
    cfg = load_config(None, ["model.hidden_size=16", "model.num_layers=1", "model.inner_size=32",
                             "model.max_seq_length=20", "finetune.batch_size=4"])
    torch.manual_seed(0)
    model = build_model(cfg, item_size=122, attribute_size=5)
    engine = initialize(model, param_groups(model, cfg), build_ds_config(cfg, "finetune", 1, "cpu"))
    for protocol in ("sampled", "full"):
        results = [evaluate(engine, view, protocol, bs, torch.device("cpu")) for bs in (2, 5, 64)]
        # the same ranks; float64 sums grouped differently agree to the last bits
        assert results[1] == pytest.approx(results[0], rel=1e-12)
        assert results[2] == pytest.approx(results[0], rel=1e-12)


@pytest.mark.parametrize("stage", [0, 2])
def test_adam_kernel_reaches_torch_adam_and_updates_alike(single_process, stage):
    """deepspeed.adam_kernel picks torch's Adam implementation inside DeepSpeed (ZeRO 0: the
    optimizer itself; ZeRO 2: the one DeepSpeed wraps). fused, foreach and loop give the same
    weights up to float rounding; foreach and loop bit-identically; fused dispatches fewer
    operators per step."""
    weights, ops = {}, {}
    for kernel in ("fused", "foreach", "loop"):
        cfg = load_config(None, ["pretrain.batch_size=4", f"deepspeed.zero_stage={stage}",
                                 f"deepspeed.adam_kernel={kernel}"])
        torch.manual_seed(0)
        m = Tiny()
        e = initialize(m, [{"params": list(m.parameters())}],
                       build_ds_config(cfg, "pretrain", 1, "cpu"))
        adam = getattr(e.optimizer, "optimizer", e.optimizer)
        assert isinstance(adam, torch.optim.Adam)
        assert adam.defaults["fused"] is (True if kernel == "fused" else None)
        assert adam.defaults["foreach"] is {"fused": None, "foreach": True, "loop": False}[kernel]
        _steps(e, 5, seed=3)
        ops[kernel] = count_ops(lambda: _steps(e, 1, seed=4))
        weights[kernel] = [p.detach().clone() for p in e.module.parameters()]
    for a, b, c in zip(weights["fused"], weights["foreach"], weights["loop"]):
        assert torch.equal(b, c)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    assert ops["fused"] < ops["loop"], ops
