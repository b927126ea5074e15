"""Typed configuration: dataclasses, YAML files and `key=value` overrides.

Every other module receives a `Config` (or one of its parts), never a raw dict or an argparse
namespace. Defaults reproduce the published S3Rec numbers (Zhou et al., CIKM 2020); every
departure from the original is a named option here.

Priority: defaults < YAML file (`--config`) < command-line `key=value` overrides.
An unknown key, a value of the wrong type, a NaN or infinite float or a number outside its range
(RANGES) raises `ConfigError` naming the dotted key, before anything is written.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from s3rec.strict_load import DuplicateKey, load_yaml

VARIANTS = ("s3rec", "s3rec-lowrank", "finetune-only")
HEAD_NAMES = ("aap", "mip", "map", "sp")
OBJECTIVES = ("aap", "mip", "map", "sp")
COMPILE_MODES = ("none", "default", "reduce-overhead")
ADAM_KERNELS = ("fused", "foreach", "loop")


class ConfigError(ValueError):
    """A config problem; the message names the key (dotted path) and what was expected."""


@dataclass
class HeadConfig:
    """One pretraining head (AAP, MIP, MAP or SP): a d x d map, full or low-rank."""
    kind: str = "full"          # (str) full: Linear(d, d) with bias; lowrank: W = U V^T, U, V in R^{d x r}
    rank: int = 0               # (int) rank r of a lowrank head; 0 = use model.head_rank
    init: str = "xavier"        # (str) lowrank factor init: xavier | orthogonal | svd (of model.svd_init_from)
    weight_decay: float = 0.0   # (float) Adam L2 weight decay on this head's matrix parameters (U and V
                                #   of a lowrank head, W of a full one); its bias keeps the base decay


@dataclass
class FieldHeadConfig(HeadConfig):
    """An attribute field's AAP or MAP head (`model.fields.<field>.<aap|map>`): the keys set there
    replace those of model.heads.<aap|map> for that field."""
    weight: float = 1.0         # (float) multiplies pretrain.weights.<aap|map> for this field (0 skips it)


FIELD_OBJECTIVES = ("aap", "map")         # the objectives with a head per attribute field
FIELD_NAME = r"[A-Za-z][A-Za-z0-9_]{0,63}"  # a field's name: part of its parameters' names


@dataclass
class HeadsConfig:
    aap: HeadConfig = field(default_factory=HeadConfig)  # associated attribute prediction
    mip: HeadConfig = field(default_factory=HeadConfig)  # masked item prediction
    map: HeadConfig = field(default_factory=HeadConfig)  # masked attribute prediction
    sp: HeadConfig = field(default_factory=HeadConfig)   # segment prediction


@dataclass
class ModelConfig:
    hidden_size: int = 64            # (int) d, embedding and hidden width
    num_layers: int = 2              # (int) post-LN transformer layers
    num_heads: int = 2               # (int) attention heads (hidden_size / num_heads each)
    inner_size: int = 256            # (int) FFN width
    max_seq_length: int = 50         # (int) window length; positions are absolute in it
    hidden_dropout: float = 0.5      # (float) dropout on embeddings, attention output and FFN output
    attention_dropout: float = 0.5   # (float) dropout on attention probabilities
    initializer_range: float = 0.02  # (float) std of the N(0, std) init of Linear/Embedding weights
    layer_norm_eps: float = 1e-12    # (float) LayerNorm epsilon
    head_rank: int = 16              # (int) default rank of lowrank heads (variant s3rec-lowrank)
    svd_init_from: str = ""          # (str) checkpoint whose full heads seed `init: svd` factors (not
                                     #   needed when the --init/imported checkpoint has full heads)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    fields: dict = field(default_factory=dict)  # (dict) per attribute field of the dataset:
                                     #   {field: {aap|map: {kind, rank, init, weight_decay,
                                     #   weight}}}, each key optional (FieldHeadConfig); a field
                                     #   not named takes model.heads.aap / map, weight 1
    fast_dropout: bool = True        # (bool) draw dropout masks from packed random bits (same
                                     #   distribution, ~5x cheaper than bernoulli_ on CPU)


@dataclass
class ObjectiveWeights:
    """Weights of the four pretraining losses; a weight of 0 skips that objective entirely."""
    aap: float = 0.2                 # (float) associated attribute prediction
    mip: float = 1.0                 # (float) masked item prediction
    map: float = 1.0                 # (float) masked attribute prediction
    sp: float = 0.5                  # (float) segment prediction


@dataclass
class PretrainConfig:
    epochs: int = 150                # (int) pretraining epochs
    batch_size: int = 100            # (int) global batch (micro x accumulation x world size)
    lr: float = 1e-3                 # (float) Adam learning rate
    adam_beta1: float = 0.9          # (float) Adam beta1
    adam_beta2: float = 0.999        # (float) Adam beta2
    weight_decay: float = 0.0        # (float) weight decay of non-head parameters (original: 0)
    mask_prob: float = 0.2           # (float) MIP/MAP masking probability (the last item is always masked)
    weights: ObjectiveWeights = field(default_factory=ObjectiveWeights)
    reduction: str = "sum"           # (str) sum (original) | mean over the positions that count
    sp_negatives: str = "full"       # (str) SP negative segments from: full (original: every
                                     #   user's whole sequence, test items included) | train (seq[:-2])
    pair_form: str = "original"      # (str) original: -log sigmoid(sigmoid(a) - sigmoid(b));
                                     #   logits: BCE on logits (a positive, b negative)
    save_epochs: list = field(default_factory=lambda: [10, 30, 50, 100, 150])
                                     # (list[int]) epochs whose weights are kept as epoch-N checkpoints
    static_shapes: bool = False      # (bool) pad every micro-batch to [micro batch, model.max_seq_length]
                                     #   and weight the objectives at every position
                                     #   (s3rec.static_objectives): one shape for the whole run,
                                     #   which pretrain.compile needs. Same losses; more device work
                                     #   (a GPU absorbs it, a CPU does not); other dropout draws
    compile: str = "none"            # (str) none | default | reduce-overhead: torch.compile the
                                     #   pretraining losses (reduce-overhead: replayed as a CUDA
                                     #   graph, one launch for the forward and one for the
                                     #   backward). Needs static_shapes and ZeRO 0-2
                                     #   (reduce-overhead also deepspeed.grad_accum=1); the
                                     #   first steps compile (minutes)


@dataclass
class FinetuneConfig:
    epochs: int = 200                # (int) maximum fine-tuning epochs
    batch_size: int = 256            # (int) global batch
    lr: float = 1e-3                 # (float) Adam learning rate
    adam_beta1: float = 0.9          # (float) Adam beta1
    adam_beta2: float = 0.999        # (float) Adam beta2
    weight_decay: float = 0.0        # (float) weight decay (original: 0)
    patience: int = 10               # (int) early stopping: epochs without strict improvement
    protocol: str = "sampled"        # (str) sampled: answer + 99 negatives | full: every item
    eval_batch_size: int = 512       # (int) users per evaluation batch
    length_chunks: int = 4           # (int) compute each batch as this many groups of rows of similar
                                     #   length, each trimmed to its longest: same batch, same loss
                                     #   mean, ~4x less padding (1 = the whole batch padded together)
    bucket_by_length: bool = False   # (bool) length-bucketed batches (less padding, faster); off =
                                     #   the original's plain random batches, which the published
                                     #   numbers need (bucketing changes each batch's loss mean)
    loss: str = "bce"                # (str) bce: the original, one negative per position |
                                     #   ce: full softmax over every item | sampled_softmax:
                                     #   loss_negatives per batch by popularity, log-Q corrected |
                                     #   gbce: gSASRec's generalised BCE (gbce_t, loss_negatives)
    loss_negatives: int = 256        # (int) negatives per batch (sampled_softmax) or per position
                                     #   (gbce, uniform); unused by bce and ce
    gbce_t: float = 0.75             # (float) gSASRec's calibration t in [0, 1]: 0 = plain BCE
                                     #   with loss_negatives negatives, 1 = fully calibrated
    loss_chunk_rows: int = 4096      # (int) ce: positions scored against the whole catalogue at
                                     #   once (memory ~ rows x items x 4 bytes)


@dataclass
class DataConfig:
    # No DataLoader workers: a Beauty pretraining batch (masks, negatives, segments, and the
    # objectives' index) is made vectorised in ~0.5 ms; receiving the same batch, already made,
    # from a DataLoader worker cost the main process 4-5 ms (its ~17 tensors through shared
    # memory; measured on the 2-core CPU machine).
    bucket_by_length: bool = True    # (bool) length-bucketed pretraining batches: the same samples
                                     #   an epoch, each batch of similar lengths (less padding; on
                                     #   the 2-core CPU a Beauty epoch 64 s instead of 328 s). The
                                     #   one departure on by default: each step's batch differs
                                     #   from the original's random ones (false), so the updates
                                     #   do; our 150-epoch reproduction used it. Fine-tuning has
                                     #   finetune.bucket_by_length (off)
    bucket_size: int = 50            # (int) batches per shuffled length bucket


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0              # (int) ZeRO stage 0, 1, 2 or 3
    precision: str = "fp32"          # (str) fp32 | bf16 | fp16
    grad_accum: int = 1              # (int) gradient accumulation steps
    config_file: str = ""            # (str) a DeepSpeed JSON merged under the derived settings;
                                     #   its zero_optimization.stage and bf16/fp16 choice win
                                     #   over zero_stage / precision (logged when they differ)
    torch_adam: bool = True          # (bool) torch's Adam (no C++ build) instead of DeepSpeed's fused one
    adam_kernel: str = "fused"       # (str) torch's Adam as: fused (one kernel for every parameter,
                                     #   CPU and GPU) | foreach (a kernel per operation over all
                                     #   parameters) | loop (per parameter: torch's CPU default).
                                     #   The same update up to float rounding; a resumed run keeps
                                     #   the kernel it started with (it is in the optimizer state)
    gradient_clipping: float = 0.0   # (float) 0 = off (the original does not clip)
    bf16_skip_nonfinite: bool = False  # (bool) bf16, ZeRO 1-2: test every gradient for inf/NaN
                                     #   each step and skip such steps (DeepSpeed's
                                     #   bf16.check_grad_overflow). Off: bf16 needs no loss
                                     #   scale, and the test costs ~9 kernels per parameter
                                     #   and a device sync every step
    host_trims: bool = False         # (bool) one rank: take out DeepSpeed's per-step host work
                                     #   that does nothing there (s3rec.engine.deepspeed_trims:
                                     #   replaces methods of the engine and its ZeRO optimizer;
                                     #   bit-identical weights). Written against DeepSpeed
                                     #   0.19.8; any other is refused. Off: DeepSpeed's own methods


@dataclass
class CheckpointConfig:
    every_steps: int = 0             # (int) also save mid-epoch every N optimizer steps (0 = epoch end only)
    keep_last: int = 2               # (int) rolling checkpoints kept besides the named ones


@dataclass
class LoggingConfig:
    tensorboard: bool = True         # (bool) write TensorBoard events (rank 0 only)
    every_steps: int = 50            # (int) scalar logging interval in optimizer steps
    progress_every_s: float = 30.0   # (float) a progress line (epoch, step, samples/s, ETAs) on
                                     #   stderr and in run.json at a logging step at most this
                                     #   often (rank 0; s3rec.engine.progress); 0 = every one
    profile_steps: list = field(default_factory=list)   # (list) [START, STOP]: torch.profiler
                                     #   over optimizer steps START..STOP-1 (whole loop
                                     #   iterations), trace and operator table per rank in
                                     #   RUN/profile/ (s3rec.engine.profile); [] = off


@dataclass
class Config:
    variant: str = "s3rec"           # (str) s3rec | s3rec-lowrank | finetune-only
    seed: int = 42                   # (int) seeds everything; each epoch's shuffle and draws come
                                     #   from (seed, stage, epoch, batch), so epochs differ
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def head(self, name: str) -> HeadConfig:
        """The effective config of head `name`, with the variant applied (s3rec-lowrank makes
        AAP and MAP low-rank unless they were set explicitly) and rank 0 resolved."""
        h = dataclasses.replace(getattr(self.model.heads, name))
        if self.variant == "s3rec-lowrank" and name in ("aap", "map") and h.kind == "full":
            h.kind = "lowrank"
        if h.kind == "lowrank" and h.rank == 0:
            h.rank = self.model.head_rank
        return h

    def field_head(self, field_name: str, objective: str) -> FieldHeadConfig:
        """The effective config of attribute field `field_name`'s `objective` (aap | map) head:
        model.heads.<objective> with the keys of model.fields.<field>.<objective> in its place,
        then the variant and rank 0 resolved as in `head`."""
        set_here = dict(self.model.fields.get(field_name, {}).get(objective, {}))
        weight = set_here.pop("weight", 1.0)
        h = dataclasses.replace(getattr(self.model.heads, objective), **set_here)
        if self.variant == "s3rec-lowrank" and h.kind == "full":
            h.kind = "lowrank"
        if h.kind == "lowrank" and h.rank == 0:
            h.rank = self.model.head_rank
        return FieldHeadConfig(**dataclasses.asdict(h), weight=float(weight))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- building and checking

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _finite_float(key: str, value: float | int) -> float:
    """`value` as a finite float. NaN fails every comparison, so a NaN weight or threshold
    would pass range checks and silently switch its feature off: refused here, with inf."""
    try:
        number = float(value)
    except OverflowError:          # an int beyond float's range; its digits would fill the line
        raise ConfigError(f"config key '{key}': expected a finite number, got an integer of "
                          f"{len(str(abs(value)))} digits") from None
    if not math.isfinite(number):
        raise ConfigError(f"config key '{key}': expected a finite number, got {value!r}")
    return number


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against annotation `tp`; ints are accepted for floats. Raises ConfigError."""
    if tp is float and isinstance(value, str):
        # YAML 1.1 (PyYAML) reads 1e-3 as a string (it wants 1.0e-3); take what float() takes
        try:
            value = float(value)
        except ValueError:
            pass                   # not a number: the type check below names it
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return _finite_float(key, value)
    if tp is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return value
    if tp in (int, float, str, bool):
        if isinstance(value, bool) and tp is not bool:
            raise ConfigError(f"config key '{key}': expected {tp.__name__}, got bool {value!r}")
        if not isinstance(value, tp):
            raise ConfigError(f"config key '{key}': expected {tp.__name__}, got "
                              f"{type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported type {_type_name(tp)}")


def _apply(obj: Any, data: dict, prefix: str = "") -> None:
    """Recursively set fields of dataclass `obj` from nested dict `data`."""
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping, "
                          f"got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in data.items():
        key = prefix + str(k)
        if k not in names:
            raise ConfigError(f"unknown config key '{key}' (known here: {', '.join(sorted(names))})")
        tp = hints[k]
        if key == "model.fields":
            setattr(obj, k, _merge_fields(key, getattr(obj, k), v))
        elif dataclasses.is_dataclass(tp):
            _apply(getattr(obj, k), v, key + ".")
        else:
            setattr(obj, k, _coerce(key, v, tp))


def _merge_fields(key: str, current: dict, data: Any) -> dict:
    """model.fields with `data` merged in key by key (several overrides of one field add up).
    Keeps only the keys given (checked and converted as FieldHeadConfig's), so that a field's
    head takes every other key from model.heads."""
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{key}': expected a mapping {{field: {{aap|map: "
                          f"{{key: value}}}}}}, got {data!r}")
    out = {f: {o: dict(h) for o, h in heads.items()} for f, heads in current.items()}
    for name, heads in data.items():
        if not isinstance(name, str) or not re.fullmatch(FIELD_NAME, name):
            raise ConfigError(f"config key '{key}.{name}': a field name is a letter, then up to "
                              f"63 letters, digits or _")
        if not isinstance(heads, dict) or not set(heads) <= set(FIELD_OBJECTIVES):
            raise ConfigError(f"config key '{key}.{name}': expected a mapping with keys among "
                              f"{'|'.join(FIELD_OBJECTIVES)}, got {heads!r}")
        for objective, values in heads.items():
            checked = FieldHeadConfig()
            _apply(checked, values, f"{key}.{name}.{objective}.")
            out.setdefault(name, {}).setdefault(objective, {}).update(
                {k: getattr(checked, k) for k in values})
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b.c=value` -> ('a.b.c', yaml-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}': empty key")
    if raw == "":
        return key, ""
    try:
        return key, load_yaml(raw)
    except DuplicateKey as e:
        raise ConfigError(f"override '{text}': value for '{key}': {e}") from None
    except yaml.YAMLError as e:
        why = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ConfigError(f"override '{text}': value for '{key}' is not valid YAML ({why})") \
            from None
    except ValueError as e:        # PyYAML's constructors: a date like 2024-13-01, a huge int
        raise ConfigError(f"override '{text}': value for '{key}' cannot be read ({e})") from None


# Keys (dotted prefixes) that change what a run logs, keeps or how fast it goes, not its results:
# runs that differ only in these are the same experiment (resumable into each other, pooled as
# seeds by the report, a done grid cell).
NO_RESULT_KEYS = ("checkpoint.", "logging.", "finetune.eval_batch_size", "pretrain.compile",
                  "pretrain.save_epochs", "deepspeed.host_trims")


def flat_keys(d: dict, prefix: str = "") -> dict:
    """A nested config dict as {dotted key: value} (the inverse of _nest)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


@dataclass(frozen=True)
class Interval:
    """The finite numbers low..high; each end is included unless marked open."""
    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return (f"{'(' if self.low_open else '['}{self.low}, "
                f"{self.high}{')' if self.high_open else ']'}")


AT_LEAST_0 = Interval(0)
AT_LEAST_1 = Interval(1)
POSITIVE = Interval(0, low_open=True)
PROBABILITY = Interval(0, 1)
BELOW_1 = Interval(0, 1, high_open=True)        # dropout (1 drops everything), Adam betas
OPTIMIZER_RANGES = {"epochs": AT_LEAST_0,       # 0: the initial weights are the result
                    "batch_size": AT_LEAST_1, "lr": POSITIVE, "adam_beta1": BELOW_1,
                    "adam_beta2": BELOW_1, "weight_decay": AT_LEAST_0}

# Every int and float key (dotted) and the values it takes; the cross-key rules (divisibility,
# ranks up to model.hidden_size) are in validate(). tests/test_config.py checks that every
# numeric key of Config refuses a negative number (here or in a rule of its own).
RANGES: dict[str, Interval] = {
    "seed": Interval(0, 2 ** 32, high_open=True),   # numpy's global seed is 32-bit
    "model.hidden_size": AT_LEAST_1, "model.num_layers": AT_LEAST_1,
    "model.num_heads": AT_LEAST_1, "model.inner_size": AT_LEAST_1,
    "model.max_seq_length": AT_LEAST_1,             # pretraining samples are prefixes of >= 1
    "model.hidden_dropout": BELOW_1, "model.attention_dropout": BELOW_1,
    "model.initializer_range": POSITIVE, "model.layer_norm_eps": POSITIVE,
    "model.head_rank": AT_LEAST_1,
    **{f"model.heads.{h}.rank": AT_LEAST_0 for h in HEAD_NAMES},      # 0 = model.head_rank
    **{f"model.heads.{h}.weight_decay": AT_LEAST_0 for h in HEAD_NAMES},
    **{f"pretrain.weights.{o}": AT_LEAST_0 for o in OBJECTIVES},
    **{f"{stage}.{k}": r for stage in ("pretrain", "finetune")
       for k, r in OPTIMIZER_RANGES.items()},
    "pretrain.mask_prob": PROBABILITY,
    "finetune.patience": AT_LEAST_0, "finetune.eval_batch_size": AT_LEAST_1,
    "finetune.length_chunks": AT_LEAST_1,
    "data.bucket_size": AT_LEAST_1,
    "deepspeed.zero_stage": Interval(0, 3), "deepspeed.grad_accum": AT_LEAST_1,
    "deepspeed.gradient_clipping": AT_LEAST_0,      # 0 = off
    "checkpoint.every_steps": AT_LEAST_0, "checkpoint.keep_last": AT_LEAST_1,
    "logging.every_steps": AT_LEAST_1, "logging.progress_every_s": AT_LEAST_0,
}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)      # bool subclasses int: true != 1


def _check_ranges(cfg: Config) -> None:
    """Every key of RANGES in its interval; first, so later rules see sane numbers (a
    num_heads of 0 would divide by zero)."""
    for key, interval in RANGES.items():
        value = functools.reduce(getattr, key.split("."), cfg)
        if value not in interval:
            raise ConfigError(f"config key '{key}': expected {interval}, got {value!r}")


def _check_head(key: str, h: HeadConfig, hidden_size: int) -> None:
    if h.kind not in ("full", "lowrank"):
        raise ConfigError(f"config key '{key}.kind': expected full|lowrank, got {h.kind!r}")
    if h.init not in ("xavier", "orthogonal", "svd"):
        raise ConfigError(f"config key '{key}.init': expected xavier|orthogonal|svd, "
                          f"got {h.init!r}")
    if h.rank > hidden_size:
        raise ConfigError(f"config key '{key}.rank': rank {h.rank} is larger than the hidden "
                          f"size {hidden_size}")


def validate(cfg: Config) -> None:
    """Ranges, choices and cross-field checks. Raises ConfigError naming the key."""
    _check_ranges(cfg)
    if cfg.variant not in VARIANTS:
        raise ConfigError(f"config key 'variant': expected one of {VARIANTS}, got {cfg.variant!r}")
    m = cfg.model
    if m.hidden_size % m.num_heads:
        raise ConfigError(f"config key 'model.num_heads': {m.num_heads} does not divide "
                          f"model.hidden_size {m.hidden_size}")
    if m.head_rank > m.hidden_size:
        raise ConfigError(f"config key 'model.head_rank': rank {m.head_rank} must be in "
                          f"1..hidden_size ({m.hidden_size})")
    for name in HEAD_NAMES:
        _check_head(f"model.heads.{name}", getattr(m.heads, name), m.hidden_size)
    for name, heads in m.fields.items():
        for objective, values in heads.items():
            key = f"model.fields.{name}.{objective}"
            bad = [k for k in ("rank", "weight_decay", "weight") if values.get(k, 0) < 0]
            if bad:
                raise ConfigError(f"config key '{key}.{bad[0]}': expected >= 0, got "
                                  f"{values[bad[0]]!r}")
            _check_head(key, cfg.field_head(name, objective), m.hidden_size)
    p = cfg.pretrain
    if p.reduction not in ("sum", "mean"):
        raise ConfigError(f"config key 'pretrain.reduction': expected sum|mean, got {p.reduction!r}")
    if p.pair_form not in ("original", "logits"):
        raise ConfigError(f"config key 'pretrain.pair_form': expected original|logits, "
                          f"got {p.pair_form!r}")
    if p.sp_negatives not in ("full", "train"):
        raise ConfigError(f"config key 'pretrain.sp_negatives': expected full|train, "
                          f"got {p.sp_negatives!r}")
    if p.compile not in COMPILE_MODES:
        raise ConfigError(f"config key 'pretrain.compile': expected one of "
                          f"{'|'.join(COMPILE_MODES)}, got {p.compile!r}")
    if p.compile != "none" and not p.static_shapes:
        raise ConfigError(f"config key 'pretrain.compile': {p.compile} needs "
                          f"pretrain.static_shapes=true (with the batches' own shapes every new "
                          f"length and count would compile again)")
    if p.compile != "none" and cfg.deepspeed.zero_stage == 3:
        raise ConfigError("config key 'pretrain.compile': not with deepspeed.zero_stage 3 (its "
                          "hooks gather and release parameters around every module's forward, "
                          "which a compiled graph cannot hold); use ZeRO 0-2")
    if p.compile == "reduce-overhead" and cfg.deepspeed.grad_accum != 1:
        # autograd keeps a graph's gradient output as param.grad (no copy) and the next
        # micro-batch's replay writes over that memory: accumulated gradients would be wrong
        # without an error (pytorch/pytorch#169545, #96693). Not yet tried on a GPU with this
        # torch: refused until it is.
        raise ConfigError(f"config key 'pretrain.compile': reduce-overhead needs "
                          f"deepspeed.grad_accum=1, got {cfg.deepspeed.grad_accum} (a CUDA graph "
                          f"reuses the memory of the gradients being accumulated); use "
                          f"pretrain.compile=default or a larger micro-batch")
    if cfg.finetune.protocol not in ("sampled", "full"):
        raise ConfigError(f"config key 'finetune.protocol': expected sampled|full, "
                          f"got {cfg.finetune.protocol!r}")
    w = cfg.logging.profile_steps
    if w and (len(w) != 2 or not all(_is_int(x) for x in w) or not 0 <= w[0] < w[1]):
        raise ConfigError(f"config key 'logging.profile_steps': expected [] or [START, STOP] "
                          f"with 0 <= START < STOP (optimizer steps), got {w!r}")
    d = cfg.deepspeed
    if d.adam_kernel not in ADAM_KERNELS:
        raise ConfigError(f"config key 'deepspeed.adam_kernel': expected one of "
                          f"{'|'.join(ADAM_KERNELS)}, got {d.adam_kernel!r}")
    if d.precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"config key 'deepspeed.precision': expected fp32|bf16|fp16, "
                          f"got {d.precision!r}")
    bad = [e for e in p.save_epochs if not _is_int(e) or e < 1]
    if bad:
        raise ConfigError(f"config key 'pretrain.save_epochs': expected a list of epochs (integers "
                          f">= 1), got {bad[0]!r} in {p.save_epochs!r}")
    _validate_finetune_loss(cfg.finetune)


FINETUNE_LOSSES = ("bce", "ce", "sampled_softmax", "gbce")


def _validate_finetune_loss(f: FinetuneConfig) -> None:
    if f.loss not in FINETUNE_LOSSES:
        raise ConfigError(f"config key 'finetune.loss': expected {'|'.join(FINETUNE_LOSSES)}, "
                          f"got {f.loss!r}")
    for key, val in (("loss_negatives", f.loss_negatives), ("loss_chunk_rows", f.loss_chunk_rows)):
        if val < 1:
            raise ConfigError(f"config key 'finetune.{key}': must be >= 1, got {val}")
    if not 0.0 <= f.gbce_t <= 1.0:
        raise ConfigError(f"config key 'finetune.gbce_t': expected 0..1, got {f.gbce_t}")


def read_yaml_file(path: str | Path, what: str = "config file"):
    """The YAML in `path`; a ConfigError naming `what` and the file if it cannot be read or
    parsed (also for the grid file, launch/grid.py)."""
    path = Path(path)
    try:
        return load_yaml(path.read_text(encoding="utf-8"))
    except DuplicateKey as e:
        raise ConfigError(f"{what} {path}: {e}") from None
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path}: cannot be read: is a folder, expected a YAML "
                          f"file") from None
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path}: not UTF-8 text (byte {e.start}): expected a YAML "
                          f"file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path}: not valid YAML: {e}") from None
    except ValueError as e:        # PyYAML's constructors: a date like 2024-13-01, a huge int
        raise ConfigError(f"{what} {path}: a value cannot be read: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Defaults, then the YAML file at `path`, then `key=value` overrides; validated."""
    cfg = Config()
    if path:
        path = Path(path)
        data = read_yaml_file(path) or {}
        try:
            _apply(cfg, data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    for text in overrides:
        key, value = parse_override(text)
        _apply(cfg, _nest(key, value))
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config stored in a checkpoint or run.json."""
    cfg = Config()
    _apply(cfg, data)
    validate(cfg)
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def to_json(cfg: Config) -> str:
    return json.dumps(cfg.to_dict(), indent=2)
