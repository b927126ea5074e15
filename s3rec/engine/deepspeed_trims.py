"""DeepSpeed's per-step host work taken out where it does nothing, on one engine at a time.

At this model's size (0.9M parameters) a GPU step is bound by the host launching operators (~16 us
each on the H100), so DeepSpeed's bookkeeping around the step counts: a reduce of the
gradients with themselves at one rank, walks of the module tree, parameters pointed again at
the buffer they already point at. Each function below replaces one method of one engine or
optimizer instance, only under the conditions where the result is bit-identical, and leaves
DeepSpeed's own method everywhere else; tests/test_engine.py compares each against DeepSpeed's
own on the same batches (weights, fp32 masters, operators per step).

The methods replaced are DeepSpeed's internals, which another release may rename or change, so
the trims are opt-in (deepspeed.host_trims, off by default) and run only on the DeepSpeed
releases they were written against (WRITTEN_FOR): the package's own range of DeepSpeed stays
as wide as what the default path was tested with."""
from __future__ import annotations

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from s3rec.config import ConfigError

# The release whose internals they replace: 0.19.7 lacks _add_to_grad_partition_buffer, and
# 0.19.0-0.19.6 also the round_robin_bit16_offsets the repointing check reads.
WRITTEN_FOR = "==0.19.8"


def check_deepspeed_version(version: str) -> None:
    """Refuses deepspeed.host_trims on a DeepSpeed outside WRITTEN_FOR (`version`: the installed
    deepspeed.__version__), naming the key and both versions: no silent fallback to DeepSpeed's
    methods, so that a run asking for the trims either gets them or says why not."""
    try:
        ok = SpecifierSet(WRITTEN_FOR).contains(Version(version), prereleases=True)
    except InvalidVersion:
        ok = False
    if not ok:
        raise ConfigError(f"config key 'deepspeed.host_trims': the trims were written for "
                          f"DeepSpeed {WRITTEN_FOR}, this environment has DeepSpeed {version}; "
                          f"set deepspeed.host_trims=false (DeepSpeed's own methods)")


def trim_host_work(engine) -> None:
    """Called by s3rec.engine.deepspeed_setup.initialize on an engine whose config asks for it
    (deepspeed.host_trims; its DeepSpeed version checked by build_ds_config)."""
    _skip_allreduce_alone(engine)
    _zero_grad_from_a_list(engine)
    _skip_zero_reduce_alone(engine)
    _repoint_bit16_only_when_moved(engine)


def _skip_allreduce_alone(engine) -> None:
    """ZeRO 0 with one data-parallel rank: DeepSpeed all-reduces the gradients anyway (flatten
    every gradient into one buffer, all-reduce it with itself, multiply by 1, copy each back:
    ~100 kernel launches and a collective per step, ~10% of this model's step on a GPU, where the
    step is bound by launches). What it does besides, fill a missing gradient with zeros (so Adam
    still decays that parameter), is kept, at the same accumulation boundaries: the weights are
    bit-identical
    (tests/test_engine.py::test_world1_zero0_skips_the_allreduce_with_identical_weights).
    ZeRO 1-3 and the bf16 optimizer reduce inside their optimizers, untouched here."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    if (engine.zero_optimization_stage() != 0 or engine.dp_world_size != 1
            or isinstance(engine.optimizer, BF16_Optimizer) or engine.has_moe_layers
            or engine.pipeline_parallelism or engine.sequence_parallel_size != 1):
        return

    # DeepSpeed's _get_gradients_for_reduction walks the module tree for these at every step
    # (~0.1 ms of host time here); the parameters of an engine do not change
    params = [p for p in engine.module.parameters() if p.requires_grad and p.numel()]

    def allreduce_gradients(bucket_size=None):
        if engine.is_gradient_accumulation_boundary():
            for p in params:                           # as DeepSpeed fills a missing gradient
                if p.grad is None:
                    p.grad = torch.zeros(p.size(), dtype=p.dtype, device=p.device)

    engine.allreduce_gradients = allreduce_gradients


def _zero_grad_from_a_list(engine) -> None:
    """ZeRO 0: after every fp32 step DeepSpeed's engine.zero_grad sets each parameter's gradient
    to None, walking the module tree for them (named_parameters: ~0.1 ms of host time a step
    for this model on the 2-core CPU, where a tiny-model step is ~3 ms). The same from a list
    made once (ZeRO 1-3 and the bf16 optimizer clear their own)."""
    if engine.zero_optimization_stage() != 0:
        return
    params = list(engine.module.parameters())

    def zero_grad():
        for p in params:
            p.grad = None

    engine.zero_grad = zero_grad


def _skip_zero_reduce_alone(engine) -> None:
    """ZeRO 1-2 with one data-parallel rank (and contiguous_gradients off, our default there):
    DeepSpeed still "reduces" each bucket of gradients: flatten them into one buffer, divide by
    1, all-reduce it with itself, then copy every gradient back from it (a concatenation and one
    copy per parameter, ~180 ATen operators a step for this model, ~0.35 ms of host time on
    the 2-core CPU; on a GPU, whose step is bound by the host, ~47 launches). The result equals
    the input bit for bit, so what remains is what DeepSpeed does with the result: add it into
    the partition's accumulation buffer where it keeps one. Only where the gradients already have
    the communication dtype (a narrower one would round them; DeepSpeed's own path then),
    without overlap_comm (whose stream bookkeeping stays DeepSpeed's) and without optimizer
    offload. Bit-identical weights and fp32 masters
    (tests/test_engine.py::test_world1_zero12_skips_the_reduce_with_identical_weights)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    opt = engine.optimizer
    if (engine.zero_optimization_stage() not in (1, 2) or engine.dp_world_size != 1
            or not isinstance(opt, DeepSpeedZeroOptimizer) or opt.overlap_comm
            or opt.cpu_offload          # its own gradient path, not compared here
            or engine.has_moe_layers or engine.sequence_parallel_size != 1):
        return
    deepspeeds = opt.allreduce_and_copy

    def allreduce_and_copy(small_bucket, communication_data_type, rank=None, log=None,
                           divide=True, process_group=None, output_bucket=None):
        if any(g.dtype != communication_data_type for g in small_bucket):
            return deepspeeds(small_bucket, communication_data_type, rank=rank, log=log,
                              divide=divide, process_group=process_group,
                              output_bucket=output_bucket)
        for grad, output in zip(small_bucket, output_bucket or [None] * len(small_bucket)):
            opt._add_to_grad_partition_buffer(output, grad)

    opt.allreduce_and_copy = allreduce_and_copy


def _repoint_bit16_only_when_moved(engine) -> None:
    """ZeRO 1-2: after every step DeepSpeed points each model parameter at its slice of the flat
    working-precision buffer again (narrow, view, .data twice a parameter: ~180 ATen operators a
    step for this model, ~0.2 ms of host time on the 2-core CPU; its own comment: "we probably
    don't need this? just to be safe"). The step writes the buffer in place, so the parameters
    still are those slices. This checks that they are (address, shape, contiguity: no operator)
    and repoints only if one is not: where something moved the buffer (DeepSpeed's state offload
    and reload do), DeepSpeed's own method runs. Bit-identical weights
    (tests/test_engine.py::test_world1_zero12_skips_the_reduce_with_identical_weights, and
    across a checkpoint load: test_checkpoint_round_trip_restores_model_optimizer_and_rng[2]);
    a moved buffer repointed (test_zero12_repoints_the_parameters_when_the_flat_buffer_moved)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    opt = engine.optimizer
    if not isinstance(opt, DeepSpeedZeroOptimizer):
        return
    deepspeeds = opt._update_model_bit16_weights

    def update_model_bit16_weights(group_index):
        flat = opt.bit16_groups_flat[group_index]
        base, size = flat.data_ptr(), flat.element_size()
        for p, meta, offset in zip(opt.round_robin_bit16_groups[group_index],
                                   opt.round_robin_bit16_meta[group_index],
                                   opt.round_robin_bit16_offsets[group_index]):
            if (p.data_ptr() != base + offset * size or p.shape != meta.shape
                    or p.dtype != flat.dtype or not p.is_contiguous()):
                return deepspeeds(group_index)

    opt._update_model_bit16_weights = update_model_bit16_weights
