"""The S3Rec module: sizes, names, init, masks, trimmed batches."""
import pytest
import torch
import torch.nn.functional as F

from s3rec.config import Config, load_config
from s3rec.model import S3RecModel, build_model
from s3rec.model.encoder import attention_bias
from tests.test_objectives import original_encode

BEAUTY = dict(item_size=12103, attribute_size=638)


def authors_keys():
    keys = ["item_embeddings.weight", "attribute_embeddings.weight", "position_embeddings.weight"]
    for i in range(2):
        p = f"item_encoder.layer.{i}."
        keys += [p + f"attention.{m}.{w}" for m in ("query", "key", "value", "dense", "LayerNorm")
                 for w in ("weight", "bias")]
        keys += [p + f"intermediate.{m}.{w}" for m in ("dense_1", "dense_2", "LayerNorm")
                 for w in ("weight", "bias")]
    keys += ["LayerNorm.weight", "LayerNorm.bias"]
    keys += [f"{h}_norm.{w}" for h in ("aap", "mip", "map", "sp") for w in ("weight", "bias")]
    return keys


def test_beauty_parameter_count_and_authors_names():
    torch.manual_seed(0)
    model = build_model(Config(), **BEAUTY)
    assert sum(p.numel() for p in model.parameters()) == 935_360
    assert model.param_counts()["total"] == 935_360
    assert list(model.state_dict()) == authors_keys()


def test_init_matches_original_including_random_frozen_padding_rows():
    torch.manual_seed(0)
    model = build_model(Config(), **BEAUTY)
    w = model.item_embeddings.weight
    assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001
    assert w[0].abs().sum() > 0                            # re-initialised after construction
    assert model.attribute_embeddings.weight[0].abs().sum() > 0
    assert abs(model.aap_norm.weight.std().item() - 0.02) < 0.002
    assert model.aap_norm.bias.abs().sum() == 0
    q = model.item_encoder.layer[1].attention.query
    assert abs(q.weight.std().item() - 0.02) < 0.002 and q.bias.abs().sum() == 0
    ln = model.item_encoder.layer[0].intermediate.LayerNorm
    assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0) and ln.eps == 1e-12
    # padding_idx: the padding row gets no gradient, so it stays at its random init
    items = torch.tensor([[0, 0, 5, 6]])
    model.encode(items, torch.arange(46, 50)[None], causal=False).sum().backward()
    assert model.item_embeddings.weight.grad[0].abs().sum() == 0
    assert model.item_embeddings.weight.grad[5].abs().sum() > 0


def test_unknown_sizes_still_build_and_count():
    cfg = load_config(overrides=["variant=s3rec-lowrank", "model.head_rank=8"])
    model = build_model(cfg, 50, 10)
    d = 64
    full = 50 * d + 10 * d + 50 * d + 128 + 99968
    assert model.param_counts()["total"] == full + 2 * (d * d + d) + 2 * (2 * d * 8 + d)
    assert type(model.aap_norm).__name__ == "LowRankHead"
    assert type(model.mip_norm).__name__ == "FullHead"


def _trim_case(seed, causal):
    torch.manual_seed(seed)
    cfg = Config()
    model = build_model(cfg, 40, 7).eval()
    B, L = 6, 9
    lengths = torch.tensor([9, 1, 4, 9, 2, 7])
    valid = torch.arange(L)[None] >= (L - lengths)[:, None]
    items = torch.where(valid, torch.randint(1, 40, (B, L)), 0)
    if not causal:
        items[valid & (torch.rand(B, L) < 0.3)] = 39          # mask_id inputs attend normally
    trimmed = model.encode(items, (50 - L + torch.arange(L)).expand(B, L), causal=causal)
    full_items = F.pad(items, (50 - L, 0))
    full = model.encode(full_items, torch.arange(50).expand(B, 50), causal=causal)
    ref = original_encode(model, full_items, pretrain=not causal)
    return trimmed, full, ref, valid


@pytest.mark.parametrize("causal", [False, True])
def test_trimmed_batch_equals_padded_to_max_len(causal):
    trimmed, full, ref, valid = _trim_case(0, causal)
    tail = full[:, -trimmed.shape[1]:]
    assert torch.allclose(trimmed[valid], tail[valid], atol=1e-5)
    # and the padded run equals the authors' encoder at the non-padding positions
    assert torch.allclose(full[:, -trimmed.shape[1]:][valid], ref[:, -trimmed.shape[1]:][valid],
                          atol=1e-5)


def test_attention_bias_shapes_and_values():
    items = torch.tensor([[0, 3, 4]])
    bi = attention_bias(items, causal=False, dtype=torch.float32)
    assert bi.shape == (1, 1, 1, 3) and bi[0, 0, 0].tolist() == [-1e8, 0, 0]
    ca = attention_bias(items, causal=True, dtype=torch.float32)
    assert ca.shape == (1, 1, 3, 3)
    assert ca[0, 0].tolist() == [[-1e4, -1e4, -1e4], [-1e4, 0, -1e4], [-1e4, 0, 0]]
    half = attention_bias(items, causal=False, dtype=torch.float16)
    assert torch.isfinite(half).all()


def test_causal_output_ignores_future_items():
    torch.manual_seed(1)
    model = build_model(Config(), 40, 7).eval()
    items = torch.tensor([[0, 0, 3, 4, 5, 6]])
    pos = torch.arange(44, 50)[None]
    a = model.encode(items, pos, causal=True)
    items2 = items.clone()
    items2[0, -1] = 9
    b = model.encode(items2, pos, causal=True)
    assert torch.allclose(a[0, 2:-1], b[0, 2:-1], atol=1e-6)
    # padding queries see no key, so (as in the original) the -10000 shifts every score
    # equally and they attend to all positions, future ones included; no loss reads them
    assert not torch.allclose(a[0, :2], b[0, :2], atol=1e-6)
    assert not torch.allclose(a[0, -1], b[0, -1])


def test_scores_are_dot_products_with_item_embeddings():
    torch.manual_seed(2)
    model = build_model(Config(), 40, 7)
    last = torch.randn(3, 64)
    cand = torch.randint(1, 39, (3, 100))
    s = model.finetune_scores(last, cand)
    assert torch.allclose(s, model.full_scores(last).gather(1, cand), atol=1e-6)


def test_missing_head_config_is_an_error():
    cfg = Config()
    with pytest.raises(ValueError, match="sp"):
        S3RecModel(cfg.model, {n: cfg.head(n) for n in ("aap", "mip", "map")}, 10, 5)
