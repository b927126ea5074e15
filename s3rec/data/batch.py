"""The batch types that flow from the samplers (s3rec/data) to the objectives and the engine."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


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

    def to(self, device) -> "PretrainBatch":
        return PretrainBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=True)
                                for f in dataclasses.fields(self)})
