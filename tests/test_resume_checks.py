"""A run started again with the same --out resumes only what it saved: another stage, dataset or
setting is refused before run.json is touched (s3rec.engine.resume_check); a damaged checkpoint
is named; a run killed between its epoch-end checkpoint and epoch-N.pt writes that file when
started again."""
import shutil
import subprocess
import sys

import pytest
import torch

from tests.train_helpers import (REPO, clean_env, command, make_dataset, read_json, run,
                                 tiny_data, train_args)  # noqa: F401

pytestmark = pytest.mark.multiproc

PRE = ("pretrain.epochs=1", "pretrain.save_epochs=[]")


@pytest.fixture(scope="module")
def pretrained(tiny_data, tmp_path_factory):
    """A finished one-epoch pretraining run (read-only: tests copy it)."""
    out = tmp_path_factory.mktemp("pre") / "run"
    run(command("single", "s3rec.pretrain", train_args(tiny_data, out, *PRE)))
    return out


def _copy(run_dir, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


def test_changed_setting_is_refused_and_a_longer_run_continues(pretrained, tiny_data, tmp_path):
    out = _copy(pretrained, tmp_path)
    before = (out / "run.json").read_text()
    p = run(command("single", "s3rec.pretrain",
                    train_args(tiny_data, out, *PRE, "pretrain.batch_size=32")), expect=2)
    assert "config key 'pretrain.batch_size' was 64 when the run saved this checkpoint, now 32" \
        in p.stderr, p.stderr[-2000:]
    assert (out / "run.json").read_text() == before               # the record is untouched
    run(command("single", "s3rec.pretrain", train_args(tiny_data, out, "pretrain.epochs=2",
                                                        "pretrain.save_epochs=[]")))
    info = read_json(out / "run.json")
    assert info["status"] == "done" and info["epoch"] == 2 and info["starts"] == 2


def test_another_stage_or_dataset_in_the_same_out_is_refused(pretrained, tiny_data, tmp_path):
    out = _copy(pretrained, tmp_path)
    before = (out / "run.json").read_text()
    p = run(command("single", "s3rec.finetune",
                    train_args(tiny_data, out, "variant=finetune-only")), expect=2)
    assert "a pretrain checkpoint; this is finetune: use another --out" in p.stderr
    other = make_dataset(tmp_path, seed=7)                        # same sizes, other data
    p = run(command("single", "s3rec.pretrain", train_args(other, out, *PRE)), expect=2)
    assert "saved on another dataset" in p.stderr and "trainer_state.json" in p.stderr
    assert (out / "run.json").read_text() == before


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_damaged_model_states_are_named(damage, pretrained, tiny_data, tmp_path):
    out = _copy(pretrained, tmp_path)
    tag = (out / "checkpoints" / "latest").read_text().strip()
    f = out / "checkpoints" / tag / "mp_rank_00_model_states.pt"
    if damage == "missing":
        f.unlink()
    else:
        f.write_bytes(f.read_bytes()[:1000])
    p = run(command("single", "s3rec.pretrain", train_args(tiny_data, out, *PRE)), expect=2)
    expected = ("no *model_states.pt" if damage == "missing"
                else "DeepSpeed could not read this checkpoint")
    assert expected in p.stderr and str(out / "checkpoints" / tag) in p.stderr, p.stderr[-2000:]


KILL_IN_EPOCH_FILE = """
import os, sys
import s3rec.model
def killed(path, *a, **k):          # kill -9 just as epoch-N.pt would be written
    os._exit(9)
s3rec.model.save_model_file = killed
from s3rec.pretrain import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_before_epoch_file_writes_it_when_started_again(tiny_data, tmp_path):
    """`latest` names an epoch's tag only after epoch-N.pt is written: killed in between, the
    run resumes before that epoch's end and does it again (before: it resumed after it, and
    epoch-1.pt was never written)."""
    args = train_args(tiny_data, tmp_path / "run", "pretrain.epochs=2", "pretrain.save_epochs=[1]")
    p = subprocess.run([sys.executable, "-c", KILL_IN_EPOCH_FILE, *args], env=clean_env(),
                       cwd=REPO, capture_output=True, text=True, timeout=240)
    assert p.returncode == 9, p.stderr[-2000:]
    ckpts = tmp_path / "run" / "checkpoints"
    assert not (tmp_path / "run" / "epoch-1.pt").exists()
    assert not (ckpts / "latest").exists()                       # no tag completed before
    run(command("single", "s3rec.pretrain", args))
    ref = tmp_path / "ref"
    run(command("single", "s3rec.pretrain", train_args(tiny_data, ref, "pretrain.epochs=2",
                                                        "pretrain.save_epochs=[1]")))
    a = torch.load(tmp_path / "run" / "epoch-1.pt", weights_only=True)["model"]
    b = torch.load(ref / "epoch-1.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_best_weights_gone_stop_the_test_instead_of_testing_the_last_epoch(tiny_data, tmp_path):
    """A fine-tune started again after its best epoch's tag went missing (a run folder copied
    without it): before, the test metrics silently came from the last epoch's weights while
    results.json still named the best epoch."""
    out = tmp_path / "run"
    args = train_args(tiny_data, out, "variant=finetune-only", "finetune.epochs=1")
    run(command("single", "s3rec.finetune", args))
    ckpts = out / "checkpoints"
    best = (ckpts / "best").read_text().strip()
    assert best.startswith("best-epoch-") and (ckpts / best).is_dir()
    shutil.rmtree(ckpts / best)
    (ckpts / "best").unlink()
    p = run(command("single", "s3rec.finetune", args), expect=2)
    assert f"{ckpts / 'best'} is missing" in p.stderr and "epoch 1 validated best" in p.stderr, \
        p.stderr[-2000:]
