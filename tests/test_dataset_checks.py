"""Opening a dataset checks every shard's header against the manifest, so a hand-edited manifest
stops the training commands with one line naming the shard and the key (issue 17, item 4); JSON
inputs with a key twice are refused (item 8d)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from s3rec.data.format import DatasetError
from s3rec.data.reader import Dataset
from s3rec.data_prep.cli import main
from s3rec.data_prep.fixtures import random_release
from tests.train_helpers import make_dataset, run, train_args


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory) -> Path:
    """200 users, 150 items in 2 shards (users 0..100 and 100..200)."""
    out = tmp_path_factory.mktemp("checks") / "ds"
    assert main(["synthetic", "--users", "200", "--items", "150", "--attributes", "20",
                 "--shards", "2", "--out", str(out)]) == 0
    return out


def edited(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    path = dst / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))
    return dst


def shift_first_range(m: dict) -> None:
    """Moves 3 users from shard 0 to shard 1 in the records only, consistently."""
    a, b = m["shards"]
    a["user_end"] -= 3
    a["num_users"] -= 3
    b["user_start"] -= 3
    b["num_users"] += 3


EDITS = {
    "num_users_up": (lambda m: m.update(num_users=m["num_users"] + 5),
                     "manifest.json: key 'num_users' = 205, but the shards cover users 0..200"),
    "num_users_down": (lambda m: m.update(num_users=m["num_users"] - 5),
                       "key 'num_users' = 195, but the shards cover users 0..200"),
    "num_users_down_with_last_shard": (
        lambda m: (m.update(num_users=195), m["shards"][1].update(user_end=195, num_users=95)),
        "shard-00000.h5: attribute num_users = 200, manifest says 195 (key 'num_users')"),
    "num_items": (lambda m: m.update(num_items=m["num_items"] + 3),
                  "shard-00000.h5: attribute num_items = 150, manifest says 153 (key 'num_items')"),
    "num_attributes": (lambda m: m.update(num_attributes=m["num_attributes"] + 2),
                       "'num_attributes'"),
    "shard_range": (shift_first_range,
                    "shard-00000.h5: attribute user_end = 100, manifest says 97 "
                    "(key shards[0].user_end)"),
    "shard_interactions": (
        lambda m: (m["shards"][1].update(num_interactions=m["shards"][1]["num_interactions"] + 1),
                   m.update(num_interactions=m["num_interactions"] + 1)),
        "shard-00001.h5: "),
    "record_num_users": (lambda m: m["shards"][0].update(num_users=99),
                         "shard-00000.h5: key shards[0].num_users = 99, but user_end - "
                         "user_start = 100"),
}


@pytest.mark.parametrize("name", list(EDITS))
def test_opening_a_dataset_checks_the_manifest_against_every_shard(two_shards, tmp_path, name):
    edit, message = EDITS[name]
    ds = edited(two_shards, tmp_path / "ds", edit)
    with pytest.raises(DatasetError) as e:
        Dataset(ds)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_shard_interactions_message_names_the_key(two_shards, tmp_path):
    edit, _ = EDITS["shard_interactions"]
    with pytest.raises(DatasetError, match=r"shard-00001.h5: \d+ interactions, manifest says \d+ "
                                           r"\(key shards\[1\].num_interactions; dataset seq/items\)"):
        Dataset(edited(two_shards, tmp_path / "ds", edit))


def test_an_untouched_dataset_opens_and_reads(two_shards):
    ds = Dataset(two_shards)
    items, offsets = ds.load_sequences()
    assert len(offsets) == 201 and len(items) == ds.num_interactions


@pytest.mark.parametrize("stage,edit", [("pretrain", "num_users_down"),
                                        ("finetune", "num_items")])
def test_training_commands_stop_on_an_edited_manifest(tmp_path, stage, edit):
    """The old code trained on 195 of 200 users with exit 0 (num_users down), or died with a
    ValueError traceback (num_items up)."""
    data = edited(make_dataset(tmp_path), tmp_path / "edited", EDITS[edit][0])
    over = ["variant=finetune-only"] if stage == "finetune" else []
    p = run([sys.executable, "-m", f"s3rec.{stage}", *train_args(data, tmp_path / "run", *over)],
            timeout=240, expect=2)
    assert EDITS[edit][1] in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


# ---------------------------------------------------------------- item 8d: a JSON key twice

def test_release_attributes_with_a_key_twice_are_refused(tmp_path, capsys):
    src = random_release(tmp_path / "src", num_users=30)
    path = src / "Toy_item2attributes.json"
    text = path.read_text()
    assert text.startswith("{")
    path.write_text('{"1": [1], ' + text[1:])       # item 1 twice: json kept the last
    assert main(["release", "--src", str(src), "--name", "Toy", "--out", str(tmp_path / "ds")]) == 1
    err = capsys.readouterr().err
    assert f"{path}: key '1' appears twice in one mapping" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "ds").exists()


def test_manifest_with_a_key_twice_is_refused(two_shards, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(two_shards, ds)
    path = ds / "manifest.json"
    path.write_text('{"num_users": 1, ' + path.read_text().lstrip()[1:])
    with pytest.raises(DatasetError, match="manifest.json: key 'num_users' appears twice"):
        Dataset(ds)
