"""Fast dropout: same distribution as nn.Dropout, seeded by torch, correct gradient."""
import pytest
import torch

from s3rec.config import Config
from s3rec.model import build_model
from s3rec.model.dropout import FastDropout, fast_dropout, keep_mask


@pytest.mark.parametrize("p", [0.5, 0.1, 0.3, 0.9])
def test_keep_rate_and_scaling(p):
    torch.manual_seed(0)
    x = torch.ones(200, 50, 64)
    y = fast_dropout(x, p)
    kept = y != 0
    rate = kept.float().mean().item()
    n = x.numel()
    assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5 + 2e-5
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
    # neighbouring elements are independent (no bit reused): P(both kept) ~ (1-p)^2
    pair = (kept[..., ::2] & kept[..., 1::2]).float().mean().item()
    assert abs(pair - (1 - p) ** 2) < 0.01


def test_bits_are_unbiased_at_every_offset():
    torch.manual_seed(1)
    m = keep_mask(torch.Size([4000, 64]), 0.5, torch.device("cpu"))
    assert m.dtype == torch.bool
    assert keep_mask(torch.Size([10, 3]), 0.2, torch.device("cpu")).dtype == torch.bool
    m = m.float()
    assert (m.mean(0) - 0.5).abs().max() < 0.04        # every bit position of the 64-bit words


def test_odd_sizes_and_shapes():
    torch.manual_seed(2)
    for shape in [(1,), (7,), (3, 5, 7), (0, 4)]:
        for p in (0.5, 0.2):
            assert fast_dropout(torch.ones(shape), p).shape == torch.Size(shape)


def test_eval_identity_and_edge_probabilities():
    x = torch.randn(10, 10)
    d = FastDropout(0.5).eval()
    assert d(x) is x
    assert fast_dropout(x, 0.0) is x
    assert torch.all(fast_dropout(x, 1.0) == 0)
    with pytest.raises(ValueError):
        FastDropout(1.5)


def test_seeded_by_torch_generator():
    x = torch.randn(300, 10, 64)
    torch.manual_seed(7)
    a = fast_dropout(x, 0.5)
    torch.manual_seed(7)
    b = fast_dropout(x, 0.5)
    c = fast_dropout(x, 0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_gradient_is_mask_times_scale():
    torch.manual_seed(3)
    x = torch.randn(40, 33, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(4)
    y = fast_dropout(x, 0.5)
    g = torch.randn_like(y)
    y.backward(g)
    mask = (y != 0)
    assert torch.allclose(x.grad, g * mask * 2.0)
    # gradcheck with a fixed draw: reseed inside the function
    def f(t):
        torch.manual_seed(5)
        return fast_dropout(t, 0.3)
    assert torch.autograd.gradcheck(f, (torch.randn(6, 9, dtype=torch.float64,
                                                    requires_grad=True),))


def test_model_switch():
    cfg = Config()
    assert cfg.model.fast_dropout is True
    m = build_model(cfg, 20, 5)
    assert type(m.dropout).__name__ == "FastDropout"
    cfg.model.fast_dropout = False
    m = build_model(cfg, 20, 5)
    assert type(m.dropout).__name__ == "Dropout"
    assert type(m.item_encoder.layer[0].attention.attn_dropout).__name__ == "Dropout"
