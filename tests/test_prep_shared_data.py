"""The released datasets (../shared/data beside the repo) prepare and verify with the published
statistics. Skipped, with the reason, where the shared folder is absent."""
from pathlib import Path

import pytest

from s3rec.data_prep.cli import main
from s3rec.data.reader import Dataset

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared(name):
    folder = SHARED_DATA / name
    if not (folder / f"{name}.txt").is_file():
        pytest.skip(f"{folder / (name + '.txt')} not present (the shared data folder sits beside "
                    f"the repository: {SHARED_DATA})")
    return folder


def prep_and_verify(capsys, src, name, out, shards):
    assert main(["release", "--src", str(src), "--name", name, "--out", str(out),
                 "--shards", str(shards)]) == 0
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0
    return capsys.readouterr().out


def test_beauty_prepared_and_verified(tmp_path, capsys):
    src = shared("Beauty")
    line = prep_and_verify(capsys, src, "Beauty", tmp_path / "Beauty", 4)
    assert line == "users=22363 items=12101 interactions=198502 attributes=637 shards=4\n"
    ds = Dataset(tmp_path / "Beauty")
    assert ds.item_size == 12103 and ds.attribute_size == 638
    items, offsets = ds.load_sequences()
    first = (src / "Beauty.txt").read_text().splitlines()[:3]
    assert [items[offsets[u]:offsets[u + 1]].tolist() for u in range(3)] == \
        [list(map(int, l.split()))[1:] for l in first]
    negs = ds.load_negatives()
    assert "seed 12345" in ds.manifest["negatives_source"]
    for u in range(0, ds.num_users, 101):      # the release rule on the real data
        assert len(set(negs[u])) == 99 and not set(negs[u]) & set(items[offsets[u]:offsets[u + 1]])


def test_lastfm_prepared_with_its_original_negatives(tmp_path, capsys):
    src = shared("LastFM")
    line = prep_and_verify(capsys, src, "LastFM", tmp_path / "LastFM", 2)
    assert line == "users=1090 items=3646 interactions=52551 attributes=388 shards=2\n"
    ds = Dataset(tmp_path / "LastFM")
    assert ds.manifest["negatives_source"] == "imported: LastFM_sample.txt"
    sample = (src / "LastFM_sample.txt").read_text().splitlines()
    negs = ds.load_negatives()
    for u in (0, 1, 544, 545, 1089):           # both shards, both sides of the boundary
        assert negs[u].tolist() == list(map(int, sample[u].split()))[1:]
