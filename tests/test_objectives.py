"""Each objective equals a plain transcription of the authors' code (dense multi-hot, BCELoss on
sigmoid outputs, full padding to max_len, one encoder pass per sequence, positions 0..49)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from s3rec.config import Config, ObjectiveWeights
from s3rec.data.batch import PretrainBatch
from s3rec.model import build_model
from s3rec.objectives import (finetune_batch_loss, finetune_loss, pair_loss, pretrain_losses,
                              sigmoid_bce_sum)

MAX_LEN = 12
NUM_ITEMS, NUM_ATTRS = 30, 9
ITEM_SIZE, ATTR_SIZE, MASK_ID = NUM_ITEMS + 2, NUM_ATTRS + 1, NUM_ITEMS + 1


# ---------------------------------------------------------------- the original, transcribed

def original_encode(model, input_ids, pretrain=True):
    """models.S3RecModel.add_position_embedding + item_encoder with the original masks (inputs
    padded to max_len, positions arange(max_len))."""
    seq_length = input_ids.size(1)
    position_ids = torch.arange(seq_length, dtype=torch.long, device=input_ids.device)
    position_ids = position_ids.unsqueeze(0).expand_as(input_ids)
    emb = model.item_embeddings(input_ids) + model.position_embeddings(position_ids)
    emb = model.dropout(model.LayerNorm(emb))
    if pretrain:
        mask = (input_ids == 0).float() * -1e8
        mask = torch.unsqueeze(torch.unsqueeze(mask, 1), 1)
    else:
        attention_mask = (input_ids > 0).long()
        ext = attention_mask.unsqueeze(1).unsqueeze(2)
        max_len = attention_mask.size(-1)
        sub = torch.triu(torch.ones((1, max_len, max_len), device=input_ids.device), diagonal=1)
        sub = (sub == 0).unsqueeze(1).long()
        ext = (ext * sub).float()
        mask = (1.0 - ext) * -10000.0
    h = emb
    for layer in model.item_encoder.layer:
        a = layer.attention
        B, L, d = h.shape

        def split(x):
            return x.view(B, L, a.num_heads, a.head_size).permute(0, 2, 1, 3)
        q, k, v = split(a.query(h)), split(a.key(h)), split(a.value(h))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(a.head_size) + mask
        probs = nn.Softmax(dim=-1)(scores)
        ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous().view(B, L, d)
        h1 = a.LayerNorm(a.dense(ctx) + h)
        f = layer.intermediate
        x = f.dense_1(h1)
        x = x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
        h = f.LayerNorm(f.dense_2(x) + h1)
    return h


def original_pretrain(model, attributes, masked_item_sequence, pos_items, neg_items,
                      masked_segment_sequence, pos_segment, neg_segment):
    """models.S3RecModel.pretrain, transcribed (hidden 64 -> model width)."""
    crit = nn.BCELoss(reduction="none")
    d = model.cfg.hidden_size
    seq_out = original_encode(model, masked_item_sequence)
    attr_emb = model.attribute_embeddings.weight

    def attr_score(head, out):
        out = head(out).view([-1, d, 1])
        return torch.sigmoid(torch.matmul(attr_emb, out).squeeze(-1))
    aap_loss = crit(attr_score(model.aap_norm, seq_out), attributes.view(-1, ATTR_SIZE).float())
    aap_mask = (masked_item_sequence != MASK_ID).float() * (masked_item_sequence != 0).float()
    aap_loss = torch.sum(aap_loss * aap_mask.flatten().unsqueeze(-1))

    def mip_score(out, target):
        out = model.mip_norm(out.view([-1, d]))
        return torch.sigmoid(torch.sum(out * target.view([-1, d]), -1))
    pos_score = mip_score(seq_out, model.item_embeddings(pos_items))
    neg_score = mip_score(seq_out, model.item_embeddings(neg_items))
    dist = torch.sigmoid(pos_score - neg_score)
    mip_loss = crit(dist, torch.ones_like(dist))
    mip_loss = torch.sum(mip_loss * (masked_item_sequence == MASK_ID).float().flatten())

    map_loss = crit(attr_score(model.map_norm, seq_out), attributes.view(-1, ATTR_SIZE).float())
    map_mask = (masked_item_sequence == MASK_ID).float()
    map_loss = torch.sum(map_loss * map_mask.flatten().unsqueeze(-1))

    ctx = original_encode(model, masked_segment_sequence)[:, -1, :]
    pos = original_encode(model, pos_segment)[:, -1, :]
    neg = original_encode(model, neg_segment)[:, -1, :]

    def sp_score(c, g):
        return torch.sigmoid(torch.sum(model.sp_norm(c) * g, dim=-1))
    sdist = torch.sigmoid(sp_score(ctx, pos) - sp_score(ctx, neg))
    sp_loss = torch.sum(crit(sdist, torch.ones_like(sdist)))
    return aap_loss, mip_loss, map_loss, sp_loss


def original_finetune_loss(seq_out, pos_ids, neg_ids, item_embeddings):
    pos_emb, neg_emb = item_embeddings(pos_ids), item_embeddings(neg_ids)
    pos = pos_emb.view(-1, pos_emb.size(2))
    neg = neg_emb.view(-1, neg_emb.size(2))
    seq_emb = seq_out.view(-1, seq_out.size(2))
    pos_logits = torch.sum(pos * seq_emb, -1)
    neg_logits = torch.sum(neg * seq_emb, -1)
    istarget = (pos_ids > 0).view(-1).float()
    return torch.sum(-torch.log(torch.sigmoid(pos_logits) + 1e-24) * istarget
                     - torch.log(1 - torch.sigmoid(neg_logits) + 1e-24) * istarget
                     ) / torch.sum(istarget)


# ---------------------------------------------------------------- fixtures

def small_model(seed=0, **overrides):
    cfg = Config()
    cfg.model.max_seq_length = MAX_LEN
    cfg.model.hidden_size = 16
    cfg.model.inner_size = 32
    for k, v in overrides.items():
        setattr(cfg.model, k, v)
    torch.manual_seed(seed)
    model = build_model(cfg, ITEM_SIZE, ATTR_SIZE)
    # larger weights than the N(0, 0.02) init, so losses are not all at their starting value
    with torch.no_grad():
        model.attribute_embeddings.weight.mul_(60)
        model.item_embeddings.weight.mul_(60)
    return model.eval()


def make_batch(seed=0, B=5, L=7):
    """A batch in the sampler's format plus the dense, padded-to-MAX_LEN original inputs."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    lengths[0] = L
    col = torch.arange(L)
    valid = col[None, :] >= (L - lengths)[:, None]                         # left padding
    orig = torch.where(valid, torch.randint(1, NUM_ITEMS + 1, (B, L), generator=g), 0)
    masked = (torch.rand(B, L, generator=g) < 0.3) & valid
    masked[:, -1] = True
    masked_items = torch.where(masked, MASK_ID, orig)
    mip_neg = torch.where(masked, torch.randint(1, NUM_ITEMS + 1, (B, L), generator=g), 0)
    seg = torch.rand(B, L, generator=g) < 0.4
    sp_masked = torch.where(seg & valid, MASK_ID, orig)
    sp_pos = torch.where(~seg & valid, MASK_ID, orig)
    sp_neg = torch.where(seg & valid, torch.randint(1, NUM_ITEMS + 1, (B, L), generator=g),
                         sp_pos)
    item_attrs = {i: sorted(set(torch.randint(1, NUM_ATTRS + 1, (int(i) % 4,),
                                              generator=g).tolist()))
                  for i in range(ITEM_SIZE)}
    pairs = [(b * L + l, a) for b in range(B) for l in range(L)
             for a in item_attrs[int(orig[b, l])] if orig[b, l] > 0]
    attr_index = torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2)
    batch = PretrainBatch(masked_items=masked_items, positions=(MAX_LEN - L + col).expand(B, L),
                          original_items=orig, mip_neg=mip_neg, masked=masked,
                          sp_masked=sp_masked, sp_pos=sp_pos, sp_neg=sp_neg,
                          attr_index=attr_index)
    pad = lambda x: F.pad(x, (MAX_LEN - L, 0))                              # noqa: E731
    attributes = torch.zeros(B, MAX_LEN, ATTR_SIZE)
    for b in range(B):
        for l in range(L):
            for a in item_attrs[int(orig[b, l])] if orig[b, l] > 0 else []:
                attributes[b, MAX_LEN - L + l, a] = 1
    dense = dict(attributes=attributes, masked_item_sequence=pad(masked_items),
                 pos_items=pad(orig), neg_items=pad(mip_neg), masked_segment_sequence=pad(sp_masked),
                 pos_segment=pad(sp_pos), neg_segment=pad(sp_neg))
    return batch, dense


# ---------------------------------------------------------------- tests

def test_sparse_bce_equals_bceloss_on_sigmoid_including_saturation():
    torch.manual_seed(0)
    x = torch.randn(6, 40, dtype=torch.float32) * 3
    x[0, :20] = torch.linspace(-200, 200, 20)            # saturated both ways
    x[1, :8] = torch.tensor([-30., -60., -100., -150., 30., 60., 100., 150.])
    y = (torch.rand(6, 40) < 0.3).float()
    y[1, :8] = torch.tensor([1., 1., 1., 1., 0., 0., 0., 0.])    # the -100 clamp binds
    rows, cols = y.nonzero(as_tuple=True)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = nn.BCELoss(reduction="sum")(torch.sigmoid(x1), y)
    got = sigmoid_bce_sum(x2, rows, cols)
    ref.backward()
    got.backward()
    assert torch.allclose(got, ref, rtol=1e-6)
    assert torch.allclose(x2.grad, x1.grad, rtol=1e-5, atol=1e-12)
    assert got.item() > 400        # the clamped terms are in


def test_sparse_bce_gradcheck_double():
    torch.manual_seed(1)
    x = (torch.randn(4, 7, dtype=torch.float64) * 2).requires_grad_()
    rows, cols = torch.tensor([0, 1, 3, 3]), torch.tensor([2, 0, 1, 6])
    assert torch.autograd.gradcheck(lambda t: sigmoid_bce_sum(t, rows, cols), (x,))


@pytest.mark.parametrize("seed", [0, 1])
def test_pretrain_losses_equal_original_transcription(seed):
    model = small_model(seed)
    batch, dense = make_batch(seed)
    got = pretrain_losses(model, batch, ObjectiveWeights(), mask_id=MASK_ID)
    aap, mip, map_, sp = original_pretrain(model, **dense)
    for name, ref in (("aap", aap), ("mip", mip), ("map", map_), ("sp", sp)):
        assert torch.allclose(got[name], ref, rtol=1e-5, atol=1e-5), (name, got[name], ref)
    total = 0.2 * aap + mip + map_ + 0.5 * sp
    assert torch.allclose(got["total"], total, rtol=1e-5)
    assert aap.item() > 1.0 and map_.item() > 1.0


def test_pretrain_gradients_equal_original_transcription():
    model = small_model(3)
    batch, dense = make_batch(3)
    total = pretrain_losses(model, batch, ObjectiveWeights())["total"]
    g1 = torch.autograd.grad(total, list(model.parameters()), allow_unused=True)
    aap, mip, map_, sp = original_pretrain(model, **dense)
    g2 = torch.autograd.grad(0.2 * aap + mip + map_ + 0.5 * sp, list(model.parameters()),
                             allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), g1, g2):
        if a is None or b is None:
            assert a is None and b is None or (a if b is None else b).abs().max() == 0, name
            continue
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name


def test_zero_weight_skips_objective_and_sp_sequences():
    model = small_model(0)
    batch, dense = make_batch(0)
    calls = []
    orig = model.encode
    model.encode = lambda items, positions, causal: calls.append(items.shape) or \
        orig(items, positions, causal)
    out = pretrain_losses(model, batch, {"aap": 0.2, "mip": 1.0, "map": 0.0, "sp": 0.0})
    assert calls == [batch.masked_items.shape]                  # no SP rows stacked
    assert out["map"].item() == 0 and out["sp"].item() == 0
    aap, mip, _, _ = original_pretrain(model, **dense)
    assert torch.allclose(out["total"], 0.2 * aap + mip, rtol=1e-5)
    calls.clear()
    out = pretrain_losses(model, batch, {"aap": 0, "mip": 0, "map": 0, "sp": 0.5})
    assert calls == [torch.Size([3 * batch.masked_items.shape[0], batch.masked_items.shape[1]])]


def test_mean_reduction_divides_by_positions_that_count():
    model = small_model(0)
    batch, _ = make_batch(0)
    s = pretrain_losses(model, batch, ObjectiveWeights(), reduction="sum")
    m = pretrain_losses(model, batch, ObjectiveWeights(), reduction="mean")
    n_masked = int(batch.masked.sum())
    n_aap = int(((batch.original_items != 0) & ~batch.masked).sum())
    assert torch.allclose(m["mip"], s["mip"] / n_masked)
    assert torch.allclose(m["map"], s["map"] / n_masked)
    assert torch.allclose(m["aap"], s["aap"] / n_aap)
    assert torch.allclose(m["sp"], s["sp"] / batch.masked_items.shape[0])


def test_host_index_gives_the_same_losses_and_gradients_and_survives_the_copy():
    """The engine computes batch.index on the host (so a GPU step has no device reads); with it,
    after the batch's own copy (`to`), losses and gradients are bit-identical to the in-step
    computation."""
    import dataclasses
    from s3rec.objectives import pretrain_index
    model = small_model(2)
    batch, _ = make_batch(2)
    ref = pretrain_losses(model, batch, ObjectiveWeights())
    g_ref = torch.autograd.grad(ref["total"], list(model.parameters()), allow_unused=True)
    indexed = dataclasses.replace(batch, index=pretrain_index(batch)).to("cpu")
    assert indexed.index is not None and indexed.index.max_attribute == int(batch.attr_index[:, 1].max())
    assert indexed.index.masked.tolist() == batch.masked.reshape(-1).nonzero().squeeze(1).tolist()
    got = pretrain_losses(model, indexed, ObjectiveWeights())
    g_got = torch.autograd.grad(got["total"], list(model.parameters()), allow_unused=True)
    for name in ("aap", "mip", "map", "sp", "total"):
        assert torch.equal(got[name], ref[name]), name
    for a, b in zip(g_got, g_ref):
        assert (a is None and b is None) or torch.equal(a, b)


def test_attribute_beyond_the_model_is_an_error_with_a_host_index():
    import dataclasses
    from s3rec.objectives import pretrain_index
    model = small_model(0)
    batch, _ = make_batch(0)
    batch.attr_index = torch.cat([batch.attr_index, torch.tensor([[0, ATTR_SIZE]])])
    with pytest.raises(ValueError, match=f"attribute {ATTR_SIZE} but the model has"):
        pretrain_losses(model, dataclasses.replace(batch, index=pretrain_index(batch)),
                        ObjectiveWeights())


def test_duplicate_attribute_pairs_count_once():
    model = small_model(0)
    batch, _ = make_batch(0)
    ref = pretrain_losses(model, batch, ObjectiveWeights())
    batch.attr_index = torch.cat([batch.attr_index, batch.attr_index[:5]])
    dup = pretrain_losses(model, batch, ObjectiveWeights())
    assert torch.allclose(dup["aap"], ref["aap"]) and torch.allclose(dup["map"], ref["map"])


def test_pair_form_logits_is_bce_with_logits():
    a, b = torch.randn(50) * 5, torch.randn(50) * 5
    got = pair_loss(a, b, "logits")
    ref = F.binary_cross_entropy_with_logits(a, torch.ones(50), reduction="none") + \
        F.binary_cross_entropy_with_logits(b, torch.zeros(50), reduction="none")
    assert torch.allclose(got, ref, atol=1e-6)
    orig = pair_loss(a, b, "original")
    assert torch.allclose(orig, nn.BCELoss(reduction="none")(
        torch.sigmoid(torch.sigmoid(a) - torch.sigmoid(b)), torch.ones(50)), atol=1e-6)


def test_finetune_loss_equals_original_including_saturation():
    model = small_model(0)
    g = torch.Generator().manual_seed(5)
    B, L = 4, 6
    lengths = torch.tensor([6, 3, 1, 5])
    valid = torch.arange(L)[None] >= (L - lengths)[:, None]
    inp = torch.where(valid, torch.randint(1, NUM_ITEMS + 1, (B, L), generator=g), 0)
    tgt = torch.where(valid, torch.randint(1, NUM_ITEMS + 1, (B, L), generator=g), 0)
    neg = torch.where(valid, torch.randint(1, NUM_ITEMS + 1, (B, L), generator=g), 0)
    pos = (MAX_LEN - L + torch.arange(L)).expand(B, L)
    got = finetune_batch_loss(model, inp, pos, tgt, neg)
    pad = lambda x: F.pad(x, (MAX_LEN - L, 0))                          # noqa: E731
    seq_out = original_encode(model, pad(inp), pretrain=False)
    ref = original_finetune_loss(seq_out, pad(tgt), pad(neg), model.item_embeddings)
    assert torch.allclose(got, ref, rtol=1e-5)
    # saturated scores: the 1e-24 caps each term at -log(1e-24) = 55.26
    h = torch.tensor([[1.0]])
    big = finetune_loss(h, torch.tensor([[-200.0]]), torch.tensor([[200.0]]))
    assert abs(big.item() - 2 * 24 * math.log(10)) < 1e-3
    assert abs(finetune_loss(h, torch.tensor([[-200.0]]), torch.tensor([[200.0]]), "logits").item()
               - 400.0) < 1e-3


def test_finetune_chunked_loss_equals_the_whole_batch():
    """Length chunks trim padding per group of rows; in eval mode the loss equals the padded
    batch's exactly (rows do not interact, positions are absolute)."""
    from s3rec.config import Config
    from s3rec.model import build_model
    from s3rec.objectives import finetune_batch_loss, finetune_batch_loss_chunked
    torch.manual_seed(0)
    cfg = Config()
    model = build_model(cfg, 40, 9).eval()
    B, L = 13, 50
    lengths = torch.randint(1, L + 1, (B,))
    items = torch.zeros(B, L, dtype=torch.long)
    target = torch.zeros(B, L, dtype=torch.long)
    neg = torch.zeros(B, L, dtype=torch.long)
    for r, n in enumerate(lengths.tolist()):
        items[r, L - n:] = torch.randint(1, 39, (n,))
        target[r, L - n:] = torch.randint(1, 39, (n,))
        neg[r, L - n:] = torch.randint(1, 39, (n,))
    positions = torch.arange(L).expand(B, L)
    whole = finetune_batch_loss(model, items, positions, target, neg)
    for chunks in (2, 4, 13, 20):
        part = finetune_batch_loss_chunked(model, items, positions, target, neg, chunks)
        torch.testing.assert_close(part, whole, rtol=1e-5, atol=1e-6)


def test_finetune_plan_cut_on_the_host_gives_the_same_loss_and_gradients():
    """The engine cuts the length groups on the host (FinetunePlan) and sends them with the batch
    (one packed copy); the loss and gradients are bit-identical to cutting them in the step."""
    import dataclasses
    from s3rec.config import Config
    from s3rec.data.finetune_samples import FinetuneBatch
    from s3rec.model import build_model
    from s3rec.objectives import finetune_batch_loss_chunked, finetune_plan
    torch.manual_seed(1)
    model = build_model(Config(), 40, 9).eval()
    B, L = 11, 20
    lengths = torch.randint(0, L + 1, (B,))
    items, target, neg = (torch.zeros(B, L, dtype=torch.long) for _ in range(3))
    for r, n in enumerate(lengths.tolist()):
        items[r, L - n:], target[r, L - n:], neg[r, L - n:] = (torch.randint(1, 39, (n,))
                                                               for _ in range(3))
    batch = FinetuneBatch(users=torch.arange(B), items=items, positions=torch.arange(L).expand(B, L),
                          target_pos=target, target_neg=neg)
    params = list(model.parameters())
    for chunks in (1, 4, 20):
        ref = finetune_batch_loss_chunked(model, items, batch.positions, target, neg, chunks)
        g_ref = torch.autograd.grad(ref, params, allow_unused=True)
        planned = dataclasses.replace(batch, plan=finetune_plan(items, target, chunks)).to("cpu")
        assert planned.plan.total == int((target > 0).sum())
        got = finetune_batch_loss_chunked(model, planned.items, planned.positions,
                                          planned.target_pos, planned.target_neg, chunks,
                                          plan=planned.plan)
        g_got = torch.autograd.grad(got, params, allow_unused=True)
        assert torch.equal(got, ref), chunks
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(g_got, g_ref))


def test_losses_of_a_bf16_model_are_computed_in_float32():
    """In bf16, sigmoid(8) rounds to exactly 1: BCELoss's clamped log and its p (1 - p) gradient
    would give a confidently wrong attribute no gradient at all (float32 saturates from ~17).
    The losses take bf16 logits to float32 first: the gradient is sigmoid(8), as in float32."""
    from s3rec.objectives import pair_loss, sigmoid_bce_sum
    from s3rec.static_objectives import dense_sigmoid_bce
    x = torch.tensor([[8.0, -3.0]], dtype=torch.bfloat16, requires_grad=True)
    rows, cols = torch.tensor([0]), torch.tensor([1])          # attribute 1 a target, 0 not
    loss = sigmoid_bce_sum(x, rows, cols)
    assert loss.dtype == torch.float32
    loss.backward()
    want = torch.tensor([[torch.sigmoid(torch.tensor(8.0)), torch.sigmoid(torch.tensor(-3.0)) - 1]])
    torch.testing.assert_close(x.grad.float(), want, rtol=1e-2, atol=0)
    assert float(loss.detach()) == pytest.approx(8.000335 + 3.048587, rel=1e-3)
    y = x.detach().clone().requires_grad_()
    dense = dense_sigmoid_bce(y, torch.tensor([[False, True]]), torch.ones(1, dtype=torch.bfloat16))
    dense.backward()
    assert dense.dtype == torch.float32 and float(dense.detach()) == pytest.approx(float(loss.detach()), rel=1e-6)
    torch.testing.assert_close(y.grad, x.grad)
    assert pair_loss(x[:, 0], x[:, 1], "original").dtype == torch.float32
