"""What a pretraining step computes, as the config chooses: the host's preparation of a batch and
the losses, through the default path (s3rec.objectives: the batch's own shape, an index made on
the host) or at fixed shapes (s3rec.static_objectives, pretrain.static_shapes), optionally
compiled (pretrain.compile). Used by s3rec-pretrain and benchmarks/train_speed.py."""
from __future__ import annotations

import dataclasses

import torch

from s3rec.config import Config
from s3rec.data.batch import pad_pretrain_batch
from s3rec.data.pretrain_samples import PretrainSampler
from s3rec.objectives import pretrain_index, pretrain_losses
from s3rec.static_objectives import attribute_table, pretrain_losses_static


def pretrain_sampler(cfg: Config, ds) -> PretrainSampler:
    """The pretraining sampler of dataset `ds` (s3rec.data.reader.Dataset) under `cfg`: window
    model.max_seq_length, pretrain.mask_prob, pretrain.sp_negatives."""
    items, offsets = ds.load_sequences()
    attr_values, attr_offsets = ds.item_attributes()
    return PretrainSampler(items, offsets, attr_values, attr_offsets, ds.num_items,
                           cfg.model.max_seq_length, cfg.pretrain.mask_prob,
                           cfg.pretrain.sp_negatives)


def build_loss(cfg: Config, sampler, item_size: int, attribute_size: int, micro: int, device):
    """(prepare, losses) of a pretraining step: `prepare` turns a CPU micro-batch into what
    `losses(model, batch) -> {"aap", "mip", "map", "sp", "total"}` reads, on the host before the
    copy. Default: the batch's own shape, the objectives' index computed on the host
    (s3rec.objectives). pretrain.static_shapes: padded to [micro, max_seq_length], targets from a
    device attribute table (s3rec.static_objectives); pretrain.compile: those losses through
    torch.compile (shared by s3rec-pretrain and benchmarks/train_speed.py)."""
    p = cfg.pretrain
    if not p.static_shapes:
        return (lambda b: dataclasses.replace(b, index=pretrain_index(b)),
                lambda m, b: pretrain_losses(m, b, p.weights, p.reduction, p.pair_form))
    table = attribute_table(sampler.attr_values, sampler.attr_offsets, item_size,
                            attribute_size).to(device)
    length = cfg.model.max_seq_length

    def losses(m, b):
        return pretrain_losses_static(m, b, table, p.weights, p.reduction, p.pair_form)

    if p.compile != "none":
        # the table is the same tensor at every step: a CUDA graph reads it where it lies
        torch._dynamo.mark_static_address(table)
        compiled = torch.compile(losses, fullgraph=True, dynamic=False,
                                 mode=None if p.compile == "default" else p.compile)
        if p.compile == "reduce-overhead":
            def losses(m, b):
                # a new step: the previous step's graph outputs (read already) may be reused
                torch.compiler.cudagraph_mark_step_begin()
                return compiled(m, b)
        else:
            losses = compiled
    return lambda b: pad_pretrain_batch(b, micro, length), losses
