"""`mpiexec -n 2 s3rec-prep ...` writes the same bytes as a one-process run."""
import shutil
import subprocess

import pytest

from s3rec.data_prep.fixtures import random_release
from s3rec.data.format import sha256_file

pytestmark = pytest.mark.multiproc


def digests(folder):
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir())}


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="no mpiexec on PATH (pip install mpich)")
def test_mpiexec_two_ranks_byte_identical(tmp_path):
    syn = ["synthetic", "--users", "9000", "--items", "500", "--attributes", "30", "--shards", "3",
           "--seed", "11"]
    run(["s3rec-prep", *syn, "--out", str(tmp_path / "one")])
    out = run(["mpiexec", "-n", "2", "s3rec-prep", *syn, "--out", str(tmp_path / "two")])
    assert "ranks=2" in out                    # really ran as two MPI ranks
    assert digests(tmp_path / "one") == digests(tmp_path / "two")
    assert len(digests(tmp_path / "one")) == 4
    assert run(["s3rec-prep", "verify", str(tmp_path / "two")]).startswith("users=9000 items=500")
    # a rerun under MPI finds it up to date
    assert "up to date" in run(["mpiexec", "-n", "2", "s3rec-prep", *syn, "--out", str(tmp_path / "two")])

    src = random_release(tmp_path / "src", num_users=5000)
    rel = ["release", "--src", str(src), "--name", "Toy", "--shards", "3"]
    run(["s3rec-prep", *rel, "--out", str(tmp_path / "r1")])
    run(["mpiexec", "-n", "2", "s3rec-prep", *rel, "--out", str(tmp_path / "r2")])
    assert digests(tmp_path / "r1") == digests(tmp_path / "r2")
