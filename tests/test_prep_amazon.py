"""s3rec-prep amazon: the S3Rec preprocessing of raw Amazon 2014 dumps on a hand-checked fixture."""
import pytest

from s3rec.data_prep.cli import main
from s3rec.data_prep.fixtures import write_amazon
from s3rec.data.reader import Dataset


def review(user, item, t, overall=5.0):
    return {"reviewerID": user, "asin": item, "unixReviewTime": t, "overall": overall,
            "reviewText": "fine"}


def fixture_reviews():
    r = [review("u1", "p3", 30), review("u1", "p1", 10), review("u1", "p2", 20),
         review("u1", "p5", 20), review("u1", "p4", 5), review("u1", "q", 40)]
    for u in ("u2", "u3", "u4", "u5"):
        r += [review(u, p, t) for t, p in enumerate(["p1", "p2", "p3", "p4", "p5"], 1)]
    r += [review(u, "q", 100) for u in ("u2", "u3", "u4")]
    # u6 has 5 reviews, one of r1 (4 reviews in all): r1 goes, then u6 (4 left), then q (4 left)
    r += [review("u6", i, t) for t, i in enumerate(["q", "r1", "p1", "p2", "p3"])]
    r += [review(u, "r1", 1) for u in ("u7", "u8", "u9")]
    # u10's fifth review has rating 0, which the original drops: u10 then has 4 and goes
    r += [review("u10", p, 1) for p in ("p1", "p2", "p3", "p4")] + [review("u10", "p5", 2, 0.0)]
    return r


META = [
    {"asin": "p3", "categories": [["Beauty", "Skin", "Face"]], "brand": "Acme", "title": "it's"},
    {"asin": "q", "categories": [["Beauty", "Gone"]]},
    {"asin": "p1", "categories": [["Beauty", "Hair"], ["Beauty", "Skin"]]},
    {"asin": "p2", "categories": [["Beauty"]], "brand": ""},
    {"asin": "p4", "categories": [["Beauty", "Skin"], ["Beauty", "Skin"]], "brand": "Acme"},
    {"asin": "p5", "categories": [["Beauty", "Nails"]], "price": 3.5},
    {"asin": "r1", "categories": [["Beauty", "Other"]]},
]


def test_too_few_items_for_negatives(tmp_path, capsys):
    reviews, meta = write_amazon(tmp_path / "raw", "Toy", fixture_reviews(), META)
    out = tmp_path / "ds"
    assert main(["amazon", "--reviews", str(reviews), "--meta", str(meta), "--out", str(out)]) == 1
    assert "only 5 distinct items" in capsys.readouterr().err
    assert not out.exists()


def big_fixture():
    """The hand-checked users above plus 250 filler items, each reviewed by 5 of 10 filler users,
    so that 99 negatives exist; filler reviews come after the checked ones in the file."""
    reviews, meta = fixture_reviews(), list(META)
    for k in range(250):
        for j in range(5):
            reviews.append(review(f"f{(k + j) % 10}", f"x{k:03d}", 1000 + k))
        meta.append({"asin": f"x{k:03d}", "categories": [["Beauty", f"C{k % 3}"]]})
    return reviews, meta


def test_amazon_kcore_order_ids_and_attributes(tmp_path):
    reviews, meta = write_amazon(tmp_path / "raw", "Toy", *big_fixture())
    out = tmp_path / "ds"
    assert main(["amazon", "--reviews", str(reviews), "--meta", str(meta), "--out", str(out),
                 "--merge-fields"]) == 0      # the paper's one vocabulary
    ds = Dataset(out)
    assert ds.name == "Toy"
    # users u1..u5 then f0..f4 (u6..u10 removed); items by first appearance: p4 p1 p2 p5 p3 x...
    assert ds.num_users == 15 and ds.num_items == 255
    items, offsets = ds.load_sequences(0, 5)
    seqs = [items[offsets[k]:offsets[k + 1]].tolist() for k in range(5)]
    assert seqs[0] == [1, 2, 3, 4, 5]           # u1 sorted by time, tie p2/p5 kept in file order
    assert seqs[1:] == [[2, 3, 5, 1, 4]] * 4    # q removed after u6 left (a 3-pass cascade)
    assert sorted(set(ds.load_sequences(5, 15)[0].tolist())) == list(range(6, 256))
    assert ds.manifest["shards"][0]["user_end"] == 15
    values, aoff = ds.item_attributes()
    attrs = [values[aoff[i]:aoff[i + 1]].tolist() for i in range(1, 6)]
    # attribute ids in meta-file order: Acme=1 Skin=2 Face=3 (p3), Hair=4 (p1), ''=5 (p2), Nails=6
    assert attrs == [[1, 2, 2], [4, 2], [5], [6], [1, 2, 3]]
    assert ds.num_attributes == 9               # + C0 C1 C2 of the filler
    assert ds.num_interactions == 5 * 5 + 5 * 250


def assert_refused(tmp_path, capsys, reviews, meta, message):
    """s3rec-prep amazon exits 1 naming `message`, and writes nothing beside the raw files."""
    out = tmp_path / "ds"
    assert main(["amazon", "--reviews", str(reviews), "--meta", str(meta), "--out", str(out)]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["raw"]


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "fields"])
def test_amazon_id_maps_name_every_number(tmp_path, merge):
    """id_maps.json gives back each user's reviewer id, each item's ASIN and each attribute's
    name: every item's attributes, read through it, are its meta record's brand and categories."""
    import json
    reviews, meta = write_amazon(tmp_path / "raw", "Toy", *big_fixture())
    out = tmp_path / "ds"
    assert main(["amazon", "--reviews", str(reviews), "--meta", str(meta), "--out", str(out)]
                + (["--merge-fields"] if merge else [])) == 0
    assert main(["verify", str(out)]) == 0
    ds = Dataset(out)
    maps = json.loads((out / "id_maps.json").read_text())
    assert ds.manifest["id_maps"]["file"] == "id_maps.json"
    assert maps["users"][:5] == ["u1", "u2", "u3", "u4", "u5"] and len(maps["users"]) == 15
    assert maps["items"][:5] == ["p4", "p1", "p2", "p5", "p3"] and len(maps["items"]) == 255
    by_asin = {m["asin"]: m for m in big_fixture()[1]}
    values, aoff = ds.item_attributes()
    for item in range(1, ds.num_items + 1):
        info = by_asin[maps["items"][item - 1]]
        cats = {c for path in info["categories"] for c in path[1:]}
        brand = {info["brand"]} if "brand" in info else set()
        ids = values[aoff[item]:aoff[item + 1]].tolist()
        if merge:
            names = {maps["attribute_fields"]["attributes"][a - 1] for a in ids}
            assert names == cats | brand, item
        else:
            n_cats = len(maps["attribute_fields"]["categories"])
            got_cats = {maps["attribute_fields"]["categories"][a - 1] for a in ids if a <= n_cats}
            got_brand = {maps["attribute_fields"]["brand"][a - n_cats - 1] for a in ids
                         if a > n_cats}
            assert (got_cats, got_brand) == (cats, brand), item


@pytest.mark.parametrize("where,line,message", [
    ("reviews", '{"reviewerID": "u1", "asin": "p1"}\n', "reviews_Toy_5.json.gz:3: malformed review"),
    ("meta", "{'asin': 'p1', 'categories': [['Beauty'\n", "meta_Toy.json.gz:3: malformed meta record"),
    # a key twice: json.loads and literal_eval would keep the last, silently
    ("reviews", '{"reviewerID": "u1", "asin": "p1", "asin": "p2", "unixReviewTime": 5}\n',
     "reviews_Toy_5.json.gz:3: malformed review (need JSON with string reviewerID and asin, "
     "integer unixReviewTime, numeric overall): DuplicateKey(\"key 'asin' appears twice in one "
     "mapping; only one value can be meant, and the reader would silently keep the last\")"),
    ("meta", "{'asin': 'p1', 'brand': 'a', 'brand': 'b'}\n",
     "meta_Toy.json.gz:3: malformed meta record (need a Python dict literal with a string "
     "'asin'): DuplicateKey(\"key 'brand' appears twice in one mapping"),
    ("meta", "{'asin': 'p1', 'related': {'x': [], 'x': []}}\n", "'x' appears twice in one mapping"),
], ids=["reviews-truncated", "meta-truncated", "reviews-key-twice", "meta-key-twice",
        "meta-nested-key-twice"])
def test_amazon_malformed_lines(tmp_path, capsys, where, line, message):
    import gzip
    reviews, meta = write_amazon(tmp_path / "raw", "Toy", *big_fixture())
    path = reviews if where == "reviews" else meta
    lines = gzip.open(path, "rt").readlines()
    lines.insert(2, line)
    with gzip.open(path, "wt") as f:
        f.writelines(lines)
    assert_refused(tmp_path, capsys, reviews, meta, message)


def test_amazon_item_without_meta(tmp_path, capsys):
    r, m = big_fixture()
    reviews, meta = write_amazon(tmp_path / "raw", "Toy", r, [x for x in m if x["asin"] != "p5"])
    assert_refused(tmp_path, capsys, reviews, meta, "meta_Toy.json.gz: item p5 has no meta record")


@pytest.mark.parametrize("damage,message", [
    ("plain", "reviews_Toy_5.json.gz: unreadable at line 1 (need gzip-compressed UTF-8 text"),
    ("truncated", "reviews_Toy_5.json.gz: unreadable at line"),
    ("overall", "reviews_Toy_5.json.gz:3: malformed review"),
    ("list_id", "reviews_Toy_5.json.gz:3: malformed review"),
])
def test_amazon_unreadable_or_mistyped_reviews(tmp_path, capsys, damage, message):
    """Damage that surfaces while reading (not gzip, cut short) or in a field's type: an error
    naming the file (and line), nothing written."""
    import gzip
    import json
    r, m = big_fixture()
    if damage == "overall":
        r[2] = dict(r[2], overall="five")
    if damage == "list_id":
        r[2] = dict(r[2], reviewerID=["u1"])
    reviews, meta = write_amazon(tmp_path / "raw", "Toy", r, m)
    if damage == "plain":
        reviews.write_text("".join(json.dumps(x) + "\n" for x in r))
    if damage == "truncated":
        data = reviews.read_bytes()
        reviews.write_bytes(data[: len(data) // 2])
    assert_refused(tmp_path, capsys, reviews, meta, message)


def test_amazon_category_entries_must_be_strings(tmp_path, capsys):
    r, m = big_fixture()
    m = [dict(x, categories=[["Beauty", ["nested"]]]) if x["asin"] == "p1" else x for x in m]
    reviews, meta = write_amazon(tmp_path / "raw", "Toy", r, m)
    assert_refused(tmp_path, capsys, reviews, meta,
                   "item p1: 'categories' must be a list of lists of strings")


def test_inputs_with_one_file_name_are_both_checksummed(tmp_path, capsys):
    """reviews/Beauty.json.gz and meta/Beauty.json.gz: a changed reviews file rebuilds the dataset
    (the checksums are keyed by role, not by file name)."""
    import shutil
    reviews, meta = write_amazon(tmp_path / "raw", "Toy", *big_fixture())
    (tmp_path / "reviews").mkdir(), (tmp_path / "meta").mkdir()
    r2, m2 = tmp_path / "reviews" / "Toy.json.gz", tmp_path / "meta" / "Toy.json.gz"
    shutil.copy(reviews, r2), shutil.copy(meta, m2)
    out = tmp_path / "ds"
    args = ["amazon", "--name", "Toy", "--reviews", str(r2), "--meta", str(m2), "--out", str(out)]
    assert main(args) == 0
    assert set(Dataset(out).manifest["sources"]) == {"reviews", "meta"}
    before = Dataset(out).manifest["sources"]
    r, m = big_fixture()                 # the reviews file changes (a review rated 0, dropped)
    write_amazon(tmp_path / "raw2", "Toy", r + [review("u1", "p9", 9999, overall=0.0)], m)
    shutil.copy(tmp_path / "raw2" / reviews.name, r2)
    capsys.readouterr()
    assert main(args) == 0
    assert "source files changed" in capsys.readouterr().out
    after = Dataset(out).manifest["sources"]
    assert after["reviews"] != before["reviews"] and after["meta"] == before["meta"]


def test_negative_seed_is_refused_by_the_parser(tmp_path, capsys):
    reviews, meta = write_amazon(tmp_path / "raw", "Toy", *big_fixture())
    with pytest.raises(SystemExit) as e:
        main(["amazon", "--reviews", str(reviews), "--meta", str(meta), "--out",
              str(tmp_path / "ds"), "--seed", "-1"])
    assert e.value.code == 2
    assert "argument --seed: -1 is negative; expected an integer >= 0" in capsys.readouterr().err
