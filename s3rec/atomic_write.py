"""Atomic file writes, the one writer every file of the project goes through: run folders
(s3rec.run_folder), datasets' manifests and id maps (data_prep/), grid records (launch/) and
reports (analysis/). A file is written under a temporary name in its own folder, fsynced and
renamed onto its name, so a reader sees the old file or the whole new one and a failed write
leaves no temporary behind; a failure is one line naming the file and the free space there.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import tempfile
import traceback
from pathlib import Path
from typing import Iterator


class WriteError(OSError):
    """A write failed (a full disk, a quota, an I/O error); one line naming the path and the
    free space there. An OSError, so callers that handle failed writes handle it."""


def _umask() -> int:
    """The process umask (only readable by setting it, so set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path next to `path`, renamed onto it when the block ends without an error;
    on any error (a full disk, a kill by a Python signal handler) the temporary file goes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with writing(path):
            yield Path(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            # mkstemp makes the file 0600 and the rename keeps that: give it the mode an ordinary
            # open() would have, so a shared folder stays readable by the group
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """`data` into `path` atomically (atomic_path)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def write_json_atomic(path: str | Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_npy_atomic(path: str | Path, array) -> None:
    """A plain (never pickled) .npy file, atomically: np.load(path, allow_pickle=False) reads it."""
    import io

    import numpy as np
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    write_atomic(path, buf.getvalue())


def free_space(path: Path) -> str:
    """'N MiB free of M MiB' on the file system of `path` (its nearest existing folder)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        u = shutil.disk_usage(p)
    except OSError:
        return "free space unknown"
    return f"{u.free / 2 ** 20:.1f} MiB free of {u.total / 2 ** 20:.1f} MiB"


# what torch.save's C++ writer raises when a write fails (it carries no errno)
_TORCH_WRITE_FAILED = ("inline_container", "PytorchStreamWriter", "iostream error",
                       "file write failed")


def _write_failure(e: BaseException) -> str | None:
    """Why `e` is a failed write (an OSError, or torch.save's RuntimeError), None otherwise."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    text = str(e)
    if isinstance(e, RuntimeError) and any(m in text for m in _TORCH_WRITE_FAILED):
        return f"torch.save failed ({text.strip().splitlines()[0][:120]})"
    return None


def write_error(path: Path, e: BaseException) -> WriteError | None:
    """The one-line WriteError for a failed write of `path`, None if `e` is no write failure."""
    why = _write_failure(e)
    if why is None:
        return None
    return WriteError(f"{path}: cannot write: {why}; {free_space(Path(path))} there")


def let_go(e: BaseException) -> None:
    """Clears the frames of `e` and the errors it happened during: a writer that failed holds
    its open file there, and a full disk frees that file's space only once it is closed."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        e = e.__cause__ or e.__context__
    gc.collect()


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turns a failed write inside into a WriteError naming `path` and its free space."""
    try:
        yield
    except WriteError:
        raise
    except (OSError, RuntimeError) as e:
        err = write_error(path, e)
        if err is None:
            raise
        raise err from None
