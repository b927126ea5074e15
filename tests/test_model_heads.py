"""Full and low-rank heads, their init, and the per-head weight-decay groups."""
import pytest
import torch

from s3rec.config import Config, HeadConfig, load_config
from s3rec.model import build_model, param_groups
from s3rec.model.heads import FullHead, LowRankHead, make_head


def test_full_head_is_linear_with_authors_names():
    h = make_head(HeadConfig(), 8)
    assert isinstance(h, FullHead) and [n for n, _ in h.named_parameters()] == ["weight", "bias"]


def test_lowrank_head_applies_u_vt():
    torch.manual_seed(0)
    h = make_head(HeadConfig(kind="lowrank", rank=3), 8)
    with torch.no_grad():
        h.bias.normal_()
    x = torch.randn(5, 8)
    assert torch.allclose(h(x), x @ (h.U @ h.V.T).T + h.bias, atol=1e-6)
    assert torch.allclose(h.matrix(), h.U @ h.V.T)
    assert sum(p.numel() for p in h.parameters()) == 2 * 8 * 3 + 8


def test_rank_above_hidden_size_names_the_head():
    with pytest.raises(ValueError, match="head 'aap'.*rank 9.*hidden size 8"):
        make_head(HeadConfig(kind="lowrank", rank=9), 8, name="aap")


def test_orthogonal_init():
    torch.manual_seed(1)
    h = make_head(HeadConfig(kind="lowrank", rank=4, init="orthogonal"), 16)
    assert torch.allclose(h.U.T @ h.U, torch.eye(4), atol=1e-5)
    assert torch.allclose(h.V.T @ h.V, torch.eye(4), atol=1e-5)


def test_svd_init_is_best_rank_r_approximation():
    torch.manual_seed(2)
    w, b = torch.randn(16, 16), torch.randn(16)
    h = make_head(HeadConfig(kind="lowrank", rank=5, init="svd"), 16, w, b)
    u, s, vh = torch.linalg.svd(w)
    best = (u[:, :5] * s[:5]) @ vh[:5]
    assert torch.allclose(h.matrix(), best, atol=1e-4)
    assert torch.equal(h.bias.data, b)
    assert torch.allclose(h.U.norm(dim=0), h.V.norm(dim=0), atol=1e-4)   # split evenly
    full = make_head(HeadConfig(kind="lowrank", rank=16, init="svd"), 16, w, b)
    assert torch.allclose(full.matrix(), w, atol=1e-4)
    with pytest.raises(ValueError, match="svd"):
        make_head(HeadConfig(kind="lowrank", rank=5, init="svd"), 16)


def test_param_groups_per_head_decay_plain_adam():
    cfg = load_config(overrides=["variant=s3rec-lowrank", "model.head_rank=4",
                                 "model.heads.aap.weight_decay=0.1",
                                 "model.heads.mip.weight_decay=0.01",
                                 "pretrain.weight_decay=0.001"])
    torch.manual_seed(0)
    model = build_model(cfg, 30, 6)
    groups = param_groups(model, cfg)
    by = {g["name"]: g for g in groups}
    assert by["base"]["weight_decay"] == 0.001
    assert {id(p) for p in by["head:aap"]["params"]} == {id(model.aap_norm.U), id(model.aap_norm.V)}
    assert by["head:aap"]["weight_decay"] == 0.1
    assert [id(p) for p in by["head:mip"]["params"]] == [id(model.mip_norm.weight)]
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())      # each exactly once
    assert id(model.aap_norm.bias) in {id(p) for p in by["base"]["params"]}
    opt = torch.optim.Adam(groups, lr=1e-3)
    # L2 in the gradient (Adam), not decoupled (AdamW): with zero loss gradient the step is
    # driven by decay only, and its size is lr (Adam normalises) for every decayed parameter
    before = model.aap_norm.U.detach().clone()
    (0 * sum(p.sum() for p in model.parameters())).backward()
    opt.step()
    assert torch.allclose(model.aap_norm.U - before, -1e-3 * torch.sign(before), atol=1e-6)
    assert not isinstance(opt, torch.optim.AdamW)


def test_default_config_gives_one_group():
    groups = param_groups(build_model(Config(), 30, 6), Config())
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0
