"""Model-anatomy figures and the low-rank (SVD) analysis, on the real model classes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from s3rec.analysis.anatomy import (PAPER_BEAUTY, RELEASED_BEAUTY, all_anatomy_figures,
                              architecture_facts, breakdown, head_param_counts, masks, model_for)
from s3rec.analysis.lowrank import analyse_checkpoint, spectrum
from tests.test_report import assert_real_figure

REFERENCE = Path("/work/shared/reference/Beauty-epochs-150.pt")


def test_parameter_counts_at_the_released_beauty_sizes_match_the_reference():
    full = model_for(None, RELEASED_BEAUTY)
    parts = breakdown(full)
    assert sum(parts.values()) == 935_360   # the original's Beauty count (reference notes)
    assert parts["item embeddings"] == 12_103 * 64 and parts["attribute embeddings"] == 638 * 64
    assert parts["AAP head"] == 64 * 64 + 64
    low = breakdown(model_for(8, RELEASED_BEAUTY))
    assert low["AAP head"] == low["MAP head"] == 2 * 64 * 8 + 64
    assert low["MIP head"] == low["SP head"] == 64 * 64 + 64   # only AAP/MAP go low-rank
    paper = breakdown(model_for(None, PAPER_BEAUTY))
    assert paper["item embeddings"] == 12_104 * 64 and paper["attribute embeddings"] == 1_222 * 64


def test_head_counts_follow_the_formulas():
    for r, low, full in head_param_counts(64, (1, 8, 32, 64)):
        assert low == 2 * 64 * r + 64 and full == 64 * 64 + 64


def test_masks_are_the_models_bidirectional_and_causal_masks():
    ms = masks((0, 0, 3, 5, 7))
    bi, causal = ms["pretraining (bidirectional)"], ms["fine-tuning (causal)"]
    visible_bi = bi == 0
    assert visible_bi[:, :2].sum() == 0 and visible_bi[:, 2:].all()   # padding keys only
    visible_c = causal == 0
    want = torch.tensor([[k >= 2 and k <= q for k in range(5)] for q in range(5)])
    assert torch.equal(visible_c, want)


def test_architecture_facts_are_read_from_the_instance():
    f = architecture_facts(model_for(16, RELEASED_BEAUTY))
    assert f["item_emb"] == "12103×64" and f["attr_emb"] == "638×64" and f["pos_emb"] == "50×64"
    assert f["layers"] == 2 and f["attn_heads"] == 2 and f["head_size"] == 32
    assert f["heads"]["aap"] == "U 64×16, V 64×16" and f["heads"]["mip"] == "W 64×64"


def test_all_anatomy_figures_are_written(tmp_path):
    res = all_anatomy_figures(tmp_path, ranks=(None, 8))
    for stem in ("architecture_full", "architecture_lowrank16", "attention_masks",
                 "lowrank_heads", "params_breakdown"):
        assert_real_figure(tmp_path / stem)
    assert [r["total"] for r in res["breakdown"]][:2] == [935_360, 935_360 - 2 * (4160 - 1088)]


def test_truncated_svd_error_matches_an_explicit_truncation():
    torch.manual_seed(0)
    w = torch.randn(16, 16, dtype=torch.float64)
    s, err = spectrum(w)
    u, sv, vh = torch.linalg.svd(w)
    for r in (1, 4, 15, 16):
        wr = u[:, :r] @ torch.diag(sv[:r]) @ vh[:r]
        assert err[r - 1] == pytest.approx((torch.linalg.norm(w - wr) / torch.linalg.norm(w))
                                           .item(), abs=1e-12)
    lowrank = torch.randn(16, 3, dtype=torch.float64) @ torch.randn(3, 16, dtype=torch.float64)
    _, err = spectrum(lowrank)
    assert err[2] < 1e-12 < err[1]


@pytest.mark.skipif(not REFERENCE.is_file(), reason="authors' checkpoint not on this machine")
def test_lowrank_analysis_of_the_authors_checkpoint():
    spectra = {h.name: h for h in analyse_checkpoint(REFERENCE)}
    assert spectra["aap"].source == "aap_norm.weight" and len(spectra["map"].singular) == 64
    sd = torch.load(REFERENCE, map_location="cpu", weights_only=True)
    s = torch.linalg.svdvals(sd["map_norm.weight"].double())
    assert spectra["map"].singular == pytest.approx(s.tolist())
    assert spectra["map"].error_at(64) == 0.0
    errs = spectra["aap"].rel_error
    assert all(a >= b for a, b in zip(errs, errs[1:]))   # more rank, less error
