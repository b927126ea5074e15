"""s3rec-prep synthetic: seeded, streamed block by block, independent of the shard count, and
with the planted structure (clusters, cluster-bound attributes, cluster Markov chain)."""
import numpy as np

from s3rec.data_prep import writer
from s3rec.data_prep.cli import main
from s3rec.data_prep.negatives import BLOCK
from s3rec.data_prep.synthetic import SyntheticSource
from s3rec.data.reader import Dataset

ARGS = ["--users", "9000", "--items", "600", "--attributes", "64", "--seed", "5"]


def synth(out, *extra):
    return main(["synthetic", *ARGS, "--out", str(out), *extra])


def test_seeded_streamed_and_shard_count_free(tmp_path, monkeypatch):
    calls = []
    orig = writer.ShardWriter.add_users

    def spy(self, items, lengths, user_ids, negatives):
        calls.append(len(lengths))
        return orig(self, items, lengths, user_ids, negatives)

    monkeypatch.setattr(writer.ShardWriter, "add_users", spy)
    assert synth(tmp_path / "a", "--shards", "1") == 0
    # streamed: the writer only ever sees one block of users at a time
    assert max(calls) <= BLOCK and len(calls) == -(-9000 // BLOCK)
    assert synth(tmp_path / "b", "--shards", "4") == 0
    a, b = Dataset(tmp_path / "a"), Dataset(tmp_path / "b")
    for x, y in zip(a.load_sequences() + (a.load_negatives(),) + a.item_attributes(),
                    b.load_sequences() + (b.load_negatives(),) + b.item_attributes()):
        assert np.array_equal(x, y)
    assert (a.num_users, a.num_items, a.num_attributes) == (9000, 600, 64)
    items, offsets = a.load_sequences()
    assert np.diff(offsets).min() >= 5 and 9.0 < np.diff(offsets).mean() < 11.0
    assert items.min() >= 1 and items.max() <= 600
    negs = a.load_negatives()
    for u in range(0, 9000, 97):
        assert len(set(negs[u])) == 99 and not set(negs[u]) & set(items[offsets[u]:offsets[u + 1]])
    assert synth(tmp_path / "c", "--shards", "1", "--seed", "6") == 0
    assert not np.array_equal(Dataset(tmp_path / "c").load_sequences()[0][:1000], items[:1000])


def test_planted_structure(tmp_path):
    assert synth(tmp_path / "a") == 0
    ds = Dataset(tmp_path / "a")
    src = SyntheticSource(9000, 600, 64, seed=5)          # the same seed rebuilds the same structure
    cluster = np.empty(601, dtype=np.int64)
    for c in range(src.num_clusters):
        cluster[src.cluster_items[src.cluster_offsets[c]:src.cluster_offsets[c + 1]]] = c
    items, offsets = ds.load_sequences()
    first = np.ones(len(items), dtype=bool)
    first[offsets[:-1]] = False                              # positions with a predecessor
    prev, nxt = cluster[items[np.flatnonzero(first) - 1]], cluster[items[first]]
    C = src.num_clusters
    counts = np.zeros((C, C))
    np.add.at(counts, (prev, nxt), 1)
    # the 4 likeliest successors (stay + 3 preferred) carry ~90% of transitions; chance is 4/32
    top4 = np.sort(counts, axis=1)[:, -4:].sum() / counts.sum()
    assert top4 > 0.8
    # attributes name the cluster: each attribute's items are mostly of one cluster
    values, aoff = ds.item_attributes()
    owner = np.repeat(np.arange(len(aoff) - 1), np.diff(aoff))
    purity = []
    for a in range(1, 65):
        cl = cluster[owner[values == a]]
        purity.append(np.bincount(cl).max() / len(cl))
    assert np.mean(purity) > 0.7


def test_small_item_sets_always_leave_99_negatives(tmp_path, capsys):
    # 110 items: sequences are capped at 11 items, so no user can run out of negatives
    assert main(["synthetic", "--users", "3000", "--items", "110", "--attributes", "5",
                 "--mean-length", "10", "--out", str(tmp_path / "a")]) == 0
    assert np.diff(Dataset(tmp_path / "a").load_sequences()[1]).max() <= 11
    assert main(["synthetic", "--users", "10", "--items", "104", "--attributes", "5",
                 "--out", str(tmp_path / "b")]) == 1
    assert "--items must be > 104" in capsys.readouterr().err


def test_out_under_a_file_is_an_error_naming_the_path(tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    assert main(["synthetic", "--users", "50", "--items", "200", "--attributes", "5",
                 "--out", str(tmp_path / "afile" / "ds")]) == 1
    err = capsys.readouterr().err
    out = tmp_path / "afile" / "ds"
    assert err.startswith(f"s3rec-prep synthetic: error: {out}: cannot create")
    assert "choose another --out" in err and "Traceback" not in err
    assert (tmp_path / "afile").read_text() == "mine"
