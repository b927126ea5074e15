"""s3rec-evaluate: popularity negatives (reproducible, never in the user's sequence, drawn by
popularity), the fine-tune's own numbers given back from its run folder, world size 2 equal to
world size 1 for every protocol, top-K lists, and the protocols added to results.json."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from s3rec import metrics
from s3rec.data.format import DatasetError
from s3rec.data.popular_negatives import popular_negatives, training_counts
from s3rec.data.reader import Dataset
from tests.train_helpers import (command, read_json, run, scalars, shm_clean,  # noqa: F401
                                 tiny_data, train_args)

# 8 users over 30 items; item 1 is in every training part, items 21..30 in none
SEQS = [[1, 2, 3, 4, 25], [1, 5, 6, 7, 8, 26], [1, 2, 9, 27, 28], [1, 10, 11, 12, 13, 29],
        [1, 3, 5, 14, 30, 21], [1, 15, 16, 22, 23], [1, 17, 18, 19, 24, 25], [1, 2, 20, 26, 27]]


def _csr(seqs):
    items = np.concatenate([np.asarray(s, dtype=np.int32) for s in seqs])
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)
    return items, offsets


def test_training_counts_leave_out_the_validation_and_test_answers():
    items, offsets = _csr(SEQS)
    counts = training_counts(items, offsets, 30)
    expected = np.zeros(31, dtype=np.int64)
    for s in SEQS:
        for i in s[:-2]:
            expected[i] += 1
    assert counts.tolist() == expected.tolist()
    assert counts[21:].sum() == 0 and counts[1] == 8


def test_popular_negatives_are_reproducible_distinct_and_outside_the_sequence():
    items, offsets = _csr(SEQS)
    a = popular_negatives(items, offsets, 30, 5, seed=3)
    assert np.array_equal(a, popular_negatives(items, offsets, 30, 5, seed=3))
    assert not np.array_equal(a, popular_negatives(items, offsets, 30, 5, seed=4))
    counts = training_counts(items, offsets, 30)
    for u, s in enumerate(SEQS):
        assert len(set(a[u])) == 5
        assert not set(a[u]) & set(s)                  # never history, never an answer
        assert all(counts[i] > 0 for i in a[u])        # only items seen in training
    with pytest.raises(DatasetError, match="user index 0: only .* outside its sequence"):
        popular_negatives(items, offsets, 30, 16, seed=0)


def test_popular_negatives_follow_popularity():
    # one user with nothing to exclude but its own items; item 2 is 9x as popular as 3..11
    seqs = [[2] * 9 + list(range(3, 12)) + [40, 41]] + [[12, 13, 14]] * 1
    items, offsets = _csr(seqs)
    draws = np.concatenate([popular_negatives(items, offsets, 50, 1, seed=s)[1] for s in
                            range(400)])
    # user 1 may draw 2..11 (its own 12, 13, 14 excluded); item 2 has weight 9 of 18
    share = float((draws == 2).mean())
    assert 0.42 < share < 0.58, share
    assert set(np.unique(draws)) <= set(range(2, 12))


@pytest.fixture(scope="module")
def finetuned(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "ft"
    run(command("single", "s3rec.finetune", train_args(
        tiny_data, out, "variant=finetune-only", "finetune.epochs=2")))
    return out


def _evaluate(launcher, data, model, *extra, expect=0):
    return run(command(launcher, "s3rec.evaluate",
                       ["--data", str(data), "--model", str(model), *extra]), expect=expect)


@pytest.mark.multiproc
def test_evaluate_gives_back_the_finetunes_own_numbers(finetuned, tiny_data):
    res = read_json(finetuned / "results.json")
    assert (finetuned / "best.pt").is_file()
    _evaluate("single", tiny_data, finetuned, "--protocol", "sampled")
    rec = read_json(finetuned / "evaluation" / "sampled-99-test.json")
    assert rec["metrics"] == pytest.approx(res["test"], abs=1e-12)
    ranks = np.load(finetuned / "evaluation" / "sampled-99-test-ranks.npy", allow_pickle=False)
    assert np.array_equal(ranks, np.load(finetuned / "test_ranks.npy"))
    after = read_json(finetuned / "results.json")
    assert after["protocols"]["sampled-99"]["test"] == rec["metrics"]
    assert {k: after[k] for k in res} == res           # today's shape kept for its own protocol
    # another protocol: added to results.json and, for the HParams tab, as scalars of the run
    _evaluate("single", tiny_data, finetuned, "--protocol", "popular")
    pop = read_json(finetuned / "evaluation" / "popular-99-test.json")["metrics"]
    assert read_json(finetuned / "results.json")["protocols"]["popular-99"]["test"] == pop
    tags = scalars(finetuned)
    assert tags["test-popular-99/NDCG@10"] == [(res["best_epoch"], pytest.approx(pop["NDCG@10"]))]
    assert "test-sampled-99/NDCG@10" not in tags       # its own protocol: the test/ tags


@pytest.mark.multiproc
@pytest.mark.parametrize("protocol", ["popular", "full"])
def test_world_size_2_equals_one_process(protocol, finetuned, tiny_data, tmp_path, shm_clean):
    model = finetuned / "best.pt"
    one, two = tmp_path / "one", tmp_path / "two"
    args = ("--protocol", protocol, "--split", "valid", "--topk", "7", "--ks", "1,5,10,20")
    _evaluate("single", tiny_data, model, *args, "--out", str(one))
    _evaluate("torchrun", tiny_data, model, *args, "--out", str(two))
    key = "full" if protocol == "full" else "popular-99"
    a, b = (read_json(d / "evaluation" / f"{key}-valid.json") for d in (one, two))
    # the same ranks (below); the metric sums only add in another order
    assert a["metrics"] == pytest.approx(b["metrics"], rel=1e-12, abs=1e-15)
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert set(a["metrics"]) == {"HR@1", "HR@5", "NDCG@5", "HR@10", "NDCG@10", "HR@20",
                                 "NDCG@20", "MRR"}
    ra, rb = (np.load(d / "evaluation" / f"{key}-valid-ranks.npy") for d in (one, two))
    assert np.array_equal(ra, rb)
    assert metrics.metrics_from_ranks(torch.from_numpy(ra), (1, 5, 10, 20)) == \
        pytest.approx(a["metrics"], abs=1e-12)
    ta, tb = (np.load(d / "evaluation" / f"{key}-valid-top7.npz", allow_pickle=False)
              for d in (one, two))
    assert np.array_equal(ta["items"], tb["items"]) and np.array_equal(ta["scores"], tb["scores"])
    assert ta["items"].shape == (200, 7) and (np.diff(ta["scores"], axis=1) <= 0).all()
    ds = Dataset(tiny_data)
    items, offsets = ds.load_sequences()
    for u in range(0, 200, 37):                         # validation input = seq[:-2]
        history = set(items[offsets[u]:offsets[u + 1] - 2].tolist())
        assert not history & set(ta["items"][u].tolist())
        assert ta["items"][u].min() >= 1 and ta["items"][u].max() <= ds.num_items


@pytest.mark.multiproc
def test_bad_arguments_are_named(finetuned, tiny_data, tmp_path):
    p = _evaluate("single", tiny_data, tmp_path / "nope", "--protocol", "full", expect=2)
    assert "--model" in p.stderr and "does not exist" in p.stderr
    p = _evaluate("single", tiny_data, finetuned / "best.pt", "--protocol", "full", expect=2)
    assert "--out is needed" in p.stderr
    p = _evaluate("single", tiny_data, finetuned, "--protocol", "sampled", "--negatives", "150",
                  expect=2)
    assert "--negatives 150: the dataset stores 99" in p.stderr
    assert "Traceback" not in p.stderr
