"""s3rec-prep generic: users' own interactions and item features (CSV, TSV, JSON lines, any
number of fields) on a hand-checked fixture; every bad input named with its file and line."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from s3rec.data.reader import Dataset
from s3rec.data_prep.cli import main
from tests.train_helpers import command, read_json, run, scalars, train_args

# (user, item, time), in file order. Items by first appearance in the sorted sequences:
# u1: p4(5) p1(10) p2(20) p5(20, after p2 in the file) p3(30) -> ids p4=1 p1=2 p2=3 p5=4 p3=5
HAND = [("u1", "p3", 30), ("u1", "p1", 10), ("u1", "p2", 20), ("u1", "p5", 20), ("u1", "p4", 5),
        ("u2", "p1", 1), ("u2", "p2", 2), ("u2", "p3", 3),
        ("u3", "p5", 3), ("u3", "p1", 2), ("u3", "p2", 1)]
# filler users "0".."9", 24 items each, every item x000..x119 used by two of them (so that 99
# negatives exist, and an item 2-core keeps them); JSON lines write the even ones' ids as integers
FILLER = [(str(k), f"x{(k + d) % 10 * 12 + j:03d}", 100 * (d + 1) + j)
          for k in range(10) for d in (0, 1) for j in range(12)]
# (item, genre values, brand values) in file order; q is in no interaction; p1 has two rows
FEATURES = ([("p3", ["Comedy"], ["Acme"]), ("q", ["Horror"], ["Nope"]),
             ("p1", ["Drama", "Comedy"], ["Acme"]), ("p2", [], ["Zeta"]),
             ("p5", ["Drama", "Drama"], [])]
            + [(f"x{n:03d}", [f"G{n % 3}"], []) for n in range(120)]
            + [("p1", ["Thriller"], ["Acme"])])
GENRES = ["Comedy", "Drama", "G0", "G1", "G2", "Thriller"]
BRANDS = ["Acme", "Zeta"]
# items 1..5 = p4 p1 p2 p5 p3: p4 has no feature row; p5's Drama is kept once; p1's rows add up
GENRE_ROWS = [[], [2, 1, 6], [], [2], [1]]
BRAND_ROWS = [[], [1], [2], [], [1]]


def write(folder: Path, kind: str, interactions=HAND + FILLER, features=FEATURES) -> dict:
    """interactions.<ext> and features.<ext> in one of the formats: csv, tsv, jsonl, semicolon
    (`.txt`, read with --delimiter ';'); the prep arguments that read them."""
    folder.mkdir(parents=True, exist_ok=True)
    ext = {"csv": "csv", "tsv": "tsv", "jsonl": "jsonl", "semicolon": "txt"}[kind]
    inter, feat = folder / f"interactions.{ext}", folder / f"features.{ext}"
    if kind == "jsonl":
        def uid(u):
            return int(u) if u.isdigit() and int(u) % 2 == 0 else u
        inter.write_text("".join(json.dumps({"user": uid(u), "item": i, "timestamp": t}) + "\n"
                                 for u, i, t in interactions))
        lines = []
        for item, genres, brands in features:
            obj = {"item": item, "genre": genres if len(genres) != 1 else genres[0]}
            if brands:
                obj["brand"] = brands[0]
            lines.append(json.dumps(obj) + "\n")
        feat.write_text("".join(lines))
    else:
        sep = {"csv": ",", "tsv": "\t", "semicolon": ";"}[kind]
        inter.write_text(sep.join(["user", "item", "timestamp"]) + "\n"
                         + "".join(sep.join(map(str, r)) + "\n" for r in interactions))
        feat.write_text(sep.join(["item", "genre", "brand"]) + "\n"
                        + "".join(sep.join([i, "|".join(g), "|".join(b)]) + "\n"
                                  for i, g, b in features))
    args = ["--interactions", str(inter), "--item-features", str(feat), "--name", "Mine"]
    return {"args": args + (["--delimiter", ";"] if kind == "semicolon" else []),
            "interactions": inter, "features": feat}


def prep(out: Path, *args: str) -> Dataset:
    assert main(["generic", *args, "--out", str(out)]) == 0
    assert main(["verify", str(out)]) == 0
    return Dataset(out)


def rows(csr, lo=1, hi=6):
    values, offsets = csr
    return [values[offsets[i]:offsets[i + 1]].tolist() for i in range(lo, hi)]


def sequences(ds: Dataset, lo=0, hi=None):
    items, offsets = ds.load_sequences(lo, hi)
    return [items[offsets[k]:offsets[k + 1]].tolist() for k in range(len(offsets) - 1)]


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl"])
def test_sequences_fields_and_id_maps(tmp_path, kind):
    ds = prep(tmp_path / "ds", *write(tmp_path / "raw", kind)["args"])
    assert ds.name == "Mine" and ds.num_users == 13 and ds.num_items == 125
    assert sequences(ds, 0, 3) == [[1, 2, 3, 4, 5], [2, 3, 5], [3, 2, 4]]
    assert sequences(ds, 3, 4) == [list(range(6, 30))]       # user "0": x000..x023
    assert ds.load_sequences(0, 1)[0].dtype.name == "int32"
    assert [(f.name, f.num_attributes) for f in ds.attribute_fields] == [("genre", 6), ("brand", 2)]
    assert rows(ds.field_attributes("genre")) == GENRE_ROWS
    assert rows(ds.field_attributes("brand")) == BRAND_ROWS
    assert rows(ds.field_attributes("genre"), 6, 9) == [[3], [4], [5]]    # x000 x001 x002
    assert ds.num_attributes == 8 and ds.num_interactions == len(HAND) + len(FILLER)
    maps = json.loads((tmp_path / "ds" / "id_maps.json").read_text())
    assert maps["users"] == ["u1", "u2", "u3"] + [str(k) for k in range(10)]
    assert maps["items"][:6] == ["p4", "p1", "p2", "p5", "p3", "x000"] and len(maps["items"]) == 125
    assert maps["attribute_fields"] == {"genre": GENRES, "brand": BRANDS}
    with h5py.File(tmp_path / "ds" / "shard-00000.h5") as f:   # user ids: 1.. like Amazon's
        assert f["seq/user_ids"][:].tolist() == list(range(1, 14))


def test_merge_fields_is_one_field_equal_to_the_union(tmp_path):
    raw = write(tmp_path / "raw", "csv")
    fields, merged = prep(tmp_path / "f", *raw["args"]), prep(tmp_path / "m", *raw["args"],
                                                             "--merge-fields")
    assert [(f.name, f.num_attributes) for f in merged.attribute_fields] == [("attributes", 8)]
    # the fields' ids stacked: brand's after genre's 6, so each item's set is the union
    assert rows(merged.field_attributes("attributes")) == [[], [2, 1, 6, 7], [8], [2], [1, 7]]
    for a, b in zip(merged.item_attributes(), fields.item_attributes()):
        assert a.tolist() == b.tolist()
    maps = json.loads((tmp_path / "m" / "id_maps.json").read_text())
    assert maps["attribute_fields"] == {
        "attributes": [["genre", g] for g in GENRES] + [["brand", b] for b in BRANDS]}


def test_fields_picks_columns_and_no_features_gives_none(tmp_path):
    raw = write(tmp_path / "raw", "csv")
    ds = prep(tmp_path / "b", *raw["args"], "--fields", "brand")
    assert [(f.name, f.num_attributes) for f in ds.attribute_fields] == [("brand", 2)]
    assert rows(ds.field_attributes("brand")) == BRAND_ROWS
    bare = prep(tmp_path / "n", "--interactions", str(raw["interactions"]))
    assert bare.num_attributes == 0 and rows(bare.item_attributes()) == [[]] * 5
    assert bare.name == "interactions"


def shard_content(folder: Path) -> list:
    """Every array and attribute of every shard but the ones naming the inputs."""
    out = []
    for shard in sorted(folder.glob("shard-*.h5")):
        with h5py.File(shard) as f:
            f.visititems(lambda name, obj: out.append((name, obj[()].tolist()))
                         if isinstance(obj, h5py.Dataset) else None)
            out += [(k, v) for k, v in sorted(f.attrs.items()) if k not in ("command", "sources")]
    return out


def manifest_content(folder: Path) -> dict:
    m = read_json(folder / "manifest.json")
    for k in ("sources", "command"):
        m.pop(k)
    for rec in m["shards"]:
        rec.pop("sha256"), rec.pop("bytes")
    return m


def test_csv_tsv_jsonl_and_any_delimiter_give_the_same_dataset(tmp_path):
    outs = {}
    for kind in ("csv", "tsv", "jsonl", "semicolon"):
        outs[kind] = tmp_path / kind
        args = write(tmp_path / f"raw-{kind}", kind)["args"]
        assert main(["generic", *args, "--shards", "2", "--out", str(outs[kind])]) == 0
    base = outs.pop("csv")
    for kind, out in outs.items():
        assert shard_content(out) == shard_content(base), kind
        if kind != "semicolon":        # its args hold --delimiter
            assert manifest_content(out) == manifest_content(base), kind
        assert (out / "id_maps.json").read_bytes() == (base / "id_maps.json").read_bytes()
    assert set(read_json(base / "manifest.json")["sources"]) == {"interactions", "item_features"}


def test_iso_timestamps_sort_like_their_epoch_seconds(tmp_path):
    from datetime import datetime, timezone
    iso = [(u, i, datetime.fromtimestamp(t, timezone.utc).isoformat()) for u, i, t in HAND + FILLER]
    iso[0] = ("u1", "p3", "1970-01-01T01:00:30+01:00")     # = 30 s, given in another zone
    iso[1] = ("u1", "p1", "1970-01-01 00:00:10")            # no zone: UTC
    a = prep(tmp_path / "iso", *write(tmp_path / "raw-iso", "csv", interactions=iso)["args"])
    b = prep(tmp_path / "num", *write(tmp_path / "raw-num", "csv")["args"])
    assert sequences(a) == sequences(b)


def test_user_and_item_core_reuse_the_k_core(tmp_path):
    short = HAND + FILLER + [("z", "p1", 7), ("z", "p2", 8)]
    raw = write(tmp_path / "raw", "csv", interactions=short)
    ds = prep(tmp_path / "ds", *raw["args"], "--user-core", "3", "--item-core", "2")
    # z (2 items) goes; p4 (only u1's) goes: items p1=1 p2=2 p5=3 p3=4
    assert sequences(ds, 0, 3) == [[1, 2, 3, 4], [1, 2, 4], [2, 1, 3]]
    maps = json.loads((tmp_path / "ds" / "id_maps.json").read_text())
    assert "z" not in maps["users"] and maps["items"][:4] == ["p1", "p2", "p5", "p3"]
    assert read_json(tmp_path / "ds" / "manifest.json")["args"]["user_core"] == 3


# ---------------------------------------------------------------- bad input

def edit_line(path: Path, lineno: int, text: str | bytes, replace: bool = False) -> None:
    """Insert (or replace) line `lineno` (1-based) of the file."""
    lines = path.read_bytes().split(b"\n")
    new = text if isinstance(text, bytes) else text.encode()
    lines[lineno - 1:lineno - 1 + replace] = [new]
    path.write_bytes(b"\n".join(lines))


def bad_csv(path: Path, text):
    return lambda raw: edit_line(raw[path], 4, text)


INTERACTIONS_CSV = [
    ("missing header", lambda r: edit_line(r["interactions"], 1, "u9,p1,5", replace=True),
     "interactions.csv:1: no column 'user' in the header"),
    ("missing column", lambda r: edit_line(r["interactions"], 1, "user,item,time", replace=True),
     "interactions.csv:1: no column 'timestamp'"),
    ("empty file", lambda r: r["interactions"].write_text("\n\n"),
     "interactions.csv: empty file (expected a header line naming the columns user, item"),
    ("header only", lambda r: r["interactions"].write_text("user,item,timestamp\n"),
     "interactions.csv: no rows after the header"),
    ("wrong column count", bad_csv("interactions", "u1,p1"),
     "interactions.csv:4: 2 columns, the header has 3"),
    ("non-numeric time", bad_csv("interactions", "u1,p1,soon"),
     "interactions.csv:4: 'timestamp' = \"soon\": expected a number or an ISO 8601"),
    ("unparsable date", bad_csv("interactions", "u1,p1,2023-13-45"),
     "interactions.csv:4: 'timestamp' = \"2023-13-45\""),
    ("infinite time", bad_csv("interactions", "u1,p1,1e999"),
     "interactions.csv:4: 'timestamp' = \"1e999\""),
    ("a date among numbers", bad_csv("interactions", "u1,p1,2023-01-01"),
     "interactions.csv:4: 'timestamp' is a date, but on line 2 a number"),
    ("empty user", bad_csv("interactions", " ,p1,5"), "interactions.csv:4: 'user' is empty"),
    ("empty item", bad_csv("interactions", "u1,,5"), "interactions.csv:4: 'item' is empty"),
    ("bad quoting", bad_csv("interactions", 'u1,"p"1,5'), "interactions.csv:4: malformed line"),
    ("not UTF-8", bad_csv("interactions", b"u1,p\xff1,5"),
     "interactions.csv:4: not UTF-8 text (byte"),
    ("user with 2 interactions", lambda r: r["interactions"].write_text(
        r["interactions"].read_text() + "z,p1,1\nz,p2,2\n"),
     f"interactions.csv:{len(HAND + FILLER) + 2}: user 'z' (first on this line) has 2 "
     f"interactions after filtering, and every user needs 3"),
]
FEATURES_CSV = [
    ("no item column", lambda r: edit_line(r["features"], 1, "id,genre,brand", replace=True),
     "features.csv:1: no column 'item' in the header"),
    ("wrong column count", bad_csv("features", "p9,Drama"),
     "features.csv:4: 2 columns, the header has 3"),
    ("empty item", bad_csv("features", ",Drama,Acme"), "features.csv:4: 'item' is empty"),
    ("column twice", lambda r: edit_line(r["features"], 1, "item,genre,genre", replace=True),
     "features.csv:1: column 'genre' twice in the header"),
    ("bad field name", lambda r: edit_line(r["features"], 1, "item,genre name,brand", replace=True),
     "features.csv:1: field 'genre name' cannot name an attribute field"),
    ("not UTF-8", bad_csv("features", b"p9,Dr\xc3ama,Acme"), "features.csv:4: not UTF-8 text"),
    ("empty file", lambda r: r["features"].write_text(""), "features.csv: empty file"),
]
JSONL = [
    ("bad JSON", lambda r: edit_line(r["interactions"], 4, '{"user": "u1", "item": '),
     "interactions.jsonl:4: not valid JSON (column"),
    ("not an object", lambda r: edit_line(r["interactions"], 4, '["u1", "p1", 5]'),
     "interactions.jsonl:4: expected a JSON object"),
    ("missing key", lambda r: edit_line(r["interactions"], 4, '{"user": "u1", "item": "p1"}'),
     "interactions.jsonl:4: no key 'timestamp'"),
    ("NaN time", lambda r: edit_line(r["interactions"], 4,
                                     '{"user": "u1", "item": "p1", "timestamp": NaN}'),
     "interactions.jsonl:4: NaN is not a number"),
    ("boolean time", lambda r: edit_line(r["interactions"], 4,
                                         '{"user": "u1", "item": "p1", "timestamp": true}'),
     "interactions.jsonl:4: 'timestamp' = true"),
    ("float id", lambda r: edit_line(r["interactions"], 4,
                                     '{"user": "u1", "item": 1.5, "timestamp": 5}'),
     "interactions.jsonl:4: 'item': expected a string or an integer id"),
    ("key twice", lambda r: edit_line(r["interactions"], 4,
                                      '{"user": "u1", "user": "u2", "item": "p", "timestamp": 5}'),
     "interactions.jsonl:4: key 'user' appears twice in one mapping"),
    ("nested feature", lambda r: edit_line(r["features"], 4, '{"item": "p9", "genre": [["a"]]}'),
     "features.jsonl:4: 'genre': expected a value or a list of values"),
    ("feature line not an object", lambda r: edit_line(r["features"], 4, '"p9"'),
     "features.jsonl:4: expected a JSON object"),
    ("feature line without item", lambda r: edit_line(r["features"], 4, '{"genre": "a"}'),
     "features.jsonl:4: no key 'item'"),
]


def assert_refused(tmp_path: Path, capsys, args: list[str], message: str) -> None:
    """Exit 1 with one line naming `message`; nothing written beside the raw files."""
    out = tmp_path / "ds"
    assert main(["generic", *args, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1 and err.startswith("s3rec-prep generic: error: ")
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]


@pytest.mark.parametrize("case,damage,message", INTERACTIONS_CSV + FEATURES_CSV,
                         ids=[f"csv-{c[0]}" for c in INTERACTIONS_CSV + FEATURES_CSV])
def test_bad_delimited_input_names_file_and_line(tmp_path, capsys, case, damage, message):
    raw = write(tmp_path / "raw", "csv")
    damage(raw)
    assert_refused(tmp_path, capsys, raw["args"], message)


@pytest.mark.parametrize("case,damage,message", JSONL, ids=[f"jsonl-{c[0]}" for c in JSONL])
def test_bad_json_lines_name_file_and_line(tmp_path, capsys, case, damage, message):
    raw = write(tmp_path / "raw", "jsonl")
    damage(raw)
    assert_refused(tmp_path, capsys, raw["args"], message)


@pytest.mark.parametrize("kind,extra,message", [
    ("csv", ["--fields", "genre,colour"],
     "features.csv:1: --fields names 'colour', which is not a column (fields there: 'genre', "
     "'brand')"),
    ("jsonl", ["--fields", "colour"],
     "features.jsonl: --fields names 'colour', which is not a key of any line"),
    ("csv", ["--fields", "genre,genre"], "--fields 'genre,genre': expected distinct column names"),
    ("csv", ["--fields", "item"], "--fields names 'item', the item column"),
    ("csv", ["--delimiter", "::"], "--delimiter '::': expected one character"),
])
def test_bad_options_name_the_option_and_file(tmp_path, capsys, kind, extra, message):
    assert_refused(tmp_path, capsys, write(tmp_path / "raw", kind)["args"] + extra, message)


def test_missing_files_and_unknown_formats_are_named(tmp_path, capsys):
    raw = write(tmp_path / "raw", "csv")
    assert_refused(tmp_path, capsys, ["--interactions", str(tmp_path / "raw" / "nope.csv")],
                   "nope.csv: not found (--interactions)")
    assert_refused(tmp_path, capsys, raw["args"][:2] + ["--item-features",
                                                        str(tmp_path / "raw" / "f.csv")],
                   "f.csv: not found (--item-features)")
    txt = raw["interactions"].with_suffix(".txt")
    txt.write_text(raw["interactions"].read_text())
    assert_refused(tmp_path, capsys, ["--interactions", str(txt)],
                   "interactions.txt: cannot tell the format from the name; name it .csv, .tsv "
                   "or .jsonl, or give --delimiter")


def test_a_field_without_values_for_the_dataset_is_refused(tmp_path, capsys):
    only_q = [(i, g, ["Nope"] if i == "q" else []) for i, g, _ in FEATURES]
    raw = write(tmp_path / "raw", "csv", features=only_q)
    assert_refused(tmp_path, capsys, raw["args"],
                   "features.csv: field 'brand' has no value for any item of the dataset")


def test_a_failed_run_leaves_the_dataset_there_as_it_was(tmp_path, capsys):
    raw = write(tmp_path / "raw", "csv")
    out = tmp_path / "ds"
    prep(out, *raw["args"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    edit_line(raw["interactions"], 4, "u1,p1,soon")
    assert main(["generic", *raw["args"], "--out", str(out)]) == 1
    assert "interactions.csv:4:" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "raw"]   # no .ds.partial


def test_verify_and_up_to_date_check_the_id_maps(tmp_path, capsys):
    raw = write(tmp_path / "raw", "csv")
    out = tmp_path / "ds"
    prep(out, *raw["args"])
    assert main(["generic", *raw["args"], "--out", str(out)]) == 0
    assert "up to date" in capsys.readouterr().out
    (out / "id_maps.json").write_text('{"users": []}\n')
    assert main(["verify", str(out)]) == 1
    assert "id_maps.json: size or sha256 differs from the manifest" in capsys.readouterr().err
    assert main(["generic", *raw["args"], "--out", str(out)]) == 0     # rebuilt
    assert main(["verify", str(out)]) == 0


# ---------------------------------------------------------------- trains

@pytest.mark.multiproc
def test_a_generic_dataset_verifies_pretrains_and_finetunes(tmp_path):
    raw = write(tmp_path / "raw", "jsonl")
    data, pre, fine = tmp_path / "data", tmp_path / "pre", tmp_path / "fine"
    run(["s3rec-prep", "generic", *raw["args"], "--shards", "2", "--out", str(data)])
    p = run(["s3rec-prep", "verify", str(data)])
    assert p.stdout.strip() == "users=13 items=125 interactions=251 attributes=8 shards=2"
    run(command("single", "s3rec.pretrain", train_args(data, pre, "pretrain.epochs=1",
                                                       "logging.every_steps=1")))
    assert read_json(pre / "run.json")["status"] == "done"
    tags = set(scalars(pre))        # each feature field has its own heads and losses
    assert {"loss/aap.genre", "loss/aap.brand", "loss/map.genre", "loss/map.brand"} <= tags
    run(command("single", "s3rec.finetune", train_args(data, fine, "finetune.epochs=1")
                + ["--init", str(pre / "final.pt")]))
    assert read_json(fine / "run.json")["status"] == "done"
    results = read_json(fine / "results.json")
    assert 0 <= results["test"]["HR@10"] <= 1
    assert {"attribute_embeddings_genre", "attribute_embeddings_brand"} <= set(results["params"])
    assert not subprocess.run(["s3rec-prep", "verify", str(data)], capture_output=True).returncode

    # the top-K of s3rec-evaluate, translated back to the file's own ids through id_maps.json
    run(["s3rec-evaluate", "--data", str(data), "--model", str(fine), "--protocol", "full",
         "--topk", "3"])
    with np.load(fine / "evaluation" / "full-test-top3.npz", allow_pickle=False) as top:
        users, items, user_ids, item_ids = (top[k] for k in ("users", "items", "user_ids",
                                                            "item_ids"))
    maps = read_json(data / "id_maps.json")
    ds = Dataset(data)
    assert user_ids.tolist() == [maps["users"][n - 1] for n in ds.load_user_ids()]
    assert user_ids[:3].tolist() == ["u1", "u2", "u3"] and len(user_ids) == len(users) == 13
    assert item_ids.tolist() == [[maps["items"][i - 1] for i in row] for row in items.tolist()]
    # each user's items in the file: the ranking leaves out all but the test answer
    seen = {u: {i for v, i, _ in HAND + FILLER if v == u} for u in user_ids.tolist()}
    for u, row in zip(user_ids.tolist(), item_ids.tolist()):
        assert len(set(row)) == 3 and len(set(row) & seen[u]) <= 1, (u, row)


def test_a_failed_id_maps_write_is_one_line_and_leaves_no_temporary(tmp_path):
    from s3rec.data.format import DatasetError
    from s3rec.data_prep.id_maps import write_id_maps
    (tmp_path / "id_maps.json").mkdir()      # the rename onto it fails once the file is written
    with pytest.raises(DatasetError) as e:
        write_id_maps(tmp_path, "{}\n")
    line = str(e.value)
    assert line.startswith(f"{tmp_path / 'id_maps.json'}: cannot write: ") and \
        line.endswith(" there") and "MiB free of" in line and line.count("cannot write") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["id_maps.json"]
