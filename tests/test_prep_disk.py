"""s3rec-prep on a full disk (issue 17, item 5): refused before writing when the space is short,
one line naming the file and the free space when the disk fills up during the write, and nothing
half-written left. The disks are small tmpfs mounts (root only; skipped elsewhere). Each prep
runs as a subprocess: the crash this guards against (SIGSEGV/SIGBUS inside HDF5) would kill pytest."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from s3rec.data_prep.cli import main
from s3rec.data_prep.fixtures import random_release
from s3rec.data_prep.release import load_release, release_files
from s3rec.data_prep.synthetic import SyntheticSource
from s3rec.data_prep.writer import needed_bytes
from s3rec.data.format import free_bytes
from tests.train_helpers import REPO, clean_env


@pytest.fixture
def small_disk(tmp_path, request):
    """A tmpfs of `request.param` (default 1m) at tmp_path/disk, unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    size = getattr(request, "param", "1m")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
                       capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"cannot mount a tmpfs here (root needed): {p.stderr.strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def prep(args: list[str], patch: str = "") -> subprocess.CompletedProcess:
    """s3rec-prep ARGS in a fresh interpreter, after the Python statement `patch`."""
    code = (f"import sys\n{patch}\nfrom s3rec.data_prep.cli import main\n"
            f"sys.exit(main({args!r}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env=clean_env())


SYNTHETIC = ["synthetic", "--users", "20000", "--items", "500", "--attributes", "20"]


def test_short_space_is_refused_before_writing(small_disk):
    out = small_disk / "ds"
    p = prep([*SYNTHETIC, "--out", str(out)])
    assert p.returncode == 1, p.stderr
    assert p.stderr.startswith(f"s3rec-prep synthetic: error: {out}: not enough free space: the "
                               f"dataset needs up to ") and "are free there" in p.stderr
    assert len(p.stderr.splitlines()) == 1 and list(small_disk.iterdir()) == []


def test_disk_full_mid_write_with_the_estimate_fooled(small_disk):
    """The precheck told the disk is large enough (needed_bytes patched to 0, as if another
    process had filled the disk since): the shard write fails with one line, and goes."""
    out = small_disk / "ds"
    p = prep([*SYNTHETIC, "--shards", "3", "--out", str(out)],
             patch="import s3rec.data_prep.writer as w; w.needed_bytes = lambda *a: 0")
    assert p.returncode == 1, p.stderr[-3000:]
    assert ": cannot write (No space left on device); " in p.stderr
    assert " bytes free on its file system" in p.stderr and len(p.stderr.splitlines()) == 1
    assert list(small_disk.iterdir()) == []


@pytest.mark.parametrize("small_disk", ["8m"], indirect=True)
def test_disk_filled_by_another_process_during_prep(small_disk):
    """A real prep that passes the precheck; the test fills the disk as soon as the partial
    folder appears (the shards are still being generated, none written)."""
    out = small_disk / "ds"
    args = ["synthetic", "--users", "12000", "--items", "500", "--attributes", "20",
            "--shards", "4", "--out", str(out)]
    assert needed_bytes(SyntheticSource(12000, 500, 20, 12345), 4) < free_bytes(small_disk)
    filler = small_disk / "filler"

    def fill() -> None:
        deadline = time.monotonic() + 60
        while not (small_disk / ".ds.partial").exists() and time.monotonic() < deadline:
            time.sleep(0.001)
        with open(filler, "wb") as f:
            f.write(b"\0" * (free_bytes(small_disk) - (64 << 10)))

    t = threading.Thread(target=fill)
    t.start()
    p = prep(args)
    t.join()
    assert p.returncode == 1, p.stderr[-3000:]
    assert ".ds.partial/.shard-0000" in p.stderr and "No space left on device" in p.stderr
    assert len(p.stderr.splitlines()) == 1
    assert sorted(small_disk.iterdir()) == [filler]


def test_needed_bytes_bounds_what_prep_writes(tmp_path):
    """The estimate is an upper bound, for release data (exact counts) and synthetic data."""
    src = random_release(tmp_path / "src", num_users=300)
    for args, source, shards in [
        (["release", "--src", str(src), "--name", "Toy"],
         load_release(release_files(src, "Toy", None), "Toy", 12345), 3),
        (SYNTHETIC[:2] + ["3000"] + SYNTHETIC[3:], SyntheticSource(3000, 500, 20, 12345), 2)]:
        out = tmp_path / args[0]
        assert main([*args, "--shards", str(shards), "--out", str(out)]) == 0
        written = sum(f.stat().st_size for f in out.iterdir())
        assert written <= needed_bytes(source, shards) <= 3 * written
        assert json.loads((out / "manifest.json").read_text())["num_users"] == source.num_users
