"""Attribute fields in the datasets: Amazon's two fields (and one with --merge-fields), the
synthetic noise field, format 1 datasets read as one field `attributes`, the manifest checked."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from s3rec.data.format import MANIFEST, DatasetError, sha256_file
from s3rec.data.reader import Dataset
from s3rec.data_prep.cli import main
from s3rec.data_prep.fixtures import write_amazon
from tests.test_prep_amazon import big_fixture


def rows(csr, lo=1, hi=6):
    values, offsets = csr
    return [values[offsets[i]:offsets[i + 1]].tolist() for i in range(lo, hi)]


def amazon(tmp_path: Path, *extra: str) -> Dataset:
    reviews, meta = write_amazon(tmp_path / "raw", "Toy", *big_fixture())
    out = tmp_path / ("merged" if extra else "fields")
    assert main(["amazon", "--reviews", str(reviews), "--meta", str(meta), "--out", str(out),
                 *extra]) == 0
    assert main(["verify", str(out)]) == 0
    return Dataset(out)


def test_amazon_writes_categories_and_brand_as_two_fields(tmp_path):
    ds = amazon(tmp_path)
    assert [(f.name, f.num_attributes) for f in ds.attribute_fields] == \
        [("categories", 7), ("brand", 2)]
    # items 1..5 = p4 p1 p2 p5 p3; categories in meta-file order: Skin=1 Face=2 (p3), Hair=3
    # (p1), Nails=4 (p5), C0..C2 = 5..7 (filler); brands: Acme=1 (p3), ''=2 (p2)
    assert rows(ds.field_attributes("categories")) == [[1, 1], [3, 1], [], [4], [1, 2]]
    assert rows(ds.field_attributes("brand")) == [[1], [], [2], [], [1]]
    assert rows(ds.item_attributes()) == [[1, 1, 8], [3, 1], [9], [4], [1, 2, 8]]   # brand + 7
    assert ds.num_attributes == 9
    assert [r["num_pairs"] for r in ds.manifest["attribute_fields"]] == [7 + 250, 3]


def test_amazon_merge_fields_is_the_one_vocabulary(tmp_path):
    ds = amazon(tmp_path, "--merge-fields")
    assert [(f.name, f.num_attributes) for f in ds.attribute_fields] == [("attributes", 9)]
    # Acme=1 Skin=2 Face=3 (p3), Hair=4 (p1), ''=5 (p2), Nails=6: brand first, as the original
    assert rows(ds.item_attributes()) == [[1, 2, 2], [4, 2], [5], [6], [1, 2, 3]]


def test_synthetic_noise_field_leaves_the_cluster_field_and_sequences_as_they_were(tmp_path):
    plain, noisy = tmp_path / "plain", tmp_path / "noisy"
    args = ["synthetic", "--users", "60", "--items", "120", "--attributes", "40", "--seed", "3"]
    assert main([*args, "--out", str(plain)]) == 0
    assert main([*args, "--noise-attributes", "10", "--out", str(noisy)]) == 0
    assert main(["verify", str(noisy)]) == 0
    a, b = Dataset(plain), Dataset(noisy)
    assert [(f.name, f.num_attributes) for f in b.attribute_fields] == [("cluster", 40),
                                                                        ("noise", 10)]
    for x, y in zip(a.item_attributes(), b.field_attributes("cluster")):
        assert np.array_equal(x, y)
    for x, y in zip(a.load_sequences() + (a.load_negatives(),),
                    b.load_sequences() + (b.load_negatives(),)):
        assert np.array_equal(x, y)
    noise, offsets = b.field_attributes("noise")
    assert noise.min() >= 1 and noise.max() <= 10
    assert set(np.diff(offsets)[1:-1].tolist()) <= {1, 2}      # one or two ids an item
    assert "plain" not in b.name and b.name.endswith("-n10")


def to_format_1(folder: Path) -> None:
    """Rewrite a one-field format 2 dataset as format 1 wrote it (attr/values, no field list)."""
    m = json.loads((folder / MANIFEST).read_text())
    for rec in m["shards"]:
        with h5py.File(folder / rec["file"], "a") as f:
            for k in ("values", "offsets"):
                f.move(f"attr/attributes/{k}", f"attr/{k}")
            del f["attr/attributes"]
            f.attrs["format_version"] = 1
        rec["sha256"] = sha256_file(folder / rec["file"])
        rec["bytes"] = (folder / rec["file"]).stat().st_size
    m["format_version"] = 1
    del m["attribute_fields"]
    (folder / MANIFEST).write_text(json.dumps(m))


def test_format_1_dataset_reads_as_one_field_and_verifies(tmp_path):
    out = tmp_path / "old"
    assert main(["synthetic", "--users", "40", "--items", "110", "--attributes", "6",
                 "--out", str(out)]) == 0
    before = Dataset(out).item_attributes()
    to_format_1(out)
    assert main(["verify", str(out)]) == 0
    ds = Dataset(out)
    assert [(f.name, f.num_attributes) for f in ds.attribute_fields] == [("attributes", 6)]
    for x, y in zip(before, ds.item_attributes()):
        assert np.array_equal(x, y)


@pytest.mark.parametrize("edit,expect", [
    (lambda m: m.pop("attribute_fields"), "key 'attribute_fields' = None"),
    (lambda m: m["attribute_fields"][0].pop("num_pairs"), r"attribute_fields\[0\] = "),
    (lambda m: m["attribute_fields"][1].update(num_attributes=3),
     "attribute_fields count 43 attributes, key 'num_attributes' says 50"),
    (lambda m: m["attribute_fields"][1].update(name="cluster"), "'cluster' appears twice"),
    (lambda m: m["attribute_fields"][1].update(name="no ise"), "field name 'no ise'"),
    (lambda m: m["attribute_fields"][1].update(num_pairs=-2), r"attribute_fields\[1\].num_pairs"),
])
def test_bad_field_records_in_the_manifest_are_named(tmp_path, capsys, edit, expect):
    out = tmp_path / "ds"
    assert main(["synthetic", "--users", "30", "--items", "110", "--attributes", "40",
                 "--noise-attributes", "10", "--out", str(out)]) == 0
    m = json.loads((out / MANIFEST).read_text())
    edit(m)
    (out / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(DatasetError, match=expect):
        Dataset(out)
    assert main(["verify", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "manifest.json" in err[0]


def test_a_field_pair_count_that_disagrees_with_the_shard_fails_verify(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["synthetic", "--users", "30", "--items", "110", "--attributes", "40",
                 "--noise-attributes", "10", "--out", str(out)]) == 0
    m = json.loads((out / MANIFEST).read_text())
    m["attribute_fields"][1]["num_pairs"] += 1
    (out / MANIFEST).write_text(json.dumps(m))
    assert main(["verify", str(out)]) == 1
    assert "field 'noise'" in capsys.readouterr().err


def test_a_format_1_dataset_at_out_is_written_again_in_format_2(tmp_path, capsys):
    out = tmp_path / "ds"
    args = ["synthetic", "--users", "40", "--items", "110", "--attributes", "6", "--out", str(out)]
    assert main(args) == 0
    to_format_1(out)
    capsys.readouterr()
    assert main(args) == 0             # same arguments and sources: only the format differs
    assert "format version 1, this code writes 2" in capsys.readouterr().out
    assert json.loads((out / MANIFEST).read_text())["format_version"] == 2


def test_negative_noise_attributes_is_one_line(tmp_path, capsys):
    assert main(["synthetic", "--users", "40", "--items", "110", "--attributes", "6",
                 "--noise-attributes", "-1", "--out", str(tmp_path / "ds")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--noise-attributes must be >= 0, got -1" in err[0]
