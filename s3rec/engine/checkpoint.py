"""Resumable checkpoints (DeepSpeed tags + our per-rank state), consolidation, --init loading.

    RUN/checkpoints/
      latest                   the tag to resume from (written last, atomically, by rank 0)
      step-00001503/           a DeepSpeed tag: model + optimizer states (every ZeRO stage)
        trainer_state.json     epoch, batch index within the epoch, global step, early stopping,
                               epoch accumulators, world size, stage, config, dataset fingerprint
                               (rank 0; s3rec.engine.resume_check compares them on resume)
        rng-rank00000.pt       python / numpy / torch (and CUDA) generator states of that rank
      best                     fine-tuning: the tag of the best validation epoch (as `latest`)
      best-epoch-0007/         that tag (the previous best tag goes once `best` names this one)

A tag is complete once `latest` (or `best`) names it: a process killed while saving leaves the
name on the previous tag, whole, and the partial tag is removed when a save or a failed save
finds it. The last `checkpoint.keep_last` step tags are kept. A `latest` that is not a file, is
empty or names no tag is refused (s3rec.run_folder.read_name), never read as "no checkpoint".
(Runs saved before best tags had the tag folder `best/` itself; it is read as such.)
The folder's names, what a restart does and its lock: s3rec/run_folder.py.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from s3rec import distributed as dist
from s3rec import run_folder
from s3rec.run_folder import BEST, CHECKPOINTS, LATEST, write_atomic  # noqa: F401
from s3rec.runlog import note_checkpoint

_BEST_TAG = "best-epoch-"
STATE_FILE = "trainer_state.json"
_STEP_TAG = re.compile(r"^step-(\d+)$")
# What reading a damaged tag raises (DeepSpeed's loader, zero_to_fp32, torch.load's zip reader)
_UNREADABLE = (AssertionError, RuntimeError, OSError, EOFError, KeyError, ValueError,
               pickle.UnpicklingError)


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed here; the message names the file."""


def step_tag(global_step: int) -> str:
    return f"step-{global_step:08d}"


def rng_state() -> dict:
    """This process's generator states as tensors and plain types only, so that
    torch.load(weights_only=True) reads them back with no class allowed."""
    version, mt, gauss_next = random.getstate()
    npy = np.random.get_state(legacy=False)    # {'state': {'key': uint32 [624], 'pos'}, ...}
    state = {"python": {"version": version, "state": list(mt), "gauss_next": gauss_next},
             "numpy": {"key": torch.from_numpy(npy["state"]["key"].astype(np.int64)),  # [624]
                       "pos": int(npy["state"]["pos"]), "has_gauss": int(npy["has_gauss"]),
                       "gauss": float(npy["gauss"])},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state returned (or _plain_rng made of a file holding numpy arrays)."""
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": np.asarray(npy["key"], dtype=np.uint32),
                                   "pos": npy["pos"]},
                         "has_gauss": npy["has_gauss"], "gauss": npy["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def read_latest(root: Path) -> str | None:
    return _read_name(Path(root), LATEST)


def _read_name(root: Path, name: str) -> str | None:
    """The tag the file root/name (`latest`, `best`) names; None without it. Anything else
    there (a folder, an empty file, a tag that is gone) is a ResumeError naming it."""
    try:
        return run_folder.read_name(root, name)
    except run_folder.RunFolderError as e:
        raise ResumeError(str(e)) from None


def save(engine, root: Path, tag: str, state: dict, keep_last: int, make_latest: bool = True) -> None:
    """Every rank calls this (DeepSpeed saves partitioned states per rank)."""
    root = Path(root)
    # Re-saving the tag `latest` names (e.g. preempted right after a resume) would leave it
    # half-written if killed meanwhile; the state is the saved one anyway.
    same = dist.broadcast_object(read_latest(root) == tag if dist.is_main() else None)
    if same:
        return
    tag_dir = root / tag
    if dist.is_main() and tag_dir.exists():    # a partial tag of a process killed while saving
        shutil.rmtree(tag_dir)
    dist.barrier()
    try:
        with run_folder.writing(tag_dir):
            engine.save_checkpoint(str(root), tag=tag, save_latest=False)
            write_atomic(tag_dir / f"rng-rank{dist.get_rank():05d}.pt", _torch_bytes(rng_state()))
            if dist.is_main():
                write_atomic(tag_dir / STATE_FILE, json.dumps(state, indent=1))
    except BaseException as e:
        # the failed writer's frames hold its open file: a full disk frees the partial tag's
        # space only once they let go of it
        run_folder.let_go(e)
        if dist.is_main():                     # nothing names it: no half-written tag stays
            shutil.rmtree(tag_dir, ignore_errors=True)
        raise
    dist.barrier()
    if make_latest:
        mark_latest(root, tag, keep_last)


def save_best(engine, root: Path, epoch: int, state: dict) -> str:
    """The best validation epoch as a tag of its own, then `best` names it. Every rank calls
    this. Never written over the tag `best` names: a process killed while saving leaves the
    previous best whole (an epoch validated again after a resume gets a fresh name)."""
    root = Path(root)
    tag = None
    if dist.is_main():
        tag, n = f"{_BEST_TAG}{epoch:04d}", 0
        while (root / tag).exists():
            n += 1
            tag = f"{_BEST_TAG}{epoch:04d}.{n}"
    tag = dist.broadcast_object(tag)
    save(engine, root, tag, state, keep_last=0, make_latest=False)
    if dist.is_main():
        if (root / BEST).is_dir():        # the old layout's tag folder
            shutil.rmtree(root / BEST)
        write_atomic(root / BEST, tag)
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith(_BEST_TAG) and p.name != tag:
                shutil.rmtree(p, ignore_errors=True)
    dist.barrier()
    return tag


def read_best(root: Path) -> str | None:
    """The tag `best` names (None before any validation improved)."""
    if (Path(root) / BEST).is_dir():
        return BEST
    return _read_name(Path(root), BEST)


def mark_latest(root: Path, tag: str, keep_last: int) -> None:
    """`latest` names the saved `tag` from now on; older step tags beyond keep_last go. Every
    rank calls this."""
    if dist.is_main():
        write_atomic(Path(root) / LATEST, tag)
        note_checkpoint(Path(root).parent, tag)
        _prune(Path(root), keep_last)
    dist.barrier()


def _torch_bytes(obj) -> bytes:
    import io
    b = io.BytesIO()
    torch.save(obj, b)
    return b.getvalue()


def _prune(root: Path, keep_last: int) -> None:
    latest = read_latest(root)
    tags = sorted((int(m.group(1)), p.name) for p in root.iterdir()
                  if p.is_dir() and (m := _STEP_TAG.match(p.name)))
    keep = {name for _, name in tags[-max(keep_last, 1):]} | {latest}
    for _, name in tags:
        if name not in keep:
            shutil.rmtree(root / name, ignore_errors=True)


def read_state(root: Path, tag: str) -> tuple[Path, dict]:
    """(trainer_state.json of `tag`, its content); ResumeError if missing or damaged."""
    state_file = Path(root) / tag / STATE_FILE
    if not state_file.is_file():
        raise ResumeError(f"{state_file} is missing: checkpoint tag {tag} is incomplete")
    try:
        return state_file, json.loads(state_file.read_text())
    except ValueError as e:
        raise ResumeError(f"{state_file}: unreadable ({e}): checkpoint tag {tag} is "
                          f"damaged") from None


def check_world_size(state_file: Path, state: dict, world_size: int) -> None:
    """A checkpoint resumes at the world size it was saved at (its partitioned states)."""
    if state.get("world_size") != world_size:
        raise ResumeError(f"{state_file}: saved at world size {state.get('world_size')}, "
                          f"resuming at {world_size}; start again with the same number of "
                          f"processes (or fine-tune from it with --init)")


# torch's own switch that makes every torch.load read weights only, also where DeepSpeed and
# zero_to_fp32 pass weights_only=False themselves
_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_DS_FILES = "*_states.pt"          # DeepSpeed's model and optimizer states in a tag
_REFUSED_ADVICE = ("a checkpoint written by s3rec holds only tensors, plain data and "
                   "DeepSpeed's own classes: this folder was altered, use one you made")


def _deepspeed_globals() -> list:
    """The classes DeepSpeed's checkpoint files hold beyond tensors and plain data, at every ZeRO
    stage and precision (get_unsafe_globals_in_checkpoint on tags saved by each)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _numpy_globals() -> list:
    """What an rng file holding numpy's state tuple needs to be read (its uint32 key array;
    _plain_rng checks the rest). Written under numpy 1 or 2, the rebuild function has either
    module name."""
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    rebuild = multiarray._reconstruct
    return [(rebuild, "numpy._core.multiarray._reconstruct"),
            (rebuild, "numpy.core.multiarray._reconstruct"),
            np.ndarray, np.dtype, type(np.dtype(np.uint32))]


@contextmanager
def _weights_only(allowed: list) -> Iterator[None]:
    """Every torch.load inside reads tensors, plain data and `allowed` only: a file naming any
    other function or class is refused before it is called."""
    before = os.environ.get(_FORCE_WEIGHTS_ONLY)
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        if before is None:
            os.environ.pop(_FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[_FORCE_WEIGHTS_ONLY] = before


def _check_file(f: Path, allowed: list, advice: str) -> None:
    """ResumeError naming `f` unless it is a whole torch.save file whose pickle names only
    tensors, plain data and `allowed` (read statically: nothing in it runs)."""
    try:
        with torch.serialization.safe_globals(allowed):
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(f)
    except _UNREADABLE as e:
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ResumeError(f"{f}: damaged or truncated, not a whole torch.save file "
                          f"({detail}); {advice}") from None
    if unsafe:
        raise ResumeError(f"{f}: refused, nothing loaded: it names {', '.join(sorted(unsafe))}, "
                          f"which loading would call; {_REFUSED_ADVICE}")


def _read_rng(f: Path, advice: str) -> dict:
    """This rank's generator states from `f` (either layout; load checked the file)."""
    allowed = _numpy_globals()
    try:
        with _weights_only(allowed):
            return _plain_rng(torch.load(f, map_location="cpu", weights_only=True))
    except (*_UNREADABLE, TypeError) as e:
        raise ResumeError(f"{f}: damaged or truncated, not this program's generator states "
                          f"({type(e).__name__}: {str(e)[:200]}); {advice}") from None


def _plain_rng(state: dict) -> dict:
    """rng_state's layout; a file holding random.getstate()'s tuple and np.random.get_state()'s
    ('MT19937', uint32 key [624], pos, has_gauss, gauss) is turned into it."""
    py, npy = state["python"], state["numpy"]
    if isinstance(py, tuple):
        py = {"version": py[0], "state": list(py[1]), "gauss_next": py[2]}
    if isinstance(npy, tuple):
        name, key, pos, has_gauss, gauss = npy
        if name != "MT19937" or not isinstance(key, np.ndarray) or key.dtype != np.uint32:
            raise ValueError(f"numpy state {name!r} with a {type(key).__name__} key")
        npy = {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
               "has_gauss": int(has_gauss), "gauss": float(gauss)}
    if not isinstance(state["torch"], torch.Tensor) or state["torch"].dtype != torch.uint8:
        raise ValueError("torch state is not a byte tensor")
    return {**state, "python": py, "numpy": npy}


def load(engine, root: Path, tag: str, world_size: int, module_only: bool = False) -> dict:
    """Restore model (+ optimizer unless module_only) and this rank's RNG from `tag`;
    returns the trainer state. Every file is checked before any is read, and read with
    weights_only: a file naming other code is refused, never run."""
    root = Path(root)
    tag_dir = root / tag
    state_file, state = read_state(root, tag)
    if not module_only:
        check_world_size(state_file, state, world_size)
    if not list(tag_dir.glob("*model_states.pt")):
        raise ResumeError(f"{tag_dir}: no *model_states.pt (the model's weights): checkpoint tag "
                          f"{tag} is incomplete")
    advice = f"point {root / LATEST} at an earlier tag, or use another --out"
    allowed = _deepspeed_globals()
    # every rank checks every rank's files, so that all of them stop, not one mid-collective
    for f in sorted(tag_dir.glob(_DS_FILES)):
        _check_file(f, allowed, f"DeepSpeed could not read this checkpoint; {advice}")
    rng_file = tag_dir / f"rng-rank{dist.get_rank():05d}.pt"
    rng = None
    if not module_only:
        for f in sorted(tag_dir.glob("rng-rank*.pt")):
            _check_file(f, _numpy_globals(), advice)
        if not rng_file.is_file():
            raise ResumeError(f"{rng_file} is missing: checkpoint tag {tag} is incomplete")
        rng = _read_rng(rng_file, advice)
    try:
        with _weights_only(allowed):
            path, _ = engine.load_checkpoint(str(root), tag=tag, load_module_only=module_only,
                                             load_optimizer_states=not module_only,
                                             load_lr_scheduler_states=not module_only)
    except _UNREADABLE as e:
        # DeepSpeed's own errors here are a bare assert or a zip reader's message
        raise ResumeError(f"{tag_dir}: DeepSpeed could not read this checkpoint "
                          f"({type(e).__name__}: {str(e)[:300]}); the tag is damaged: "
                          f"{advice}") from e
    if path is None:
        raise ResumeError(f"DeepSpeed could not load checkpoint {tag_dir}")
    if rng is not None:
        try:
            set_rng_state(rng)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:   # e.g. a key of 623 ints
            raise ResumeError(f"{rng_file}: not this program's generator states "
                              f"({type(e).__name__}: {str(e)[:200]}); {advice}") from None
    return state


# ------------------------------------------------------------------ consolidated weights

def _strip(sd: dict) -> dict:
    """StageModule keys ('model.xxx') -> the model's own keys."""
    return {k[len("model."):] if k.startswith("model.") else k: v for k, v in sd.items()}


def full_state_dict(engine, precision: str, root: Path | None = None, tag: str | None = None):
    """The whole model's state dict in fp32, on rank 0 (None on others). Every rank calls it.

    fp32: the module's parameters (ZeRO-3: gathered from all ranks). bf16/fp16: the fp32 master
    weights, consolidated from the just-saved checkpoint tag with DeepSpeed's zero_to_fp32."""
    stage = engine.zero_optimization_stage()
    if precision != "fp32":
        if root is None or tag is None:
            raise ValueError("full_state_dict: half precision needs the checkpoint (root, tag)")
        dist.barrier()
        sd = None
        if dist.is_main():
            sd = consolidate_folder(Path(root), tag)
        dist.barrier()
        return sd
    if stage == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()   # collective; full dict on rank 0
        return {k: v.float().clone() for k, v in _strip(sd).items()} if dist.is_main() else None
    if not dist.is_main():
        return None
    return {k: v.detach().float().cpu().clone() for k, v in engine.module.model.state_dict().items()}


def consolidate_folder(root: Path, tag: str | None = None) -> dict:
    """fp32 model weights of a DeepSpeed checkpoint saved at any world size and ZeRO stage."""
    root = Path(root)
    tag = tag or read_latest(root)
    if tag is None:
        raise ResumeError(f"{root}: no '{LATEST}' file and no tag given")
    tag_dir = root / tag
    zero = bool(list(tag_dir.glob("*zero_pp_rank_*optim_states.pt")))
    f = tag_dir / "mp_rank_00_model_states.pt"   # ZeRO stage 0: rank 0 wrote the whole module
    if not zero and not f.is_file():
        raise ResumeError(f"{tag_dir}: neither ZeRO optimizer states nor {f.name}")
    allowed = _deepspeed_globals()
    for g in sorted(tag_dir.glob(_DS_FILES)):
        _check_file(g, allowed, "could not read its weights: the checkpoint tag is damaged")
    try:
        with _weights_only(allowed):
            if zero:
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
                sd = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
            else:
                sd = torch.load(f, map_location="cpu", weights_only=True)["module"]
    except _UNREADABLE as e:
        # zero_to_fp32's own errors: "Expected N of *_optim_states.pt", a zip reader's message
        raise ResumeError(f"{tag_dir}: could not read its weights ({type(e).__name__}: "
                          f"{str(e)[:300]}); the checkpoint tag is damaged or incomplete") from e
    return {k: v.float() for k, v in _strip(dict(sd)).items()}


def find_checkpoint_folder(path: Path) -> tuple[Path, str] | None:
    """(root, tag) for a run folder, a checkpoints folder or a tag folder; None if not one."""
    path = Path(path)
    for root in (path / CHECKPOINTS, path):
        tag = read_latest(root)
        if tag is not None:
            return root, tag
    if (path / STATE_FILE).is_file() or list(path.glob("*model_states.pt")):
        return path.parent, path.name
    return None
