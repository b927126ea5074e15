"""s3rec-prep release: round trip, the negatives rule, imports, re-runs, input errors."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from s3rec.data_prep.cli import main
from s3rec.data_prep.fixtures import random_release, write_release
from s3rec.data.format import MANIFEST
from s3rec.data.reader import Dataset


def prep(src, out, *extra, name="Toy"):
    return main(["release", "--src", str(src), "--name", name, "--out", str(out), *extra])


def read_txt(path):
    return [list(map(int, l.split())) for l in Path(path).read_text().splitlines()]


def assert_nothing_written(out: Path):
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert leftovers == []


def test_release_round_trip_and_verify(tmp_path, capsys):
    src = random_release(tmp_path / "src")
    assert prep(src, tmp_path / "ds", "--shards", "3") == 0
    lines = read_txt(src / "Toy.txt")
    ds = Dataset(tmp_path / "ds")
    assert (ds.num_users, ds.num_items, ds.num_attributes) == (300, 400, 30)
    assert ds.num_interactions == sum(len(l) - 1 for l in lines)
    assert (ds.item_size, ds.mask_id, ds.attribute_size) == (402, 401, 31)
    items, offsets = ds.load_sequences()
    for u, l in enumerate(lines):
        assert items[offsets[u]:offsets[u + 1]].tolist() == l[1:]
    attrs = json.loads((src / "Toy_item2attributes.json").read_text())
    values, aoff = ds.item_attributes()
    assert len(aoff) == ds.item_size + 1 and aoff[1] == 0 and aoff[-1] == aoff[-2]
    for i in (1, 2, 200, 400):
        assert values[aoff[i]:aoff[i + 1]].tolist() == attrs[str(i)]
    m = json.loads((tmp_path / "ds" / MANIFEST).read_text())
    assert [s["user_start"] for s in m["shards"]] == [0, 100, 200]
    assert set(m["sources"]) == {"sequences", "attributes"}
    assert m["seed"] == 12345 and "release rule" in m["negatives_source"]
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "ds")]) == 0
    assert capsys.readouterr().out == \
        f"users=300 items=400 interactions={ds.num_interactions} attributes=30 shards=3\n"


def test_generated_negatives_follow_release_rule_and_ignore_shard_count(tmp_path):
    src = random_release(tmp_path / "src", num_users=5000, num_items=300)  # > 1 RNG block of users
    prep(src, tmp_path / "a", "--shards", "1", "--seed", "7")
    prep(src, tmp_path / "b", "--shards", "4", "--seed", "7")
    prep(src, tmp_path / "c", "--shards", "4", "--seed", "8")
    a, b = Dataset(tmp_path / "a"), Dataset(tmp_path / "b")
    negs = a.load_negatives()
    assert negs.shape == (5000, 99) and negs.dtype == np.int32
    assert np.array_equal(negs, b.load_negatives())
    assert not np.array_equal(negs, Dataset(tmp_path / "c").load_negatives())
    items, offsets = a.load_sequences()
    seen = set(items.tolist())
    for u in range(0, 5000, 7):
        row = negs[u].tolist()
        assert len(set(row)) == 99
        assert not set(row) & set(items[offsets[u]:offsets[u + 1]].tolist())
        assert set(row) <= seen
    # uniform over allowed items: every seen item shows up as a negative about equally often
    counts = np.bincount(negs.ravel(), minlength=301)[1:]
    assert counts.min() > 0.6 * counts.mean() and counts.max() < 1.4 * counts.mean()


def test_sample_file_is_imported(tmp_path):
    src = random_release(tmp_path / "src", with_sample=True)
    prep(src, tmp_path / "ds")
    ds = Dataset(tmp_path / "ds")
    sample = np.array(read_txt(src / "Toy_sample.txt"))[:, 1:]
    assert np.array_equal(ds.load_negatives(), sample)
    assert ds.manifest["negatives_source"] == "imported: Toy_sample.txt"
    assert "negatives" in ds.manifest["sources"]


def test_rerun_is_up_to_date_and_changes_rebuild(tmp_path, capsys):
    src = random_release(tmp_path / "src")
    out = tmp_path / "ds"
    prep(src, out, "--shards", "2")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert prep(src, out, "--shards", "2") == 0
    assert "up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert prep(src, out, "--shards", "2", "--seed", "1") == 0        # other args: rebuilt
    assert "arguments changed" in capsys.readouterr().out
    with open(src / "Toy.txt", "a") as f:                              # other input: rebuilt
        f.write("301 1 2 3 4 5\n")
    assert prep(src, out, "--shards", "2", "--seed", "1") == 0
    assert "source files changed" in capsys.readouterr().out
    assert Dataset(out).num_users == 301
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-00000.h5", "shard-00001.h5"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


BAD_LINES = [
    ("1 1 2 3\n2 4 5 x 6\n", "Toy.txt:2: item id 'x' is not a non-negative integer"),
    ("1 1 2 3\n2 4 5 -6 7\n", "Toy.txt:2: negative item id '-6'"),
    ("1 1 2 3\n\n3 4 5 6\n", "Toy.txt:2: malformed line"),
    ("1 1 2 3\n2 4\n", "Toy.txt:2: malformed line '2 4'"),
    ("1 1 2 3\n2 0 5 6\n", "Toy.txt:2: item id 0"),
    ("1.5 1 2 3\n", "Toy.txt:1: user id '1.5' is not a non-negative integer"),
    ("1 1 2 3\n2 4 5 \u00b2\n", "Toy.txt:2: item id '\u00b2' is not a non-negative integer"),
    ("1 1 2 3\n2 4 5 6\n1 7 8 9\n", "Toy.txt:3: user 1 again (first on line 1)"),
    ("1 1 2 3\n2 4 5 2147483647\n", "Toy.txt:2: item id 2147483647 above 2147483646"),
    ("1 1 2 3\n2 4 5 1000000000000000000000000000000\n", "Toy.txt:2: item id 1000000000000"),
]


@pytest.mark.parametrize("text,message", BAD_LINES)
def test_bad_sequence_lines_name_file_and_line(tmp_path, capsys, text, message):
    src = write_release(tmp_path / "src", "Toy", [[1]], {i: [1] for i in range(1, 8)})
    (src / "Toy.txt").write_text(text)
    assert prep(src, tmp_path / "ds") == 1
    assert message in capsys.readouterr().err
    assert_nothing_written(tmp_path / "ds")


def test_sequences_not_utf8(tmp_path, capsys):
    src = write_release(tmp_path / "src", "Toy", [[1, 2, 3]], {i: [1] for i in range(1, 4)})
    (src / "Toy.txt").write_bytes(b"1 1 2 3\n2 5 6 \xff 7\n")
    assert prep(src, tmp_path / "ds") == 1
    assert "Toy.txt: not UTF-8 text (byte 14)" in capsys.readouterr().err
    assert_nothing_written(tmp_path / "ds")


def test_items_without_any_attribute_make_a_dataset(tmp_path, capsys):
    """Every attribute list empty (allowed): an empty attribute table, not an HDF5 error."""
    src = random_release(tmp_path / "src", num_users=40, num_items=150)   # max item id 150
    (src / "Toy_item2attributes.json").write_text(json.dumps({str(i): [] for i in range(1, 151)}))
    out = tmp_path / "ds"
    assert prep(src, out, "--shards", "2") == 0
    assert main(["verify", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("attributes=0 shards=2")
    values, offsets = Dataset(out).item_attributes()
    assert len(values) == 0 and not offsets.any()


@pytest.mark.parametrize("attrs,message", [
    ({1: [1], 2: [2]}, "2 item entries, but the sequences use item ids up to 3"),
    ({1: [1], 2: [2], 5: [1]}, "item 3 has no attribute entry"),
    ({1: [1], 2: [2], 3: [1], "002": [1]}, "keys '2' and '002' are the same item 2"),
    ({1: [1], 2: [0], 3: [1]}, "item 2: attribute id 0 out of range"),
    ({1: [1], 2: [-4], 3: [1]}, "item 2: attribute id -4 out of range"),
    ({1: [1], 2: ["a"], 3: [1]}, "item 2: attribute id 'a' out of range"),
    ({1: [1], 2: 5, 3: [1]}, "item 2: expected a list of attribute ids"),
])
def test_bad_attributes_name_item_and_file(tmp_path, capsys, attrs, message):
    src = write_release(tmp_path / "src", "Toy", [[1, 2, 3]], attrs)
    assert prep(src, tmp_path / "ds") == 1
    err = capsys.readouterr().err
    assert message in err and "Toy_item2attributes.json" in err
    assert_nothing_written(tmp_path / "ds")


def test_bad_sample_file(tmp_path, capsys):
    src = write_release(tmp_path / "src", "Toy", [[1, 2, 3]] * 2, {i: [1] for i in range(1, 4)},
                        sample=[list(range(1, 100))] * 2)
    assert prep(src, tmp_path / "ds") == 1       # negatives beyond the 3 items of the data
    assert "Toy_sample.txt:1: negative item 4 outside 1..3" in capsys.readouterr().err
    assert_nothing_written(tmp_path / "ds")


def _sample_case(folder: Path, change) -> Path:
    """Five users over items 1..319 (250 in no sequence); a sample file that follows the release
    rule (each user's first 99 seen items not its own), then `change(sample)` applied."""
    seqs = [list(range(1, 6)), list(range(6, 11)), list(range(11, 40)), list(range(40, 200)),
            [i for i in range(200, 320) if i != 250]]
    seen = sorted(set().union(*seqs))
    sample = [[i for i in seen if i not in s][:99] for s in seqs]
    change(sample)
    return write_release(folder, "Toy", seqs, {i: [1] for i in range(1, 320)}, sample=sample)


def _set(line: int, pos: int, item: int):
    return lambda sample: sample[line - 1].__setitem__(pos, item)


@pytest.mark.parametrize("change,message", [
    (_set(2, 98, 11), "Toy_sample.txt:2: item 11 more than once among the negatives"),
    (_set(2, 40, 7), "Toy_sample.txt:2: negative item 7 is in user 2's own sequence"),
    (_set(4, 0, 250), "Toy_sample.txt:4: negative item 250 appears in no sequence"),
    (_set(3, 5, 320), "Toy_sample.txt:3: negative item 320 outside 1..319"),
    (lambda sample: sample[2].pop(), "Toy_sample.txt:3: malformed line"),
    (lambda sample: sample.pop(), "Toy_sample.txt: 4 lines, expected one per user (5)"),
])
def test_sample_file_breaking_the_release_rule_is_refused(tmp_path, capsys, change, message):
    assert prep(_sample_case(tmp_path / "good", lambda s: None), tmp_path / "ok") == 0
    assert prep(_sample_case(tmp_path / "src", change), tmp_path / "ds") == 1
    assert message in capsys.readouterr().err
    assert_nothing_written(tmp_path / "ds")


def test_failure_while_writing_leaves_old_dataset_intact(tmp_path, capsys):
    # 105 items; a user holding 10 of them leaves only 95 candidates for 99 distinct negatives:
    # the error comes from the shard writer, after the output folder was started.
    seqs = [[i, i + 1, i + 2, i + 3, i + 4] for i in range(1, 102)]
    attrs = {i: [1] for i in range(1, 106)}
    src = write_release(tmp_path / "src", "Toy", seqs, attrs)
    out = tmp_path / "ds"
    assert prep(src, out, "--shards", "2") == 0
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    write_release(src, "Toy", seqs + [list(range(1, 11))], attrs)
    assert prep(src, out, "--shards", "2") == 1
    assert "user index 101: only 95 items outside its sequence" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old    # the old dataset, untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert prep(src, tmp_path / "new") == 1
    assert_nothing_written(tmp_path / "new")


def test_refuses_to_replace_a_folder_that_is_not_a_dataset(tmp_path, capsys):
    src = random_release(tmp_path / "src")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "notes.txt").write_text("mine")
    assert prep(src, tmp_path / "ds") == 1
    assert "exists and is not a dataset folder" in capsys.readouterr().err
    assert os.listdir(tmp_path / "ds") == ["notes.txt"]
