"""A TensorBoard events file cut off mid-record (issue 17, item 8c): TensorBoard's reader stops
at the short record without a word, so read_runs walks the record framing itself: an error
naming the file for a stopped run, a note (and the whole records) for a running one."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from s3rec.analysis.read_runs import RunFolderError, events_damage, read_runs
from tests.train_helpers import make_dataset, run, train_args


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A real 2-epoch tiny pretraining run (its own events file)."""
    root = tmp_path_factory.mktemp("events")
    data = make_dataset(root)
    out = root / "runs" / "pre"
    run([sys.executable, "-m", "s3rec.pretrain", *train_args(data, out)])
    return out


def cut(run_dir: Path, dst: Path, nbytes: int, status: str | None = None) -> Path:
    """A copy of `run_dir` under dst/runs/pre whose events file lost its last `nbytes` bytes."""
    folder = dst / "runs" / "pre"
    shutil.copytree(run_dir, folder, ignore=shutil.ignore_patterns("checkpoints", "*.pt"))
    (events,) = folder.glob("events.out.tfevents*")
    data = events.read_bytes()
    events.write_bytes(data[:len(data) - nbytes])
    if status:
        rj = json.loads((folder / "run.json").read_text())
        rj["status"] = status
        (folder / "run.json").write_text(json.dumps(rj))
    return folder


def test_intact_events_read_without_notes(tiny_run):
    (events,) = tiny_run.glob("events.out.tfevents*")
    assert events_damage(events) is None
    (r,) = read_runs(tiny_run.parent)
    assert r.scalars and not any("events" in n for n in r.notes)


def test_a_finished_run_with_a_cut_events_file_is_refused(tiny_run, tmp_path):
    folder = cut(tiny_run, tmp_path, 7)
    (events,) = folder.glob("events.out.tfevents*")
    size = events.stat().st_size
    with pytest.raises(RunFolderError) as e:
        read_runs(folder.parent)
    msg = str(e.value)
    assert msg.startswith(f"{events}: ends inside a record at byte ") and f"of {size}" in msg
    assert "run.json says done" in msg and "`truncate -s " in msg
    # the command the message gives keeps the whole records, and the run reads again
    keep = int(msg.split("truncate -s ")[1].split()[0])
    events.write_bytes(events.read_bytes()[:keep])
    (r,) = read_runs(folder.parent)
    assert r.scalars and events_damage(events) is None


def test_a_running_run_with_a_cut_events_file_gets_a_note(tiny_run, tmp_path):
    full = {t: len(v) for t, v in read_runs(tiny_run.parent)[0].scalars.items()}
    folder = cut(tiny_run, tmp_path, 30, status="running")
    (r,) = read_runs(folder.parent)
    note = [n for n in r.notes if "tfevents" in n]
    assert len(note) == 1 and "ends inside a record at byte" in note[0]
    assert "still being written" in note[0] and r.status == "unfinished"
    # the whole records before the cut are all read
    assert sum(len(v) for v in r.scalars.values()) >= sum(full.values()) - 1


def test_a_cut_inside_a_record_header_is_named(tiny_run, tmp_path):
    folder = cut(tiny_run, tmp_path, 0)
    (events,) = folder.glob("events.out.tfevents*")
    with open(events, "ab") as f:
        f.write(b"\x10\x00\x00")            # 3 bytes of a next record's 12-byte header
    assert events_damage(events) == (events.stat().st_size - 3, "ends inside a record header")
    with pytest.raises(RunFolderError, match="ends inside a record header"):
        read_runs(folder.parent)


def test_a_damaged_record_length_is_named(tiny_run, tmp_path):
    folder = cut(tiny_run, tmp_path, 0)
    (events,) = folder.glob("events.out.tfevents*")
    data = bytearray(events.read_bytes())
    data[0] ^= 0x01                          # the first record's length, its crc now wrong
    events.write_bytes(bytes(data))
    assert events_damage(events) == (0, "has a damaged record header")


@pytest.mark.parametrize("status", ["done", "running"])
def test_a_flipped_bit_inside_a_records_data_is_named(tiny_run, tmp_path, status):
    """TensorBoard's reader drops every record from the damaged one on, at debug level only: a
    report would show a shorter run without a word."""
    folder = cut(tiny_run, tmp_path, 0, status=status)
    (events,) = folder.glob("events.out.tfevents*")
    data = bytearray(events.read_bytes())
    first = 16 + int.from_bytes(data[:8], "little")      # the second record starts here
    data[first + 12 + 2] ^= 0x10                         # a bit of its data, its header intact
    events.write_bytes(bytes(data))
    assert events_damage(events) == (first, "has a damaged record (its data fails its crc32c)")
    with pytest.raises(RunFolderError) as e:
        read_runs(folder.parent)
    msg = str(e.value)
    assert msg.startswith(f"{events}: has a damaged record (its data fails its crc32c) at byte "
                          f"{first} of {len(data)}, and run.json says {status}")
    assert f"`truncate -s {first} {events}`" in msg
