"""The DeepSpeed config (derived from the typed Config) and the engine around a stage module.

Layers, lowest first:
  1. a DeepSpeed JSON named by `deepspeed.config_file` (or `--deepspeed_config`), if any. It may
     choose `zero_optimization` (stage and tuning) and the precision sections (`bf16`, `fp16`);
     the typed config is then updated to what the file says (so run.json records what ran).
  2. the derived settings, always ours: batch sizes (train_batch_size = micro x accumulation x
     world size, from cfg.<stage>.batch_size), the optimizer (plain Adam, as the reference:
     `adam_w_mode: false`; `torch_adam` avoids DeepSpeed's C++ build; deepspeed.adam_kernel
     picks torch's fused, foreach or loop implementation), gradient clipping,
     and the zero stage / precision of the typed config when the file does not set them.
A file that sets a derived key (batch sizes, optimizer, scheduler) to anything else is an error
naming the file and the config key to use instead.

Precision on CPU: fp16 is refused (no CPU kernels); bf16 needs ZeRO stage >= 1, since at stage 0
DeepSpeed keeps and accumulates the gradients in bf16 on CPU.

`initialize` makes the engine with DeepSpeed's own methods. Only with deepspeed.host_trims
(off by default) does s3rec.engine.deepspeed_trims then take out DeepSpeed's per-step host work
where it does nothing (one rank, unmoved buffers), bit-identically, and only on the DeepSpeed
release it was written against (checked here, before any engine is made).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from s3rec.config import Config, ConfigError, validate
from s3rec.engine.deepspeed_trims import check_deepspeed_version, trim_host_work
from s3rec.strict_load import DuplicateKey, load_json

# Not a DeepSpeed key: deepspeed.host_trims carried from build_ds_config to initialize (which
# takes it out before DeepSpeed sees the config), so that run.json's deepspeed_config says
# whether the trims ran.
HOST_TRIMS = "s3rec_host_trims"

DERIVED_KEYS = {
    "train_batch_size": "pretrain.batch_size / finetune.batch_size",
    "train_micro_batch_size_per_gpu": "pretrain.batch_size / finetune.batch_size",
    "gradient_accumulation_steps": "deepspeed.grad_accum",
    "optimizer": "pretrain.lr / finetune.lr, adam_beta1/2, weight_decay, deepspeed.torch_adam",
    "scheduler": "(none: the reference uses a constant learning rate)",
    "gradient_clipping": "deepspeed.gradient_clipping",
    HOST_TRIMS: "deepspeed.host_trims",
}


# deepspeed.adam_kernel -> torch.optim.Adam's arguments (DeepSpeed passes them on with
# torch_adam). The default implementation on CPU is the per-parameter loop: for this model's 45
# tensors an Adam step took 3.75 ms there against 0.46 ms fused; on a GPU, fused is one launch
# against ~a dozen (foreach) for the whole update.
ADAM_KERNEL_ARGS = {"fused": {"fused": True}, "foreach": {"foreach": True},
                     "loop": {"foreach": False}}


class StageModule(nn.Module):
    """What DeepSpeed wraps: the model plus a forward that runs any function of it.

    Under ZeRO-3 parameters are gathered by hooks around each submodule's forward. The objectives
    read tables directly (attribute_embeddings.weight, head matrices, item_embeddings.weight for
    full ranking), outside any submodule forward; registering every parameter as an external
    parameter of this module makes ZeRO-3 gather them for the whole of forward(fn, ...)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args):
        return fn(self.model, *args)


def micro_batch(global_batch: int, grad_accum: int, world_size: int, key: str) -> int:
    if global_batch % (grad_accum * world_size):
        raise ConfigError(
            f"config key '{key}': global batch {global_batch} is not divisible by "
            f"deepspeed.grad_accum ({grad_accum}) x world size ({world_size}); "
            f"train_batch_size must equal micro batch x accumulation x world size")
    return global_batch // (grad_accum * world_size)


def _read_file(path: str) -> dict:
    try:
        data = load_json(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config key 'deepspeed.config_file': {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"config key 'deepspeed.config_file': {path} cannot be read: "
                          f"{e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"deepspeed config {path}: not UTF-8 text (byte {e.start}): expected "
                          f"a JSON object") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed config {path}: not valid JSON (line {e.lineno}): {e.msg}") \
            from None
    except DuplicateKey as e:
        raise ConfigError(f"deepspeed config {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed config {path}: expected a JSON object")
    _check_read_keys(path, data)
    return data


def _check_read_keys(path: str, data: dict) -> None:
    """The file's keys that build_ds_config reads itself (the others are DeepSpeed's to check):
    each named, with what it takes, rather than a traceback from int("two")."""
    for section in ("zero_optimization", "bf16", "fp16"):
        if section in data and not isinstance(data[section], dict):
            raise ConfigError(f"deepspeed config {path}: '{section}' must be a JSON object, got "
                              f"{json.dumps(data[section])}")
    stage = data.get("zero_optimization", {}).get("stage", 0)
    # bool is an int in Python, and 2.0 would be read as 2: only a JSON integer is a stage
    if type(stage) is not int or not 0 <= stage <= 3:
        raise ConfigError(f"deepspeed config {path}: 'zero_optimization.stage' must be 0, 1, 2 "
                          f"or 3, got {json.dumps(stage)}")
    for half in ("bf16", "fp16"):
        enabled = data.get(half, {}).get("enabled", False)
        if not isinstance(enabled, bool):
            raise ConfigError(f"deepspeed config {path}: '{half}.enabled' must be true or false, "
                              f"got {json.dumps(enabled)}")


def build_ds_config(cfg: Config, stage: str, world_size: int, device_type: str,
                    log=lambda msg: None) -> dict:
    """The full DeepSpeed config dict for `stage` (pretrain | finetune). Updates cfg.deepspeed's
    zero_stage / precision when a config file sets them."""
    st = getattr(cfg, stage)
    ds = cfg.deepspeed
    key = f"{stage}.batch_size"
    micro = micro_batch(st.batch_size, ds.grad_accum, world_size, key)
    base: dict = {}
    if ds.config_file:
        base = _read_file(ds.config_file)
        zo = base.get("zero_optimization", {})
        if "stage" in zo and zo["stage"] != ds.zero_stage:
            log(f"deepspeed.zero_stage={zo['stage']} taken from {ds.config_file}")
            ds.zero_stage = zo["stage"]
        half = [p for p in ("bf16", "fp16") if base.get(p, {}).get("enabled")]
        if len(half) > 1:
            raise ConfigError(f"deepspeed config {ds.config_file}: bf16 and fp16 both enabled")
        if ("bf16" in base or "fp16" in base):
            prec = half[0] if half else "fp32"
            if prec != ds.precision:
                log(f"deepspeed.precision={prec} taken from {ds.config_file}")
                ds.precision = prec
        try:        # the cross-key rules hold for what the file chose too (e.g. compile, ZeRO 3)
            validate(cfg)
        except ConfigError as e:
            raise ConfigError(f"deepspeed config {ds.config_file}: {e}") from None
    derived = {
        "train_batch_size": st.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": ds.grad_accum,
        "optimizer": {"type": "Adam", "params": {
            "lr": st.lr, "betas": [st.adam_beta1, st.adam_beta2], "eps": 1e-8,
            "weight_decay": st.weight_decay, "adam_w_mode": False, "torch_adam": ds.torch_adam,
            **(ADAM_KERNEL_ARGS[ds.adam_kernel] if ds.torch_adam else {})}},
        "gradient_clipping": ds.gradient_clipping,
        HOST_TRIMS: ds.host_trims,
    }
    for k, v in derived.items():
        if k in base and base[k] != v:
            raise ConfigError(f"deepspeed config {ds.config_file}: '{k}' = {base[k]!r} conflicts "
                              f"with the derived value {v!r}; set it with {DERIVED_KEYS[k]}")
    if "scheduler" in base:
        raise ConfigError(f"deepspeed config {ds.config_file}: 'scheduler' is not supported "
                          f"(the reference uses a constant learning rate)")
    if ds.precision == "fp16" and device_type == "cpu":
        raise ConfigError("config key 'deepspeed.precision': fp16 needs a GPU (no CPU kernels); "
                          "use bf16 (with deepspeed.zero_stage >= 1) or fp32")
    if ds.precision == "bf16" and device_type == "cpu" and ds.zero_stage == 0:
        raise ConfigError("config key 'deepspeed.precision': bf16 on CPU needs "
                          "deepspeed.zero_stage >= 1 (at stage 0 gradients accumulate in bf16)")
    if ds.host_trims:
        import deepspeed
        check_deepspeed_version(deepspeed.__version__)
    out = copy.deepcopy(base)
    out.update(derived)
    zo = dict(out.get("zero_optimization", {}))
    zo["stage"] = ds.zero_stage
    # ZeRO 1-2 compute the global gradient norm at every step; without clipping it is only
    # reported (~2 kernels a parameter each step), so the training loop takes it at its log
    # steps instead (Trainer._grad_norm). Not where DeepSpeed needs it: clipping, optimizer
    # offload, and ZeRO 1 with bf16 (its own BF16 optimizer). A file may set it back to true.
    if (ds.gradient_clipping == 0 and "offload_optimizer" not in zo
            and (ds.zero_stage == 2 or (ds.zero_stage == 1 and ds.precision != "bf16"))):
        zo.setdefault("compute_grad_norm", False)
    # ZeRO 1-2 copy each gradient, as backward produces it, into one contiguous buffer (against
    # fragmentation while buckets are reduced), then again into the partition. With one
    # data-parallel rank there is nothing to reduce: ~8 ATen ops a parameter each step for
    # nothing (bit-identical weights without, tests/test_engine.py::
    # test_world1_zero_without_contiguous_gradients_has_identical_weights). A file may set it.
    if world_size == 1 and ds.zero_stage in (1, 2):
        zo.setdefault("contiguous_gradients", False)
    out["zero_optimization"] = zo
    out["bf16"] = {**out.get("bf16", {}), "enabled": ds.precision == "bf16"}
    # DeepSpeed tests every bf16 gradient for inf/NaN before each ZeRO 1-2 step (9 kernels a
    # parameter, ~600 ATen ops a step for this model, and a read of the verdict that waits for
    # the device): the host cost of a whole forward. bf16 has fp32's range and no loss scale,
    # so it is ours to turn on (deepspeed.bf16_skip_nonfinite), not on by default.
    check = out["bf16"].get("check_grad_overflow", ds.bf16_skip_nonfinite)
    if check != ds.bf16_skip_nonfinite:
        raise ConfigError(f"deepspeed config {ds.config_file}: 'bf16.check_grad_overflow' = "
                          f"{check!r} conflicts with deepspeed.bf16_skip_nonfinite = "
                          f"{ds.bf16_skip_nonfinite!r}; set it with deepspeed.bf16_skip_nonfinite")
    out["bf16"]["check_grad_overflow"] = ds.bf16_skip_nonfinite
    out["fp16"] = {**out.get("fp16", {}), "enabled": ds.precision == "fp16"}
    out.setdefault("steps_per_print", 10 ** 9)      # DeepSpeed's own step logging: off
    out.setdefault("wall_clock_breakdown", False)
    # DeepSpeed's throughput timer synchronises the device at every forward and every step
    # (timers.throughput.synchronized defaults to true), so the host can never queue the next
    # step while the GPU works. We log samples/s ourselves; a file may turn it back on.
    out.setdefault("timers", {}).setdefault("throughput", {"enabled": False})
    # Our optimizer is torch's Adam (or DeepSpeed's Adam in Adam mode): tested with ZeRO, but
    # DeepSpeed only trusts its own fused classes unless told.
    out["zero_allow_untested_optimizer"] = True
    return out


def initialize(model: nn.Module, param_groups: list[dict], ds_config: dict):
    """Wrap `model` in a StageModule and a DeepSpeed engine. Returns the engine, trimmed where
    `ds_config` (build_ds_config's) asks for deepspeed.host_trims."""
    import deepspeed
    module = StageModule(model)
    config = {k: v for k, v in ds_config.items() if k != HOST_TRIMS}
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=param_groups,
                                           config=config)
    if ds_config["zero_optimization"]["stage"] == 3:
        for p in engine.module.model.parameters():
            deepspeed.zero.register_external_parameter(engine.module, p)
    if ds_config.get(HOST_TRIMS):
        trim_host_work(engine)
    return engine


def dtype_of(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
