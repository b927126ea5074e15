"""Authors' checkpoints in and out; project model files; the s3rec-import-original CLI."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from s3rec.config import Config, load_config
from s3rec.import_original import main as cli_main
from s3rec.model import (CheckpointError, build_model, export_original, import_original,
                         load_model_file, save_model_file)

REPO = Path(__file__).resolve().parents[1]
BEAUTY_CKPT = REPO.parent / "shared" / "reference" / "Beauty-epochs-150.pt"
need_beauty = pytest.mark.skipif(not BEAUTY_CKPT.is_file(),
                                 reason=f"authors' checkpoint not found at {BEAUTY_CKPT}")
INFO = {"name": "toy", "num_users": 7, "num_items": 38, "num_attributes": 6}


def toy_model(cfg=None, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg or Config(), 40, 7)


def test_round_trip_full_heads():
    model = toy_model()
    exported = export_original(model)
    state = import_original(exported, Config(), 40, 7)
    assert list(state) == list(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), k


def test_lowrank_heads_export_product_and_import_by_svd():
    cfg = load_config(overrides=["variant=s3rec-lowrank", "model.head_rank=64",
                                 "model.heads.aap.init=svd", "model.heads.map.init=svd",
                                 "model.svd_init_from=unused.pt"])
    full = toy_model()
    authors = export_original(full)
    state = import_original(authors, cfg, 40, 7)       # rank 64 = d: SVD is exact
    lr = build_model(cfg, 40, 7, init_state=state)
    assert "aap_norm.U" in state and "aap_norm.weight" not in state
    assert torch.allclose(lr.aap_norm.matrix(), full.aap_norm.weight, atol=1e-5)
    assert torch.equal(lr.map_norm.bias, full.map_norm.bias)
    back = export_original(lr)
    assert set(back) == set(authors)
    assert torch.allclose(back["aap_norm.weight"], authors["aap_norm.weight"], atol=1e-5)
    # a low-rank state into a full-head model: the product
    again = import_original(state, Config(), 40, 7)
    assert torch.allclose(again["map_norm.weight"], authors["map_norm.weight"], atol=1e-5)


def test_lowrank_non_svd_head_keeps_fresh_factors():
    cfg = load_config(overrides=["variant=s3rec-lowrank", "model.head_rank=4"])
    authors = export_original(toy_model())
    torch.manual_seed(9)
    state = import_original(authors, cfg, 40, 7)
    assert state["aap_norm.U"].shape == (64, 4) and state["aap_norm.U"].abs().sum() > 0
    assert torch.equal(state["item_embeddings.weight"], authors["item_embeddings.weight"])


def test_shape_mismatch_names_key_shapes_and_sizes():
    authors = export_original(toy_model())
    with pytest.raises(CheckpointError) as e:
        import_original(authors, Config(), 41, 7)
    msg = str(e.value)
    assert "item_embeddings.weight" in msg and "[41, 64]" in msg and "[40, 64]" in msg
    assert "item_size=41" in msg and "item_size=40" in msg


def test_missing_and_unexpected_keys():
    authors = export_original(toy_model())
    broken = dict(authors)
    del broken["sp_norm.bias"]
    broken["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"sp_norm\.bias.*extra\.weight"):
        import_original(broken, Config(), 40, 7)


def test_model_file_atomic_and_refuses_other_dataset(tmp_path):
    model = toy_model()
    path = save_model_file(tmp_path / "final.pt", model, Config(), INFO)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.pt"]   # no temporary left
    obj = torch.load(path, weights_only=True)
    assert set(obj) == {"model", "config", "dataset"} and obj["dataset"] == INFO
    state = load_model_file(path, Config(), INFO)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with pytest.raises(CheckpointError, match="num_items=38.*num_items=39"):
        load_model_file(path, Config(), dict(INFO, num_items=39))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model_file(tmp_path / "nope.pt", Config(), INFO)
    torch.save(model.state_dict(), tmp_path / "raw.pt")
    with pytest.raises(CheckpointError, match="s3rec-import-original"):
        load_model_file(tmp_path / "raw.pt", Config(), INFO)


@need_beauty
def test_authors_beauty_checkpoint_imports_exactly():
    sd = torch.load(BEAUTY_CKPT, map_location="cpu", weights_only=True)
    state = import_original(sd, Config(), 12103, 638)
    assert list(state) == list(sd)
    assert all(torch.equal(state[k], sd[k]) for k in sd)
    model = build_model(Config(), 12103, 638, init_state=sd).eval()
    out = model.encode(torch.tensor([[0, 0, 5, 17, 42]]), torch.arange(45, 50)[None], causal=True)
    assert torch.isfinite(out).all()
    assert all(torch.equal(v, sd[k]) for k, v in export_original(model).items())
    with pytest.raises(CheckpointError, match="attribute_embeddings.weight.*attribute_size=390"):
        import_original(sd, Config(), 12103, 390)


def _prep(tmp_path, name, items, attrs):
    out = tmp_path / name
    subprocess.run([sys.executable, "-m", "s3rec.data_prep.cli", "synthetic", "--users", "12",
                    "--items", str(items), "--attributes", str(attrs), "--out", str(out)],
                   check=True, capture_output=True)
    return out


@need_beauty
def test_cli_import_export_with_real_dataset_folders(tmp_path, capsys):
    ds = _prep(tmp_path, "beauty-sized", 12101, 637)
    out = tmp_path / "imported.pt"
    assert cli_main([str(BEAUTY_CKPT), "--data", str(ds), "--out", str(out)]) == 0
    obj = torch.load(out, weights_only=True)
    assert obj["dataset"]["num_items"] == 12101 and obj["config"]["variant"] == "s3rec"
    back = tmp_path / "authors.pt"
    assert cli_main([str(out), "--export", "--out", str(back)]) == 0
    sd, exp = torch.load(BEAUTY_CKPT, weights_only=True), torch.load(back, weights_only=True)
    assert list(exp) == list(sd) and all(torch.equal(exp[k], sd[k]) for k in sd)
    # low-rank import by SVD through key=value overrides
    lr = tmp_path / "lowrank.pt"
    assert cli_main([str(BEAUTY_CKPT), "--data", str(ds), "--out", str(lr),
                     "variant=s3rec-lowrank", "model.head_rank=8", "model.heads.aap.init=svd",
                     "model.heads.map.init=svd", f"model.svd_init_from={BEAUTY_CKPT}"]) == 0
    assert torch.load(lr, weights_only=True)["model"]["aap_norm.U"].shape == (64, 8)
    # another dataset's sizes: exit 2, the message names the key and both shapes
    small = _prep(tmp_path, "small", 150, 9)
    capsys.readouterr()
    assert cli_main([str(BEAUTY_CKPT), "--data", str(small), "--out",
                     str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert "item_embeddings.weight" in err and "[152, 64]" in err and "[12103, 64]" in err
    assert not (tmp_path / "x.pt").exists()


def test_cli_export_of_a_damaged_file_or_unwritable_out_is_an_error_line(tmp_path, capsys):
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"\x80\x02not a pickle at all")
    assert cli_main([str(damaged), "--export", "--out", str(tmp_path / "a.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("s3rec-import-original: error: model file ") and "damaged.pt" in err
    assert not (tmp_path / "a.pt").exists()
    good = save_model_file(tmp_path / "good.pt", toy_model(), Config(), INFO)
    (tmp_path / "afile").write_text("")
    assert cli_main([str(good), "--export", "--out", str(tmp_path / "afile" / "a.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("s3rec-import-original: error: ") and "afile" in err


def test_console_script_is_installed(tmp_path):
    r = subprocess.run(["s3rec-import-original", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--export" in r.stdout
