"""A real TensorBoard on loopback over a folder, and its HParams plugin's endpoints read back."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from tests.train_helpers import clean_env, free_port

STATUSES = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]


@contextmanager
def tensorboard(logdir: Path, wait_s: float = 90.0):
    """Yields the base URL of `tensorboard --logdir logdir` on 127.0.0.1, once it lists runs."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir),
                             "--host", "127.0.0.1", "--port", str(port), "--reload_interval",
                             "1", "--load_fast", "false"], env=clean_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                with urllib.request.urlopen(f"{url}/data/runs", timeout=5) as r:
                    if json.loads(r.read()):
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"TensorBoard did not come up on {url}: {proc.stderr.read()}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def hparams_experiment(url: str) -> dict:
    return _post(f"{url}/data/plugin/hparams/experiment", {"experimentName": ""})


def hparams_sessions(url: str) -> list[dict]:
    """Every session (one per training run) with its hparams and metric values."""
    body = {"experimentName": "", "allowedStatuses": STATUSES, "colParams": [],
            "startIndex": 0, "sliceSize": 10_000}
    groups = _post(f"{url}/data/plugin/hparams/session_groups", body)["sessionGroups"]
    return [s for g in groups for s in g["sessions"]]
