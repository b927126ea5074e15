"""The batch types that flow from the samplers (s3rec/data) to the objectives and the engine."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


def move_batch(batch, device, pack: bool | None = None):
    """A copy of `batch` (a dataclass whose fields are tensors, None, ints, nested dataclasses or
    lists of those) with every tensor on `device`. To a GPU (pack=None: packed when the device is
    CUDA): per dtype, one pinned host buffer and ONE asynchronous copy, split into views there. A
    copy from pageable memory makes the host wait until the GPU has finished all queued work (a
    stream sync), and a batch has ~13 tensors: per-tensor copies would serialise host and GPU on
    every step."""
    device = torch.device(device)
    if pack is None:
        pack = device.type == "cuda"
    tensors: list[torch.Tensor] = []

    def collect(x):
        if isinstance(x, torch.Tensor):
            tensors.append(x)
        elif dataclasses.is_dataclass(x):
            for f in dataclasses.fields(x):
                collect(getattr(x, f.name))
        elif isinstance(x, list):
            for v in x:
                collect(v)

    collect(batch)
    if pack:
        moved: list[torch.Tensor | None] = [None] * len(tensors)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            by_dtype.setdefault(t.dtype, []).append(i)
        for dtype, idx in by_dtype.items():
            sizes = [tensors[i].numel() for i in idx]
            host = torch.empty(sum(sizes), dtype=dtype, pin_memory=device.type == "cuda")
            torch.cat([tensors[i].reshape(-1) for i in idx], out=host)
            for i, part in zip(idx, host.to(device, non_blocking=True).split(sizes)):
                moved[i] = part.view(tensors[i].shape)
    else:
        moved = [t.to(device) for t in tensors]
    it = iter(moved)

    def rebuild(x):
        if isinstance(x, torch.Tensor):
            return next(it)
        if dataclasses.is_dataclass(x):
            return type(x)(**{f.name: rebuild(getattr(x, f.name)) for f in dataclasses.fields(x)})
        if isinstance(x, list):
            return [rebuild(v) for v in x]
        return x

    return rebuild(batch)


@dataclass
class PretrainBatch:
    """One (micro-)batch of pretraining samples, left-padded with 0 and trimmed to its longest
    prefix L; positions are absolute in the max_len window (the newest item is max_len - 1)."""
    masked_items: torch.Tensor     # int64 [B, L] input, masked positions = mask_id (the last always)
    positions: torch.Tensor        # int64 [B, L] absolute positions max_len - L .. max_len - 1
    original_items: torch.Tensor   # int64 [B, L] unmasked input (0 = padding)
    mip_neg: torch.Tensor          # int64 [B, L] one negative item per masked position, 0 elsewhere
    masked: torch.Tensor           # bool  [B, L] positions that were masked
    sp_masked: torch.Tensor        # int64 [B, L] input with the segment replaced by mask_id
    sp_pos: torch.Tensor           # int64 [B, L] the segment alone (mask_id elsewhere, 0 padding)
    sp_neg: torch.Tensor           # int64 [B, L] the negative segment alone, same positions
    attr_index: torch.Tensor       # int64 [P, 2] (flat index into B*L, attribute id): sparse
                                   #   multi-hot of the original item at each non-padding position
    index: "PretrainIndex | None" = None   # where the objectives read; computed on the host by
                                   #   s3rec.objectives.pretrain_index (None: computed in the step)
    rows_real: torch.Tensor | None = None   # bool [B]: set only on a batch padded to a fixed
                                   #   shape (pad_pretrain_batch), False on the added rows; such a
                                   #   batch is for s3rec.static_objectives (attr_index is empty)

    def to(self, device) -> "PretrainBatch":
        return move_batch(self, device)


def pad_pretrain_batch(batch: PretrainBatch, rows: int, length: int) -> PretrainBatch:
    """`batch` [B, L] padded to [rows, length] on the host, for fixed-shape steps
    (pretrain.static_shapes): `length - L` padding columns on the left (positions stay absolute:
    the newest item keeps the last position), then `rows - B` rows that copy row 0 (a real
    sequence: a row of padding alone would leave its attention no visible key, which fp16
    turns into NaN) marked False in `rows_real`. attr_index is dropped (empty): the fixed-shape
    objectives read attribute targets from a table (s3rec.static_objectives.attribute_table)."""
    B, L = batch.masked_items.shape
    if B == 0 and rows >= 1:
        # A rank's share of a short last batch can be empty (fewer rows than ranks x
        # micro-batches): one stand-in row (item 1 at the newest position, nothing masked),
        # padded as usual and then marked not real, so the shape holds and the step adds 0.
        one = batch.masked_items.new_ones((1, 1))
        stand_in = PretrainBatch(masked_items=one, positions=one * (length - 1),
                                 original_items=one, mip_neg=one * 0,
                                 masked=batch.masked.new_zeros((1, 1)), sp_masked=one,
                                 sp_pos=one, sp_neg=one, attr_index=batch.attr_index[:0])
        padded = pad_pretrain_batch(stand_in, rows, length)
        padded.rows_real[:] = False
        return padded
    if not (1 <= B <= rows and 1 <= L <= length):
        raise ValueError(f"pad_pretrain_batch: a [{B}, {L}] batch does not fit [{rows}, {length}]")
    newest = int(batch.positions[0, -1])
    if newest - length + 1 < 0:
        raise ValueError(f"pad_pretrain_batch: length {length} is longer than the position window "
                         f"(the newest item is at position {newest})")
    fields = {}
    for name in ("masked_items", "original_items", "mip_neg", "masked", "sp_masked", "sp_pos",
                 "sp_neg"):
        t = getattr(batch, name)
        out = t.new_zeros((rows, length))
        out[:B, length - L:] = t
        out[B:] = out[0]
        fields[name] = out
    fields["positions"] = torch.arange(newest - length + 1, newest + 1,
                                       dtype=batch.positions.dtype).expand(rows, length)
    real = torch.zeros(rows, dtype=torch.bool)
    real[:B] = True
    return PretrainBatch(**fields, attr_index=batch.attr_index.new_zeros((0, 2)), index=None,
                         rows_real=real)


@dataclass
class PretrainIndex:
    """Where the pretraining objectives read in a PretrainBatch, computed on the host before the
    batch goes to the device: selecting rows by boolean masks, deduplicating targets and checking
    attribute ids on a GPU would each wait for the device (a host read), several times a step."""
    unmasked: torch.Tensor      # int64 [N] flat positions (into B*L) neither padding nor masked: AAP
    masked: torch.Tensor        # int64 [M] flat positions that were masked: MIP and MAP
    aap_targets: torch.Tensor   # int64 [Ta, 2] (row among `unmasked`, attribute id), unique pairs
    map_targets: torch.Tensor   # int64 [Tm, 2] (row among `masked`, attribute id), unique pairs
    max_attribute: int          # largest attribute id among the targets (-1: none); checked
                                #   against the model's attribute table without a device read
