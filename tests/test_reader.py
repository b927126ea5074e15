"""s3rec.data.reader: CSR reads spanning shards, negatives, attributes, shares, pickling, and
UserSequences inside real DataLoader worker processes."""
import pickle

import numpy as np
import pytest

from s3rec.data_prep.cli import main
from s3rec.data_prep.fixtures import random_release
from s3rec.data.reader import Dataset, UserSequences, collate_users, user_share


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reader")
    src = random_release(tmp / "src", num_users=500, num_items=300)
    lines = [list(map(int, l.split())) for l in (src / "Toy.txt").read_text().splitlines()]
    for shards, name in ((1, "one"), (4, "four")):
        assert main(["release", "--src", str(src), "--name", "Toy", "--out", str(tmp / name),
                     "--shards", str(shards)]) == 0
    return tmp, [l[1:] for l in lines]


def test_sizes_and_id_layout(toy):
    tmp, seqs = toy
    ds = Dataset(tmp / "four")
    assert ds.name == "Toy" and ds.num_users == 500 and ds.num_items == 300
    assert ds.num_interactions == sum(map(len, seqs))
    assert ds.item_size == 302 and ds.mask_id == 301 and ds.attribute_size == ds.num_attributes + 1


@pytest.mark.parametrize("start,end", [(0, None), (0, 1), (120, 380), (124, 126), (499, 500), (7, 7)])
def test_load_sequences_spans_shards(toy, start, end):
    tmp, seqs = toy
    ds = Dataset(tmp / "four")                       # shards of 125 users
    items, offsets = ds.load_sequences(start, end)
    want = seqs[start:end]
    assert items.dtype == np.int32 and offsets.dtype == np.int64
    assert offsets[0] == 0 and len(offsets) == len(want) + 1
    assert [items[offsets[k]:offsets[k + 1]].tolist() for k in range(len(want))] == want
    one = Dataset(tmp / "one")
    assert np.array_equal(one.load_negatives(start, end), ds.load_negatives(start, end))
    assert ds.load_negatives(start, end).shape == (len(want), 99)


def test_out_of_range_request(toy):
    ds = Dataset(toy[0] / "four")
    with pytest.raises(ValueError, match="outside"):
        ds.load_sequences(10, 501)


def test_item_attributes_csr(toy):
    ds = Dataset(toy[0] / "four")
    values, offsets = ds.item_attributes()
    assert values.dtype == np.int32 and offsets.dtype == np.int64
    assert len(offsets) == ds.item_size + 1
    assert offsets[1] - offsets[0] == 0 and offsets[ds.mask_id + 1] - offsets[ds.mask_id] == 0
    assert values.min() >= 1 and values.max() == ds.num_attributes


@pytest.mark.parametrize("n", [0, 1, 7, 100, 22363])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_user_share_contiguous_disjoint_complete(n, world):
    shares = [user_share(n, r, world) for r in range(world)]
    assert shares[0][0] == 0 and shares[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
    sizes = [e - s for s, e in shares]
    assert max(sizes) - min(sizes) <= 1


def test_dataset_pickles_without_handles(toy):
    ds = Dataset(toy[0] / "four")
    ds.load_sequences(0, 500)                        # opens all four shards
    assert len(ds._files) == 4
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._files == {}
    assert np.array_equal(clone.load_sequences(100, 300)[0], ds.load_sequences(100, 300)[0])


def test_user_sequences_in_dataloader_workers(toy):
    from torch.utils.data import DataLoader
    tmp, seqs = toy
    ds = Dataset(tmp / "four")
    ds.load_sequences(0, 10)                         # parent holds an open handle before fork
    view = UserSequences(ds, 100, 400)
    assert len(view) == 300
    u, s = view[0]
    assert u == 100 and s.tolist() == seqs[100]
    got = {}
    loader = DataLoader(view, batch_size=32, num_workers=2, collate_fn=collate_users)
    for users, items in loader:
        for u, s in zip(users.tolist(), items):
            got[u] = s.tolist()
    assert got == {u: seqs[u] for u in range(100, 400)}
    shuffled = DataLoader(view, batch_size=17, shuffle=True, num_workers=2, collate_fn=collate_users)
    seen = {u: s.tolist() for users, items in shuffled for u, s in zip(users.tolist(), items)}
    assert seen == got


def test_user_sequences_windowed_when_shard_exceeds_cache(toy):
    tmp, seqs = toy
    view = UserSequences(Dataset(tmp / "one"), cache_bytes=64, window=50)   # forces windows + LRU
    order = np.random.default_rng(0).permutation(len(view))
    assert all(view[int(k)][1].tolist() == seqs[int(k)] for k in order)
