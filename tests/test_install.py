"""Installing the suite: `pip install .` keeps the torch an environment already has, setup.py's
ranges admit the versions docs/install.md says were tested, the demo's set-up reaches neither
apt nor sudo, and the test set-up installs system packages only as root, without a prompt."""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
# What a set-up must not reach: each stub records its call and fails loudly.
SYSTEM_TOOLS = ("apt-get", "apt", "sudo", "dpkg")


def install_requires() -> list[Requirement]:
    """setup.py's install_requires, read without running setup()."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            return [Requirement(r) for r in ast.literal_eval(node.value)]
    raise AssertionError("setup.py has no install_requires")


def docs_versions() -> dict[str, tuple[str, str]]:
    """docs/install.md's table of tested versions: {package: (oldest, newest)}."""
    text = (REPO / "docs" / "install.md").read_text()
    table = text.split("| package | oldest tested | newest tested |", 1)[1]
    rows = {}
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip(" `") for c in line.strip("|").split("|")]
        rows[cells[0]] = (cells[1].split()[0], cells[2].split()[0])
    return rows


def test_declared_ranges_admit_the_oldest_and_newest_tested_and_pin_nothing():
    reqs = {r.name.lower(): r for r in install_requires()}
    rows = docs_versions()
    assert set(rows) == set(reqs), "docs/install.md's table and setup.py name other packages"
    for name, (oldest, newest) in rows.items():
        spec = reqs[name].specifier
        assert not [s for s in spec if s.operator in ("==", "===")], f"{name} pinned: {spec}"
        for v in (oldest, newest):
            assert spec.contains(Version(v), prereleases=True), f"{name} {spec} refuses {v}"
        assert Version(oldest) <= Version(newest), name


def checkout_copy(dest: Path) -> Path:
    """The checkout's tracked and new (not ignored) files, as a clone would have them."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    for rel in filter(None, out.split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def torch_of(python: Path | str) -> str:
    """'version path' of the torch `python` imports (run outside the checkout)."""
    code = "import torch; print(torch.__version__, torch.__file__)"
    return subprocess.run([str(python), "-c", code], cwd="/", capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.slow
def test_pip_install_into_an_env_with_torch_keeps_it_without_download(tmp_path):
    """A fresh venv that sees this machine's torch (a user's environment with their own build):
    `pip install .` from a copy of the checkout, with no index (nothing can be downloaded),
    leaves that torch as it was, and the installed command runs."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the copy is git's list of files")
    venv = tmp_path / "venv"
    # pip and setuptools too come from the environment it sees (a venv's own setuptools of
    # ensurepip is too old to build a wheel without the `wheel` package)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(venv)], check=True)
    python = venv / "bin" / "python"
    before = torch_of(python)
    assert before == torch_of(sys.executable)
    src = checkout_copy(tmp_path / "src")
    pip = subprocess.run([str(python), "-m", "pip", "install", "--no-index", "--no-input",
                          "--no-build-isolation", str(src)], cwd="/",
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    installed = [l for l in pip.stdout.splitlines() if l.startswith("Successfully installed")]
    assert installed and re.search(r"\bs3rec-", installed[0]), pip.stdout
    assert "torch" not in installed[0] and "Downloading" not in pip.stdout, pip.stdout
    assert re.search(r"^Requirement already satisfied: torch\b", pip.stdout, re.M), pip.stdout
    assert torch_of(python) == before
    where = subprocess.run([str(python), "-c", "import s3rec; print(s3rec.__file__)"], cwd="/",
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(venv)), where          # the copy installed, not the checkout
    cli = subprocess.run([str(venv / "bin" / "s3rec-pretrain"), "--help"], cwd="/",
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0 and "usage" in cli.stdout, cli.stdout + cli.stderr


def stub_path(tmp_path: Path, uid: int | None = None, status: int = 97) -> tuple[str, Path]:
    """A PATH of this Python's bin folder and /usr/bin:/bin (so no /usr/sbin: slurmctld and
    munged absent), whose apt-get, apt, sudo and dpkg come first: stubs that append their name,
    arguments, DEBIAN_FRONTEND and the bytes standard input gives to a marker file, and exit
    with `status` (loudly unless 0). With `uid`, an `id` stub answers it for `id -u` (a user
    other than root)."""
    stubs = tmp_path / "stubs"
    stubs.mkdir(parents=True)
    marker = tmp_path / "reached"
    for name in SYSTEM_TOOLS:
        (stubs / name).write_text(
            "#!/bin/sh\n"
            f'echo "{name} $* FRONTEND=$DEBIAN_FRONTEND STDIN=$(head -c1 2>/dev/null | wc -c)"'
            f' >> {marker}\n'
            f'[ {status} = 0 ] || echo "stub {name}: a set-up reached {name}" >&2\n'
            f'exit {status}\n')
    if uid is not None:
        (stubs / "id").write_text(f'#!/bin/sh\n[ "$1" = -u ] && echo {uid} && exit 0\n'
                                  f'exec /usr/bin/id "$@"\n')
    for f in stubs.iterdir():
        f.chmod(0o755)
    path = os.pathsep.join([str(stubs), str(Path(sys.executable).parent), "/usr/bin", "/bin"])
    assert not any(shutil.which(daemon, path=path) for daemon in ("slurmctld", "munged"))
    return path, marker


def run_setup(cmd: list[str], path: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": path, "PY": sys.executable}
    return subprocess.run(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=600)


def test_demo_setup_reaches_neither_apt_nor_sudo_without_slurm(tmp_path):
    """`make setup` (what `make demo` runs first), with slurmctld and munged absent from PATH."""
    path, marker = stub_path(tmp_path)
    done = run_setup(["make", "-s", "setup"], path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not marker.exists(), marker.read_text()


def test_test_setup_not_root_names_the_missing_packages_and_installs_none_id_stub(tmp_path):
    """Not root (an `id` stub: the checkout's Python is root's here): tools/setup_test.sh says
    which system packages are missing and how to get them, calls no apt, and goes on."""
    path, marker = stub_path(tmp_path, uid=1000)
    done = run_setup(["bash", "tools/setup_test.sh"], path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not marker.exists(), marker.read_text()
    assert "slurm-wlm munge" in done.stderr and "apt-get install -y" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_test_setup_as_root_installs_the_missing_packages_without_a_prompt(tmp_path):
    """As root with slurmctld and munged absent, tools/setup_test.sh runs apt-get (a stub that
    succeeds and installs nothing) non-interactively: -y, DEBIAN_FRONTEND=noninteractive,
    standard input empty even where the caller's has data; never sudo. A failing apt-get stops
    the set-up with its status."""
    if os.geteuid() != 0:
        pytest.skip("the root branch needs root")
    path, marker = stub_path(tmp_path, status=0)
    env = {**os.environ, "PATH": path, "PY": sys.executable}
    done = subprocess.run(["bash", "tools/setup_test.sh"], cwd=REPO, env=env, input="y\n" * 10,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert marker.read_text().splitlines() == [
        "apt-get update -qq FRONTEND=noninteractive STDIN=0",
        "apt-get install -y -qq --no-install-recommends slurm-wlm munge "
        "FRONTEND=noninteractive STDIN=0"]
    path, marker = stub_path(tmp_path / "failing")
    done = subprocess.run(["bash", "tools/setup_test.sh"], cwd=REPO, env=env | {"PATH": path},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert done.returncode == 97 and "stub apt-get" in done.stderr, done.stderr
