"""The fine-tuning losses of finetune.loss (bce | ce | sampled_softmax | gbce).

Each equals a plain transcription of its formula (loops over rows, float64, values and
gradients); ce computed in chunks equals ce at once and keeps one chunk's logits at a time; the
sampler's extra negatives follow their rules (popularity over the training part only, shared by
the whole batch, the same at any world size); a tiny fine-tune runs end to end with each loss,
and world size 2 follows world size 1."""
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from s3rec.config import Config, ConfigError, load_config
from s3rec.data.finetune_samples import FinetuneSampler
from s3rec.engine.loop import split_rows
from s3rec.model import build_model
from s3rec.objectives import (FinetuneObjective, ce_loss, finetune_batch_loss,
                              finetune_batch_loss_chunked, finetune_loss, gbce_beta, gbce_loss,
                              sampled_softmax_loss)
from tests.train_helpers import (REPO, clean_env, command, read_json, run, scalars,  # noqa: F401
                                 shm_clean, tiny_data, train_args)

D = 8


def _grads(loss: torch.Tensor, *xs: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, xs, retain_graph=True))


def _leaf(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, dtype=torch.float64) * scale).requires_grad_()


def _assert_same(got: torch.Tensor, want: torch.Tensor, xs: tuple) -> None:
    torch.testing.assert_close(got, want)
    for a, b in zip(_grads(got, *xs), _grads(want, *xs)):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- ce

def ce_transcribed(h: torch.Tensor, table: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """mean over rows n of log(sum_j exp(h_n . e_j)) - h_n . e_pos(n), items j = 1..I."""
    terms = []
    for n in range(len(h)):
        scores = [h[n] @ table[j] for j in range(len(table))]
        terms.append(torch.log(sum(torch.exp(s) for s in scores)) - scores[int(pos[n]) - 1])
    return sum(terms) / len(terms)


def test_ce_equals_its_transcription_and_chunks_change_nothing():
    torch.manual_seed(0)
    h, table = _leaf(7, D), _leaf(9, D)
    pos = torch.randint(1, 10, (7,))
    want = ce_transcribed(h, table, pos)
    for rows in (100, 7, 3, 1):                 # one chunk, exactly one, several, one row each
        _assert_same(ce_loss(h, table, pos, rows), want, (h, table))


def test_ce_of_a_batch_scores_the_real_items_only():
    """Row 0 (padding) and the last row (mask_id) of the embedding table are no candidates:
    making them huge changes nothing."""
    torch.manual_seed(1)
    model = build_model(Config(), 12, 5).double().eval()
    with torch.no_grad():
        model.item_embeddings.weight[[0, -1]] = 50.0
    items = torch.tensor([[0, 0, 3, 4], [1, 2, 3, 4]])
    target = torch.tensor([[0, 0, 4, 10], [2, 3, 4, 9]])
    positions = torch.arange(4).expand(2, 4)
    got = finetune_batch_loss(model, items, positions, target, torch.zeros_like(target),
                              objective=FinetuneObjective("ce", chunk_rows=2))
    hidden = model.encode(items, positions, causal=True)[target > 0]       # [6, d]
    want = ce_transcribed(hidden, model.item_embeddings.weight[1:11], target[target > 0])
    torch.testing.assert_close(got, want)


def _saved_bytes(fn) -> tuple[torch.Tensor, int, int]:
    """(fn(), total and largest bytes of the memory autograd keeps for the backward of fn()):
    each storage counted once (a checkpoint keeps its inputs, views of the same tensors)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values()), max(storages.values(), default=0)


def test_ce_in_chunks_keeps_no_catalogue_wide_logits_for_the_backward():
    """N = 2000 positions against 5000 items: all logits at once would keep 40 MB for the
    backward; chunks of 100 keep none (each chunk's 2 MB are recomputed in the backward), and
    the gradients are the same."""
    torch.manual_seed(2)
    h = torch.randn(2000, 16, requires_grad=True)
    table = torch.randn(5000, 16, requires_grad=True)
    pos = torch.randint(1, 5001, (2000,))
    whole, whole_total, whole_max = _saved_bytes(lambda: ce_loss(h, table, pos, 2000))
    part, part_total, part_max = _saved_bytes(lambda: ce_loss(h, table, pos, 100))
    one_chunk = 100 * 5000 * 4
    assert whole_max >= 2000 * 5000 * 4
    assert part_total < one_chunk and part_max < one_chunk
    torch.testing.assert_close(part, whole)
    for a, b in zip(_grads(part, h, table), _grads(whole, h, table)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- sampled softmax

def sampled_softmax_transcribed(h, pos_emb, neg_emb, pos, neg, log_kq) -> torch.Tensor:
    """Row n: -log softmax of its positive among itself and the negatives j != pos(n), each logit
    h . e - log(K Q)."""
    terms = []
    for n in range(len(h)):
        s_pos = h[n] @ pos_emb[n] - log_kq[int(pos[n])]
        logits = [s_pos] + [h[n] @ neg_emb[j] - log_kq[int(neg[j])] for j in range(len(neg))
                            if int(neg[j]) != int(pos[n])]
        terms.append(torch.log(sum(torch.exp(s) for s in logits)) - s_pos)
    return sum(terms) / len(terms)


def test_sampled_softmax_equals_its_transcription_with_accidental_hits():
    torch.manual_seed(3)
    num_items, K, N = 9, 6, 7
    table = _leaf(num_items + 1, D)
    h = _leaf(N, D)
    pos = torch.randint(1, num_items + 1, (N,))
    neg = torch.cat([pos[:2], torch.randint(1, num_items + 1, (K - 2,))])   # two sure hits
    log_kq = torch.log(torch.rand(num_items + 1, dtype=torch.float64) * K)
    got = sampled_softmax_loss(h, table[pos], table[neg], pos, neg, log_kq[pos], log_kq[neg])
    want = sampled_softmax_transcribed(h, table[pos], table[neg], pos, neg, log_kq)
    _assert_same(got, want, (h, table))


def test_sampled_softmax_with_uniform_q_is_the_plain_sampled_softmax():
    """Q uniform: every logit shifts by the same log(K / I), which a softmax ignores."""
    torch.manual_seed(4)
    num_items, K, N = 20, 5, 6
    h, table = _leaf(N, D), _leaf(num_items + 1, D)
    pos = torch.randint(1, num_items + 1, (N,))
    neg = torch.randint(1, num_items + 1, (K,))
    neg = neg[(neg[:, None] != pos[None, :]).all(1)]                  # no accidental hit here
    c = torch.full((num_items + 1,), math.log(K / num_items), dtype=torch.float64)
    got = sampled_softmax_loss(h, table[pos], table[neg], pos, neg, c[pos], c[neg])
    logits = torch.cat([(h * table[pos]).sum(1, keepdim=True), h @ table[neg].T], 1)
    want = F.cross_entropy(logits, torch.zeros(N, dtype=torch.int64))
    _assert_same(got, want, (h, table))


# ---------------------------------------------------------------- gbce

def gbce_transcribed(h, pos_emb, neg_emb, beta) -> torch.Tensor:
    """Row n: -(beta log sigmoid(s+) + sum_j log(1 - sigmoid(s_j))) / (1 + k)."""
    terms = []
    for n in range(len(h)):
        sig = lambda x: 1 / (1 + torch.exp(-x))
        t = beta * torch.log(sig(h[n] @ pos_emb[n]))
        for j in range(neg_emb.shape[1]):
            t = t + torch.log(1 - sig(h[n] @ neg_emb[n, j]))
        terms.append(-t / (1 + neg_emb.shape[1]))
    return sum(terms) / len(terms)


def gbce_as_gsasrec_writes_it(h, pos_emb, neg_emb, beta) -> torch.Tensor:
    """gSASRec-pytorch's train_gsasrec.py: the positive logit replaced by log(1 / (p^-beta - 1))
    (p = sigmoid(s+), clamps of 1e-10), then BCE-with-logits averaged over the 1 + k terms."""
    eps = 1e-10
    pos = (h * pos_emb).sum(-1, keepdim=True)
    neg = torch.einsum("nd,nkd->nk", h, neg_emb)
    p = torch.clamp(torch.sigmoid(pos), eps, 1 - eps)
    adjusted = torch.clamp(p.pow(-beta), 1 + eps, torch.finfo(torch.float64).max)
    to_log = torch.clamp(1.0 / (adjusted - 1), eps, torch.finfo(torch.float64).max)
    logits = torch.cat([to_log.log(), neg], -1)
    gt = torch.zeros_like(logits)
    gt[:, 0] = 1
    return F.binary_cross_entropy_with_logits(logits, gt, reduction="none").mean(-1).mean()


def test_gbce_equals_its_transcription_and_gsasrecs_code():
    torch.manual_seed(5)
    N, k = 6, 4
    h, pos_emb, neg_emb = _leaf(N, D), _leaf(N, D), _leaf(N, k, D)
    beta = gbce_beta(k, 50, 0.75)
    got = gbce_loss(h, pos_emb, neg_emb, beta)
    _assert_same(got, gbce_transcribed(h, pos_emb, neg_emb, beta), (h, pos_emb, neg_emb))
    _assert_same(got, gbce_as_gsasrec_writes_it(h, pos_emb, neg_emb, beta), (h, pos_emb, neg_emb))


def test_gbce_beta_at_t_0_is_plain_bce_and_at_t_1_is_alpha():
    alpha = 8 / 99
    assert gbce_beta(8, 100, 0.0) == pytest.approx(1.0)
    assert gbce_beta(8, 100, 1.0) == pytest.approx(alpha)
    assert gbce_beta(8, 100, 0.5) == pytest.approx(alpha * (0.5 * (1 - 1 / alpha) + 1 / alpha))
    torch.manual_seed(6)
    h, pos_emb, neg_emb = _leaf(5, D), _leaf(5, D), _leaf(5, 8, D)
    plain = (F.softplus(-(h * pos_emb).sum(-1))
             + F.softplus(torch.einsum("nd,nkd->nk", h, neg_emb)).sum(-1)).mean() / 9
    _assert_same(gbce_loss(h, pos_emb, neg_emb, gbce_beta(8, 100, 0.0)), plain,
                 (h, pos_emb, neg_emb))
    with pytest.raises(ValueError, match="at least 2 items"):
        gbce_beta(1, 1, 0.5)


def test_gbce_survives_scores_whose_sigmoid_saturates():
    """softplus forms: a score of +-60 (sigmoid exactly 1 in float32) gives finite values and
    gradients where log(sigmoid) and log(1 - sigmoid) would give inf."""
    h = torch.tensor([[60.0, 0.0]], requires_grad=True)
    e = torch.tensor([[1.0, 0.0]])
    loss = gbce_loss(h, -e, e[:, None, :], beta=0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(h.grad).all()
    assert float(loss.detach()) == pytest.approx((0.5 * 60 + 60) / 2, rel=1e-6)


# ---------------------------------------------------------------- batches of a model

def _batch(B: int = 9, L: int = 7, num_items: int = 30, k: int = 3, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    items, target, neg = (torch.zeros(B, L, dtype=torch.long) for _ in range(3))
    for r, n in enumerate(torch.randint(1, L + 1, (B,), generator=g).tolist()):
        items[r, L - n:], target[r, L - n:], neg[r, L - n:] = (
            torch.randint(1, num_items + 1, (n,), generator=g) for _ in range(3))
    per_pos = torch.randint(1, num_items + 1, (B, L, k), generator=g) * (target > 0)[..., None]
    return items, torch.arange(L).expand(B, L), target, neg, per_pos


def test_bce_is_the_original_loss_bit_for_bit():
    torch.manual_seed(8)
    model = build_model(Config(), 32, 5).eval()
    items, positions, target, neg, _ = _batch()
    ref = finetune_batch_loss(model, items, positions, target, neg)
    for obj in (None, FinetuneObjective("bce")):
        assert torch.equal(finetune_batch_loss(model, items, positions, target, neg,
                                               objective=obj), ref)
    flat = model.encode(items, positions, causal=True)[target > 0]
    emb = model.item_embeddings
    assert torch.equal(ref, finetune_loss(flat, emb(target[target > 0]), emb(neg[target > 0])))


@pytest.mark.parametrize("kind", ["ce", "sampled_softmax", "gbce"])
def test_length_groups_carry_each_loss_and_its_negatives(kind):
    """finetune_batch_loss_chunked: the per-position negatives follow their rows into the length
    groups, the shared ones go whole to each: the same loss as the whole batch at once."""
    torch.manual_seed(9)
    model = build_model(Config(), 32, 5).double().eval()
    items, positions, target, neg, per_pos = _batch()
    log_kq = torch.log(torch.rand(31, dtype=torch.float64) * 4)
    obj = FinetuneObjective(kind, chunk_rows=5, log_kq=log_kq, beta=0.3)
    neg_ids = per_pos if kind == "gbce" else neg
    shared = torch.tensor([3, 3, 17, 30])
    whole = finetune_batch_loss(model, items, positions, target, neg_ids, objective=obj,
                                shared=shared)
    for chunks in (2, 4, 9):
        part = finetune_batch_loss_chunked(model, items, positions, target, neg_ids, chunks,
                                           objective=obj, shared=shared)
        torch.testing.assert_close(part, whole)


def test_gbce_given_one_negative_per_position_says_so():
    model = build_model(Config(), 32, 5).eval()
    items, positions, target, neg, _ = _batch()
    with pytest.raises(ValueError, match=r"gbce needs \[N, k\] negatives"):
        finetune_batch_loss(model, items, positions, target, neg,
                            objective=FinetuneObjective("gbce"))


def test_sampled_softmax_without_its_negatives_says_so():
    model = build_model(Config(), 32, 5).eval()
    items, positions, target, neg, _ = _batch()
    with pytest.raises(ValueError, match="sampled_softmax needs"):
        finetune_batch_loss(model, items, positions, target, neg,
                            objective=FinetuneObjective("sampled_softmax"))


# ---------------------------------------------------------------- the sampler's negatives

def _csr(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    items = np.concatenate([np.asarray(s, dtype=np.int32) for s in seqs])
    return items, np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)


# items 1..3 occur in training parts, 4 and 5 only as valid/test answers, 6 never
SEQS = [[1, 1, 2, 3, 1, 4, 5], [2, 1, 3, 2, 1, 5, 4], [3, 1, 2, 1, 4, 5]]
COUNTS = {1: 7, 2: 4, 3: 3}


def test_sampled_softmax_negatives_follow_training_popularity_only():
    items, offsets = _csr(SEQS)
    s = FinetuneSampler(items, offsets, 6, 10, "sampled_softmax", 64)
    draws = np.concatenate([b.shared_negatives.items.numpy() for e in range(40)
                            for b in s.batches(0, e, 2)])
    assert set(np.unique(draws)) <= set(COUNTS)                     # never 4, 5 or 6
    freq = np.bincount(draws, minlength=7)[1:4] / len(draws)
    np.testing.assert_allclose(freq, np.array([7, 4, 3]) / 14, atol=0.02)
    q = np.exp(s.log_sampling_q()) / 64
    np.testing.assert_allclose(q, [0, 7 / 14, 4 / 14, 3 / 14, 0, 0, 0])
    b = next(s.batches(0, 0, 2))
    assert b.loss_negatives is None and b.shared_negatives.items.shape == (64,)


def test_gbce_negatives_are_per_real_position_uniform_and_zero_at_padding():
    items, offsets = _csr(SEQS)
    s = FinetuneSampler(items, offsets, 6, 10, "gbce", 50)
    for b in s.batches(3, 0, 3):
        assert b.loss_negatives.shape == (*b.items.shape, 50) and b.shared_negatives is None
        real = b.target_pos > 0
        assert (b.loss_negatives[~real] == 0).all()
        assert ((b.loss_negatives[real] >= 1) & (b.loss_negatives[real] <= 6)).all()
        assert set(b.loss_negatives[real].unique().tolist()) == set(range(1, 7))


@pytest.mark.parametrize("loss", ["sampled_softmax", "gbce"])
def test_loss_negatives_are_the_same_at_any_world_size(loss):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 40, rng.integers(4, 15)).tolist() for _ in range(23)]
    items, offsets = _csr(seqs)
    s = FinetuneSampler(items, offsets, 40, 10, loss, 5)
    one = list(s.batches(11, 2, 8))
    two = [list(s.batches(11, 2, 8, rank, 2)) for rank in (0, 1)]
    for whole, a, b in zip(one, *two):
        if loss == "gbce":
            assert torch.equal(torch.cat([a.loss_negatives, b.loss_negatives]),
                               whole.loss_negatives)
        else:
            assert torch.equal(a.shared_negatives.items, whole.shared_negatives.items)
            assert torch.equal(b.shared_negatives.items, whole.shared_negatives.items)


def test_micro_batches_keep_the_shared_negatives_whole_when_k_equals_the_rows():
    """split_rows cuts every tensor whose first dimension is the row count: K shared negatives,
    K = rows, must not be cut with them."""
    items, offsets = _csr(SEQS)
    b = next(FinetuneSampler(items, offsets, 6, 10, "sampled_softmax", 3).batches(0, 0, 3))
    assert b.items.shape[0] == 3
    for part in split_rows(b, 3):
        assert torch.equal(part.shared_negatives.items, b.shared_negatives.items)


def test_sampler_refuses_an_unknown_loss_and_no_negatives():
    items, offsets = _csr(SEQS)
    with pytest.raises(ValueError, match="loss must be one of bce|ce|sampled_softmax|gbce"):
        FinetuneSampler(items, offsets, 6, 10, "softmax")
    with pytest.raises(ValueError, match="loss_negatives must be >= 1, got 0"):
        FinetuneSampler(items, offsets, 6, 10, "gbce", 0)
    short, off = _csr([[1, 2], [2, 1]])
    with pytest.raises(ValueError, match="no item occurs in the training part"):
        FinetuneSampler(short, off, 2, 10, "sampled_softmax")


@pytest.mark.parametrize("override,message", [
    ("finetune.loss=softmax", "config key 'finetune.loss': expected bce|ce|sampled_softmax|gbce"),
    ("finetune.loss_negatives=0", "config key 'finetune.loss_negatives': must be >= 1, got 0"),
    ("finetune.loss_chunk_rows=0", "config key 'finetune.loss_chunk_rows': must be >= 1"),
    ("finetune.gbce_t=1.5", "config key 'finetune.gbce_t': expected 0..1, got 1.5"),
    ("finetune.gbce_t=-0.1", "config key 'finetune.gbce_t': expected 0..1, got -0.1")])
def test_bad_loss_settings_name_their_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("|", r"\|")):
        load_config(None, [override])


# ---------------------------------------------------------------- real fine-tunes

FT = ("variant=finetune-only", "finetune.epochs=2", "finetune.batch_size=32",
      "finetune.loss_negatives=16", "finetune.loss_chunk_rows=64")
NO_DROPOUT = ("model.hidden_dropout=0", "model.attention_dropout=0", "logging.every_steps=1")


@pytest.mark.multiproc
@pytest.mark.parametrize("loss", ["bce", "ce", "sampled_softmax", "gbce"])
def test_a_tiny_finetune_runs_with_each_loss(loss, tiny_data, tmp_path):
    """ce with chunks of 64 positions: the checkpointed chunks run inside the DeepSpeed engine."""
    out = tmp_path / "ft"
    run(command("single", "s3rec.finetune",
                train_args(tiny_data, out, *FT, f"finetune.loss={loss}")))
    info, results = read_json(out / "run.json"), read_json(out / "results.json")
    assert info["status"] == "done" and info["config"]["finetune"]["loss"] == loss
    assert 0 <= results["test"]["MRR"] <= 1
    epochs = [v for _, v in scalars(out)["epoch/loss_finetune"]]
    assert len(epochs) == 2 and all(math.isfinite(v) for v in epochs)
    assert epochs[1] < epochs[0]                                    # it learns


def _close(a, b, rel=1e-5):
    assert [s for s, _ in a] == [s for s, _ in b]
    for (step, x), (_, y) in zip(a, b):
        assert y == pytest.approx(x, rel=rel), f"step {step}: {x} vs {y}"


@pytest.fixture(scope="module")
def world1(tiny_data, tmp_path_factory):
    """The world size 1 run of a loss, made once for the module."""
    runs: dict = {}

    def get(loss: str):
        if loss not in runs:
            runs[loss] = tmp_path_factory.mktemp(f"w1-{loss}") / "ft"
            args = (*FT, *NO_DROPOUT, f"finetune.loss={loss}")
            run(command("single", "s3rec.finetune", train_args(tiny_data, runs[loss], *args)))
        return runs[loss]
    return get


@pytest.mark.multiproc
@pytest.mark.parametrize("loss,zero,accum", [("sampled_softmax", 0, 1), ("sampled_softmax", 1, 2),
                                             ("gbce", 0, 1), ("gbce", 2, 2), ("ce", 0, 2)])
def test_world2_matches_world1_with_each_sampled_loss(loss, zero, accum, world1, tiny_data,
                                                      tmp_path, shm_clean):
    """As tests/test_distributed_equivalence.py for bce: the same per-step losses and metrics
    (dropout off). K = 16 shared negatives: a rank's micro-batch of 8 rows (accum 2) or 16 keeps
    them whole."""
    one, two = world1(loss), tmp_path / "w2"
    run(command("torchrun", "s3rec.finetune", train_args(
        tiny_data, two, *FT, *NO_DROPOUT, f"finetune.loss={loss}", f"deepspeed.zero_stage={zero}",
        f"deepspeed.grad_accum={accum}")))
    a, b = scalars(one), scalars(two)
    assert len(a["loss/finetune"]) == 14                          # 7 steps x 2 epochs
    _close(a["loss/finetune"], b["loss/finetune"])
    r1, r2 = read_json(one / "results.json"), read_json(two / "results.json")
    for split in ("valid", "test"):
        assert r2[split] == pytest.approx(r1[split], rel=1e-9, abs=1e-9)


@pytest.mark.multiproc
def test_the_losses_benchmark_times_each_loss(tiny_data, tmp_path):
    out = tmp_path / "bench.json"
    run([sys.executable, "benchmarks/finetune_losses.py", "--data", str(tiny_data), "--json",
         str(out), "--config", str(REPO / "configs" / "tiny.yaml"), "--losses", "bce,ce"])
    figures = read_json(out)
    assert set(figures["epoch_s"]) == {"bce", "ce"} and figures["ratio_to_bce"]["bce"] == 1.0
    assert all(v > 0 for v in figures["epoch_s"].values()) and figures["num_items"] == 150
    from s3rec.data.reader import Dataset
    offsets = Dataset(tiny_data).load_sequences()[1]         # input seq[:-3], the last 20
    assert figures["positions"] == int(np.clip(np.diff(offsets) - 3, 0, 20).sum())


def test_the_losses_benchmark_names_a_bad_loss(tmp_path):
    p = subprocess.run([sys.executable, "benchmarks/finetune_losses.py", "--data", str(tmp_path),
                        "--json", str(tmp_path / "x.json"), "--losses", "bce,softmax"],
                       capture_output=True, text=True, cwd=REPO, env=clean_env(), timeout=60)
    assert p.returncode == 1
    assert p.stderr.strip() == "--losses: 'softmax' is not one of bce,ce,sampled_softmax,gbce"
