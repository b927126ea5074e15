"""Loading a checkpoint folder runs no code from it (issue 17, items 1 and 8a): every file of a tag
is read with torch.load(weights_only=True), DeepSpeed's and zero_to_fp32's loads included, with
only DeepSpeed's own classes allowed; a file naming any other function is refused before it runs,
and a truncated file is named as damaged. In one process on a real DeepSpeed engine, then through
`s3rec-pretrain` (resume) and `s3rec-finetune --init` as real subprocesses."""
import os
import pickle
import random
import re
import shlex
import shutil

import numpy as np
import pytest
import torch

from s3rec.engine import checkpoint as ckpt
from tests.test_engine import _engine, _steps, single_process  # noqa: F401
from tests.train_helpers import command, run, tiny_data, train_args  # noqa: F401

STATE = {"trainer": {"global_step": 3}, "world_size": 1}
FILES = {"model": "*model_states.pt", "optim": "*optim_states.pt", "rng": "rng-rank00000.pt"}


class _WritesMarker:
    """Unpickling this runs a shell command that creates `path`: a hostile checkpoint file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.path)}",)


def _saved_tag(tmp_path, stage: int):
    root = tmp_path / "checkpoints"
    e = _engine(stage)
    _steps(e, 2, seed=1)
    ckpt.save(e, root, ckpt.step_tag(2), STATE, keep_last=2)
    return root, root / ckpt.step_tag(2)


def _poison(f, marker) -> None:
    torch.save(_WritesMarker(marker), f)


def _truncate(f) -> None:
    f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])


def test_rng_file_holds_only_tensors_and_plain_types(single_process, tmp_path):
    _, tag_dir = _saved_tag(tmp_path, stage=0)
    f = tag_dir / "rng-rank00000.pt"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(f) == []
    state = torch.load(f, weights_only=True)          # nothing allowed beyond torch's defaults
    assert state["numpy"]["key"].shape == (624,) and state["torch"].dtype == torch.uint8


def test_rng_file_of_numpy_arrays_still_resumes_exactly(single_process, tmp_path):
    """An rng file holding random.getstate()'s tuple and np.random.get_state()'s arrays (the
    layout of checkpoints already on disk) is read with numpy's array classes allowed only."""
    a = _engine(0)
    _steps(a, 2, seed=1)
    random.seed(5); np.random.seed(5); torch.manual_seed(5)
    root = tmp_path / "checkpoints"
    ckpt.save(a, root, ckpt.step_tag(2), STATE, keep_last=2)
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(),
                "torch": torch.get_rng_state()}, root / ckpt.step_tag(2) / "rng-rank00000.pt")
    expected = _steps(a, 2, seed=2) + [random.random(), float(np.random.rand())]
    b = _engine(0)
    ckpt.load(b, root, ckpt.step_tag(2), world_size=1)
    assert _steps(b, 2, seed=2) + [random.random(), float(np.random.rand())] == expected


@pytest.mark.parametrize("stage,which", [(0, "model"), (0, "rng"), (2, "model"), (2, "optim"),
                                         (2, "rng")])
def test_a_hostile_file_in_a_tag_is_refused_naming_it(single_process, tmp_path, stage, which):
    root, tag_dir = _saved_tag(tmp_path, stage)
    f = next(tag_dir.glob(FILES[which]))
    marker = tmp_path / "marker"
    _poison(f, marker)
    with pytest.raises(ckpt.ResumeError, match="refused, nothing loaded") as caught:
        ckpt.load(_engine(stage), root, tag_dir.name, world_size=1)
    assert str(f) in str(caught.value) and "posix.system" in str(caught.value)
    if which != "rng":
        with pytest.raises(ckpt.ResumeError, match="refused, nothing loaded"):
            ckpt.consolidate_folder(root, tag_dir.name)
    assert not marker.exists()


def test_a_bare_pickle_in_place_of_the_model_states_is_refused(single_process, tmp_path):
    """Not a torch.save zip at all: torch.load's older-format reader would unpickle it whole."""
    root, tag_dir = _saved_tag(tmp_path, stage=0)
    f = tag_dir / "mp_rank_00_model_states.pt"
    marker = tmp_path / "marker"
    f.write_bytes(pickle.dumps(_WritesMarker(marker)))
    for read in (lambda: ckpt.load(_engine(0), root, tag_dir.name, world_size=1),
                 lambda: ckpt.consolidate_folder(root, tag_dir.name)):
        with pytest.raises(ckpt.ResumeError, match="damaged or truncated") as caught:
            read()
        assert str(f) in str(caught.value)
    assert not marker.exists()


@pytest.mark.parametrize("stage,which", [(0, "model"), (0, "rng"), (2, "optim"), (2, "rng")])
def test_a_truncated_file_in_a_tag_is_named_as_damaged(single_process, tmp_path, stage, which):
    root, tag_dir = _saved_tag(tmp_path, stage)
    f = next(tag_dir.glob(FILES[which]))
    _truncate(f)
    with pytest.raises(ckpt.ResumeError, match="damaged or truncated") as caught:
        ckpt.load(_engine(stage), root, tag_dir.name, world_size=1)
    assert str(f) in str(caught.value)


def test_loading_leaves_torch_load_as_it_was(single_process, tmp_path, monkeypatch):
    """The weights-only switch and DeepSpeed's allowed classes hold during a load only."""
    root, tag_dir = _saved_tag(tmp_path, stage=2)
    monkeypatch.delenv(ckpt._FORCE_WEIGHTS_ONLY, raising=False)
    allowed = set(map(str, torch.serialization.get_safe_globals()))
    ckpt.load(_engine(2), root, tag_dir.name, world_size=1)
    ckpt.consolidate_folder(root, tag_dir.name)
    assert ckpt._FORCE_WEIGHTS_ONLY not in os.environ
    assert set(map(str, torch.serialization.get_safe_globals())) == allowed


def test_a_hostile_or_truncated_model_file_is_one_line(tmp_path):
    """final.pt / an authors' file: torch's own message is many lines and advises
    weights_only=False, which would run what the file names."""
    from s3rec.import_original import main as import_main
    from s3rec.model.checkpoint_io import CheckpointError, read_model_file, read_state_dict
    marker, hostile, cut = tmp_path / "marker", tmp_path / "hostile.pt", tmp_path / "cut.pt"
    _poison(hostile, marker)
    cut.write_bytes(hostile.read_bytes()[:100])
    for read in (read_model_file, read_state_dict):
        for f, expected in ((hostile, "refused, nothing loaded: it names posix.system"),
                            (cut, "damaged or truncated")):
            with pytest.raises(CheckpointError, match=expected) as caught:
                read(f)
            assert str(f) in str(caught.value) and "\n" not in str(caught.value)
            assert "weights_only" not in str(caught.value)
    assert import_main([str(hostile), "--export", "--out", str(tmp_path / "a.pt")]) == 2
    assert not marker.exists()


# ------------------------------------------------------------------ real runs

PRE = ("pretrain.epochs=1", "pretrain.save_epochs=[]")


@pytest.fixture(scope="module")
def pretrained(tiny_data, tmp_path_factory):
    """Finished one-epoch pretraining runs at ZeRO 0 and ZeRO 2 (read-only: tests copy them)."""
    runs = {}
    for stage in (0, 2):
        out = tmp_path_factory.mktemp(f"pre-z{stage}") / "run"
        run(command("single", "s3rec.pretrain",
                    train_args(tiny_data, out, *PRE, f"deepspeed.zero_stage={stage}")))
        runs[stage] = out
    return runs


CASES = [(0, "model", "hostile", "resume"), (0, "model", "hostile", "init"),
         (0, "rng", "hostile", "resume"), (2, "optim", "hostile", "resume"),
         (2, "optim", "hostile", "init"), (2, "model", "hostile", "init"),
         (0, "rng", "truncated", "resume"), (2, "rng", "truncated", "resume"),
         (0, "model", "truncated", "init"), (2, "optim", "truncated", "init")]


@pytest.mark.multiproc
@pytest.mark.parametrize("stage,which,damage,path", CASES,
                         ids=["-".join(map(str, c)) for c in CASES])
def test_a_damaged_or_hostile_run_folder_stops_with_one_line(pretrained, tiny_data, tmp_path,
                                                             stage, which, damage, path):
    pre = tmp_path / "pre"
    shutil.copytree(pretrained[stage], pre)
    tag = (pre / "checkpoints" / "latest").read_text().strip()
    f = next((pre / "checkpoints" / tag).glob(FILES[which]))
    marker = tmp_path / "marker"
    if damage == "hostile":
        _poison(f, marker)
    else:
        _truncate(f)
    zero = f"deepspeed.zero_stage={stage}"
    if path == "resume":
        p = run(command("single", "s3rec.pretrain", train_args(tiny_data, pre, *PRE, zero)),
                expect=2)
    else:
        p = run(command("single", "s3rec.finetune",
                        [*train_args(tiny_data, tmp_path / "ft", "finetune.epochs=1", zero),
                         "--init", str(pre)]), expect=2)
    errors = [line for line in p.stderr.splitlines() if re.match(r"s3rec-\w+: error: ", line)]
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    expected = "refused, nothing loaded" if damage == "hostile" else "damaged or truncated"
    assert str(f) in errors[0] and expected in errors[0], errors[0]
    assert not marker.exists()
