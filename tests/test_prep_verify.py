"""s3rec-prep verify and the reader's checks: damaged shards are found and named."""
import json
import subprocess

import pytest

from s3rec.data_prep.cli import main
from s3rec.data_prep.fixtures import random_release
from s3rec.data.format import DatasetError, open_shard
from s3rec.data.reader import Dataset


@pytest.fixture
def dataset(tmp_path):
    src = random_release(tmp_path / "src", num_users=200)
    out = tmp_path / "ds"
    assert main(["release", "--src", str(src), "--name", "Toy", "--out", str(out), "--shards", "3"]) == 0
    return out


def verify_err(path, capsys):
    capsys.readouterr()
    rc = main(["verify", str(path)])
    cap = capsys.readouterr()
    assert cap.out == ""
    return rc, cap.err


def test_verify_cli_exit_code_and_line(dataset):
    r = subprocess.run(["s3rec-prep", "verify", str(dataset)], capture_output=True, text=True)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 1
    assert r.stdout.startswith("users=200 items=400 interactions=") and r.stdout.endswith(" shards=3\n")


def test_truncated_shard(dataset, capsys):
    shard = dataset / "shard-00001.h5"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    rc, err = verify_err(dataset, capsys)
    assert rc == 1 and "shard-00001.h5" in err and "truncated" in err
    with pytest.raises(DatasetError, match="shard-00001.h5.*truncated"):
        Dataset(dataset)                        # opening checks every shard's size
    # without the manifest's size, opening the file itself fails and names it
    with pytest.raises(DatasetError, match="shard-00001.h5: cannot open shard"):
        open_shard(shard)


def test_checksum_mismatch(dataset, capsys):
    shard = dataset / "shard-00002.h5"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF                          # same size, one byte different
    shard.write_bytes(bytes(data))
    rc, err = verify_err(dataset, capsys)
    assert rc == 1 and "shard-00002.h5: sha256 checksum mismatch" in err
    with pytest.raises(DatasetError, match="shard-00002.h5: sha256 checksum mismatch"):
        Dataset(dataset).load_negatives(150, 160)


def test_manifest_disagreeing_with_shard(dataset, capsys):
    m = json.loads((dataset / "manifest.json").read_text())
    m["shards"][1]["num_interactions"] += 1
    m["num_interactions"] += 1
    (dataset / "manifest.json").write_text(json.dumps(m))
    rc, err = verify_err(dataset, capsys)
    assert rc == 1 and "shard-00001.h5" in err and "interactions, manifest says" in err


def test_missing_shard_and_manifest(dataset, capsys):
    (dataset / "shard-00000.h5").unlink()
    rc, err = verify_err(dataset, capsys)
    assert rc == 1 and "shard-00000.h5: shard file missing" in err
    (dataset / "manifest.json").unlink()
    rc, err = verify_err(dataset, capsys)
    assert rc == 1 and "no manifest" in err
    with pytest.raises(DatasetError, match="no manifest"):
        Dataset(dataset)


def test_other_format_version(dataset, capsys):
    m = json.loads((dataset / "manifest.json").read_text())
    m["format_version"] = 99
    (dataset / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DatasetError, match="format_version 99"):
        Dataset(dataset)


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["shards"][1].pop("sha256"), "shards[1] lacks key 'sha256'"),
    (lambda m: m["shards"][0].update(user_end="67"), "shards[0].user_end = '67', expected an integer"),
    (lambda m: m.update(shards={"a": 1}), "key 'shards' = {'a': 1}, expected a non-empty list"),
    (lambda m: m["shards"].__setitem__(2, "shard-00002.h5"), "shards[2] = 'shard-00002.h5', expected an object"),
    (lambda m: m.update(shards=[], num_users=0, num_interactions=0), "key 'num_users' = 0"),
    (lambda m: m.update(num_items=1.5), "key 'num_items' = 1.5, expected an integer >= 0"),
    (lambda m: m.update(seed=1), "shard-00000.h5: attribute seed = 12345, manifest says 1"),
    (lambda m: m.update(negatives_source="imported"), "attribute negatives_source ="),
    (lambda m: m.update(num_negatives=5), "manifest num_negatives = 5"),
])
def test_damaged_manifest_is_named_not_a_traceback(dataset, capsys, edit, message):
    path = dataset / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))
    rc, err = verify_err(dataset, capsys)
    assert rc == 1 and message in err and "Traceback" not in err, err
