"""The benchmark scripts still run end to end and write what the README quotes (on a tiny
synthetic dataset and model: these check the scripts, not the figures)."""
from __future__ import annotations

import sys

import pytest

from tests.train_helpers import REPO, read_json, run, tiny_data  # noqa: F401 (fixture)

TINY_MODEL = ["model.hidden_size=16", "model.num_layers=1", "model.num_heads=2",
              "model.inner_size=32", "model.max_seq_length=20", "model.head_rank=4",
              "pretrain.batch_size=64", "finetune.batch_size=32", "finetune.eval_batch_size=64"]


@pytest.mark.slow
def test_train_speed_times_every_stage_and_counts_ops(tiny_data, tmp_path):
    out = tmp_path / "speed.json"
    run([sys.executable, "benchmarks/train_speed.py", "--data", str(tiny_data), "--json", str(out),
         "--overhead-steps", "5", *TINY_MODEL], timeout=400)
    f = read_json(out)
    for key in ("pretrain_epoch_s", "finetune_epoch_s", "eval_sampled_s", "eval_full_s",
                "plain_step_ms", "deepspeed_step_ms", "peak_rss_mb"):
        assert f[key] > 0, key
    for protocol in ("sampled", "full"):
        assert 0 <= f[f"eval_{protocol}_metrics"]["HR@10"] <= 1
    # DeepSpeed's step dispatches at least what the plain loop does (forward, backward, Adam)
    assert f["deepspeed_ops_per_step"] >= f["plain_ops_per_step"] > 100
    assert f["plain_syncs_per_step"] is None            # counted on CUDA only
    assert not list(tmp_path.glob(".*tmp*"))             # written by rename, nothing half-written


@pytest.mark.multiproc
def test_scaling_runs_world_sizes_one_and_two(tiny_data, tmp_path):
    out = tmp_path / "scaling.json"
    run([sys.executable, "benchmarks/scaling.py", "--data", str(tiny_data), "--json", str(out),
         "--threads", "1", *TINY_MODEL, "logging.every_steps=1"], timeout=400)
    f = read_json(out)
    for world in ("world1", "world2"):
        assert f[world]["samples_per_s"] > 0 and f[world]["threads_per_rank"] == 1
        assert f[world]["median_window_samples_per_s"] > 0
    assert f["speedup"] == pytest.approx(f["world2"]["samples_per_s"] / f["world1"]["samples_per_s"])


def test_graph_step_times_the_eager_step_and_says_where_no_graph_ran(tiny_data, tmp_path):
    """benchmarks/graph_step.py on CPU: the eager step is timed and the epoch projected from the
    real batch count; the CUDA-graph figures are null (no CUDA here), not invented."""
    out = tmp_path / "graph.json"
    run([sys.executable, "benchmarks/graph_step.py", "--data", str(tiny_data), "--json", str(out),
         "--steps", "3", *TINY_MODEL], timeout=200)
    f = read_json(out)
    assert f["device"] == "cpu" and f["graph_step_ms"] is None and f["graph_epoch_s"] is None
    assert f["eager_step_ms"] > 0 and f["steps_per_epoch"] > 0
    assert f["eager_epoch_s"] == pytest.approx(f["steps_per_epoch"] * f["eager_step_ms"] / 1000)
    assert 1 <= f["batch_rows"] <= 64 and 1 <= f["batch_length"] <= 20
