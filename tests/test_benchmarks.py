"""The benchmark scripts still run end to end and write what the README quotes (on a tiny
synthetic dataset and model: these check the scripts, not the figures)."""
from __future__ import annotations

import sys

import pytest

from tests.train_helpers import REPO, clean_env, read_json, run, tiny_data  # noqa: F401 (fixture)

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


def test_micro_times_each_host_piece_and_records_the_machine(tiny_data, tmp_path):
    out = tmp_path / "sub" / "micro.json"          # a folder that does not exist yet
    p = run([sys.executable, "benchmarks/micro.py", "--data", str(tiny_data), "--json", str(out),
             "--steps", "3", *TINY_MODEL], timeout=200)
    f = read_json(out)
    assert set(f["adam_step_ms"]) == {"fused", "foreach", "loop"}
    assert all(v > 0 for v in f["adam_step_ms"].values()) and f["tensors"] > 10
    assert f["sample_epoch_s"] > 0 and f["batch_ms"] > 0 and f["batches_per_epoch"] > 0
    assert f["dropout_speedup"] == pytest.approx(f["dropout_ms"]["bernoulli"]
                                                 / f["dropout_ms"]["packed"])
    assert f["machine"]["cpus"] >= 1 and f["machine"]["device"] == "cpu"
    assert "| adam_step_ms.fused |" in p.stdout                 # the printed table


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


@pytest.mark.slow
def test_gpu_sh_runs_every_part_on_cpu(tiny_data, tmp_path):
    """benchmarks/gpu.sh with GPU_SH_ON_CPU=1 and a tiny model: every command a lent GPU machine
    will run (eager and compiled fixed-shape pretraining, bf16 ZeRO 2, fine-tune, step table,
    graph floor) is valid and finishes, and gpu.json gathers each part. The figures are CPU ones
    and not asserted: the GPU figures come from a lent machine (README)."""
    import subprocess
    out = tmp_path / "gpu"
    p = subprocess.run(["bash", "benchmarks/gpu.sh", str(tiny_data), str(out),
                        str(tmp_path / "copy")], cwd=REPO,
                       capture_output=True, text=True, timeout=600,
                       env=clean_env(GPU_SH_ON_CPU=1, GPU_SH_EXTRA=" ".join(TINY_MODEL)))
    assert p.returncode == 0, p.stderr[-4000:]
    assert "part failed" not in p.stderr
    f = read_json(out / "gpu.json")
    assert set(f["epoch_s"]) == {"pretrain", "pretrain_static", "pretrain_static_bf16_zero2",
                                 "finetune"}
    assert all(len(v) == 2 and min(v) > 0 for v in f["epoch_s"].values())
    assert set(f["steps"]) == {"step_fp32_zero0", "step_bf16_zero2", "step_fp32_zero0_static"}
    assert f["steps"]["step_fp32_zero0_static"]["deepspeed_ops_per_step"] is None   # compiled
    assert f["graph_step"]["graph_step_ms"] is None and f["finetune_results"]["test"]
    assert read_json(tmp_path / "copy" / "gpu.json") == f          # the copy for a lent machine
    # each part's log comes back, and the compiled parts' CUDA-graph refusals are counted
    assert (tmp_path / "copy" / "part-static_bf16_zero2.log").stat().st_size > 0
    assert set(f["cudagraph_skip_lines"]) == {"part-static_bf16_zero2", "part-static",
                                             "part-step_static"}
