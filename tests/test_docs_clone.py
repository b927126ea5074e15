"""The documents are written for someone who has only the clone: the README stays short, no
shipped file points outside the repository or dates its text to a numbered period of work, every
relative link resolves, and the bring-your-own-data recipe of docs/data.md really prepares a
dataset."""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from s3rec.data.reader import Dataset

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 150
# ../shared and the notes kept there are not part of a clone; "session N" dates work to a period.
FORBIDDEN = re.compile(r"\.\./shared|shared notes|shared/notes|/ \"shared\"|s3rec-reference|"
                       r"interface\.md|design\.md|[Ss]essions? [0-9]")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
DOCS = ("README.md", "docs/*.md", "slurm/README.md", "analysis/README.md",
        "configs/deepspeed/README.md")


def shipped_files() -> list[Path]:
    """Tracked and new (not ignored) files outside tests/."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the shipped files are git's list")
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [REPO / p for p in out.split("\0")
            if p and not p.startswith("tests/") and (REPO / p).is_file()]


def forbidden_lines(files: list[Path]) -> list[str]:
    hits = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:        # binary files carry no prose
            continue
        hits += [f"{f.relative_to(REPO)}:{n}: {line.strip()}"
                 for n, line in enumerate(text.splitlines(), 1) if FORBIDDEN.search(line)]
    return hits


def test_readme_is_at_most_150_lines():
    lines = (REPO / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines"


def test_no_shipped_file_points_at_shared_or_names_a_numbered_session():
    hits = forbidden_lines(shipped_files())
    assert not hits, "\n".join(hits)


def test_every_relative_link_of_the_documents_resolves():
    missing = []
    for pattern in DOCS:
        for doc in sorted(REPO.glob(pattern)):
            for target in LINK.findall(doc.read_text()):
                if "://" not in target and not (doc.parent / target).exists():
                    missing.append(f"{doc.relative_to(REPO)} -> {target}")
    assert not missing, "\n".join(missing)


def load_prep_benchmark():
    spec = importlib.util.spec_from_file_location("prep_benchmark", REPO / "benchmarks" / "prep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prep_benchmark_takes_the_release_data_from_its_option_or_env_var_only(monkeypatch,
                                                                               tmp_path):
    prep = load_prep_benchmark()
    monkeypatch.delenv(prep.RELEASE_DATA_ENV, raising=False)
    assert prep.build_parser().parse_args(["--json", "x.json"]).data is None
    monkeypatch.setenv(prep.RELEASE_DATA_ENV, str(tmp_path))
    assert prep.build_parser().parse_args(["--json", "x.json"]).data == tmp_path


def data_md_snippet() -> str:
    text = (REPO / "docs" / "data.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1, "docs/data.md: expected one python block (the CSV recipe)"
    return blocks[0]


def write_csvs(folder: Path) -> None:
    """Users u0..u3 (newest first in the file), u4 with 2 interactions (dropped), and f0..f11
    who use 10 of the 120 items each."""
    rows = ["user,item,timestamp"]
    for u in range(4):
        rows += [f"u{u},sku{(u * 7 + k) % 120},{1000 - k}" for k in range(6)]
    rows += [f"u4,sku{k},{k}" for k in range(2)]
    rows += [f"f{j},sku{10 * j + k},{2000 + k}" for j in range(12) for k in range(10)]
    (folder / "interactions.csv").write_text("\n".join(rows) + "\n")
    (folder / "item_attributes.csv").write_text("item,attribute\nsku0,red\nsku0,big\nsku5,red\n")


def test_data_md_recipe_turns_a_csv_into_a_release_dataset(tmp_path):
    write_csvs(tmp_path)
    subprocess.run([sys.executable, "-c", data_md_snippet()], cwd=tmp_path, check=True)
    seqs = (tmp_path / "mine" / "Mine.txt").read_text().splitlines()
    assert len(seqs) == 16                                  # u4 (2 items) is left out
    first = seqs[0].split()
    assert first[0] == "1" and len(first) == 7              # oldest first: timestamps 995..1000
    out = tmp_path / "data"
    subprocess.run(["s3rec-prep", "release", "--src", str(tmp_path / "mine"), "--name", "Mine",
                    "--out", str(out)], check=True, capture_output=True)
    ds = Dataset(out)
    assert (ds.num_users, ds.num_items, ds.num_attributes) == (16, 120, 2)
