"""A two-field dataset through the real commands: per-field losses logged, a low-rank head on one
field, the fine-tune starting from those weights, and a config naming a field the data lacks."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.train_helpers import REPO, clean_env, command, read_json, run, scalars, train_args


@pytest.fixture(scope="module")
def two_fields(tmp_path_factory):
    out = tmp_path_factory.mktemp("fields") / "two"
    subprocess.run([sys.executable, "-m", "s3rec.data_prep.cli", "synthetic", "--users", "200",
                    "--items", "150", "--attributes", "20", "--noise-attributes", "8",
                    "--out", str(out)], check=True, capture_output=True, cwd=REPO,
                   env=clean_env())
    return out


def test_two_fields_pretrain_logs_each_field_and_finetunes_from_it(two_fields, tmp_path):
    pre, fine = tmp_path / "pre", tmp_path / "fine"
    run(command("single", "s3rec.pretrain", train_args(
        two_fields, pre, "pretrain.epochs=1", "logging.every_steps=1",
        "model.fields.noise.aap.kind=lowrank", "model.fields.noise.aap.rank=3",
        "model.fields.noise.map.weight=0")))
    tags = {t for t in scalars(pre) if t.startswith("loss/")}
    assert tags == {"loss/aap", "loss/mip", "loss/map", "loss/sp", "loss/total",
                    "loss/aap.cluster", "loss/aap.noise", "loss/map.cluster"}
    state = torch.load(pre / "final.pt", map_location="cpu", weights_only=True)["model"]
    assert state["aap_noise_norm.U"].shape == (16, 3)
    assert state["attribute_embeddings_noise.weight"].shape == (9, 16)
    run(command("single", "s3rec.finetune", train_args(two_fields, fine, "finetune.epochs=1")
                + ["--init", str(pre / "final.pt")]))
    assert read_json(fine / "run.json")["status"] == "done"


def test_a_field_the_dataset_lacks_is_one_line(two_fields, tmp_path):
    p = run(command("single", "s3rec.pretrain", train_args(
        two_fields, tmp_path / "bad", "model.fields.colour.aap.rank=2")), expect=2)
    lines = [ln for ln in p.stderr.splitlines() if "colour" in ln]
    assert lines and "no attribute field 'colour'" in lines[0] and "cluster, noise" in lines[0]
    assert "Traceback" not in p.stderr


def test_fields_ablation_benchmark_writes_every_condition(two_fields, tmp_path):
    out = tmp_path / "ablation.json"
    run([sys.executable, "benchmarks/fields_ablation.py", "--data", str(two_fields), "--json",
         str(out), "--seeds", "1", "--ranks", "2", "--figure", str(tmp_path / "rank.png"),
         "pretrain.epochs=1", "finetune.epochs=1"], timeout=600)
    figures = read_json(out)
    assert set(figures) >= {"both", "without.cluster", "without.noise", "rank.2", "machine"}
    assert 0 <= figures["rank.2"]["hr10"]["1"] <= 1
    assert figures["both"]["loss_vs_both"] == 0
    assert (tmp_path / "rank.png").stat().st_size > 0
