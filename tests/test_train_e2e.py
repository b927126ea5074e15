"""End to end on a tiny synthetic dataset: s3rec-pretrain, then s3rec-finetune --init, with the
files of the contract (final.pt, epoch-N.pt, run.json, results.json, TensorBoard events in RUN/
with HParams); --init from a DeepSpeed checkpoint folder (world size 2, ZeRO-3) consolidates to
the same weights as final.pt; bad --init and bad variants stop with a clear message."""
import numpy as np
import pytest
import torch

from s3rec.metrics import metrics_from_ranks
from tests.train_helpers import (command, make_dataset, read_json, run, scalars, shm_clean,  # noqa: F401
                                 tiny_data, train_args)

pytestmark = pytest.mark.multiproc

PRETRAIN_TAGS = {"loss/aap", "loss/mip", "loss/map", "loss/sp", "loss/total", "train/lr",
                 "train/grad_norm", "perf/samples_per_s", "perf/tokens_per_s", "perf/epoch_s",
                 "perf/peak_rss_mb", "epoch/loss_aap", "epoch/loss_mip", "epoch/loss_map",
                 "epoch/loss_sp", "epoch/loss_total"}
SAMPLED = {"HR@1", "HR@5", "NDCG@5", "HR@10", "NDCG@10", "MRR"}


@pytest.fixture(scope="module")
def pretrained(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "pretrain"
    run(command("single", "s3rec.pretrain", train_args(tiny_data, out)))
    return out


def test_pretrain_writes_the_contract_files(pretrained, tiny_data):
    info = read_json(pretrained / "run.json")
    assert info["stage"] == "pretrain" and info["status"] == "done" and info["error"] is None
    assert info["epoch"] == 2 and info["world_size"] == 1 and info["seed"] == 42
    assert info["dataset"] == {"name": info["dataset"]["name"], "num_users": 200,
                               "num_items": 150, "num_attributes": 20}
    assert info["params"]["total"] == sum(v for k, v in info["params"].items() if k != "total")
    assert info["git"] and info["started"] and info["finished"]
    final = torch.load(pretrained / "final.pt", weights_only=True)
    assert set(final) >= {"model", "config", "dataset"}
    assert final["model"]["item_embeddings.weight"].shape == (152, 16)
    assert final["model"]["item_embeddings.weight"].dtype == torch.float32
    assert (pretrained / "epoch-1.pt").is_file()                 # pretrain.save_epochs: [1]
    tags = scalars(pretrained)
    assert PRETRAIN_TAGS <= set(tags)
    assert [s for s, _ in tags["epoch/loss_total"]] == [1, 2]
    assert tags["epoch/loss_total"][1][1] < tags["epoch/loss_total"][0][1]   # it learns
    # events sit directly in RUN/ (no subfolders), HParams included
    assert not [p for p in pretrained.iterdir() if p.is_dir() and p.name != "checkpoints"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    acc = EventAccumulator(str(pretrained))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    # a session only: the experiment is gathered from every run's session (Events.hparams)
    assert set(content) == {"_hparams_/session_start_info", "_hparams_/session_end_info"}
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["variant"].string_value == "s3rec"
    assert start.hparams["seed"].number_value == 42
    assert start.hparams["dataset"].string_value == info["dataset"]["name"]


def test_finetune_from_final_pt(pretrained, tiny_data, tmp_path):
    out = tmp_path / "ft"
    run(command("single", "s3rec.finetune",
                train_args(tiny_data, out, "--init", str(pretrained / "final.pt"))))
    res = read_json(out / "results.json")
    assert set(res) == {"protocol", "valid", "test", "best_epoch", "seed", "params"}
    assert res["protocol"] == "sampled-99" and set(res["valid"]) == set(res["test"]) == SAMPLED
    assert 1 <= res["best_epoch"] <= 3 and res["seed"] == 42
    assert res["params"] == read_json(pretrained / "run.json")["params"]
    # every user's test rank beside results.json, giving back its test metrics
    ranks = np.load(out / "test_ranks.npy", allow_pickle=False)
    assert ranks.dtype == np.int64 and ranks.shape == (200,) and ranks.min() >= 0
    assert metrics_from_ranks(torch.from_numpy(ranks)) == pytest.approx(res["test"], abs=1e-12)
    info = read_json(out / "run.json")
    assert info["stage"] == "finetune" and info["status"] == "done"
    assert info["protocol"] == "sampled-99"
    tags = scalars(out)
    assert {"loss/finetune", "epoch/loss_finetune", "valid/MRR", "test/MRR"} <= set(tags)
    assert tags["test/MRR"] == [(res["best_epoch"], pytest.approx(res["test"]["MRR"]))]
    best_valid = dict(tags["valid/MRR"])[res["best_epoch"]]
    assert best_valid == pytest.approx(res["valid"]["MRR"]) == max(v for _, v in tags["valid/MRR"])


def test_full_ranking_protocol(pretrained, tiny_data, tmp_path):
    out = tmp_path / "ft"
    run(command("single", "s3rec.finetune", train_args(
        tiny_data, out, "--init", str(pretrained / "epoch-1.pt"), "finetune.protocol=full",
        "finetune.epochs=1")))
    res = read_json(out / "results.json")
    assert res["protocol"] == "full"
    assert set(res["test"]) == {"HR@5", "NDCG@5", "HR@10", "NDCG@10", "HR@20", "NDCG@20"}


def test_init_from_a_zero3_world2_checkpoint_folder(tiny_data, tmp_path, shm_clean):
    pre = tmp_path / "pre"
    run(command("torchrun", "s3rec.pretrain", train_args(
        tiny_data, pre, "pretrain.epochs=1", "deepspeed.zero_stage=3")))
    from s3rec.engine.checkpoint import consolidate_folder, read_latest
    folder = consolidate_folder(pre / "checkpoints", read_latest(pre / "checkpoints"))
    final = torch.load(pre / "final.pt", weights_only=True)["model"]
    assert set(folder) == set(final)
    for k in final:
        assert torch.equal(folder[k], final[k]), k
    out = tmp_path / "ft"
    run(command("single", "s3rec.finetune",
                train_args(tiny_data, out, "--init", str(pre), "finetune.epochs=1")))
    assert read_json(out / "results.json")["best_epoch"] == 1


def test_bad_init_and_variants_stop_with_a_message(pretrained, tiny_data, tmp_path):
    p = run(command("single", "s3rec.finetune", train_args(
        tiny_data, tmp_path / "a", "--init", str(tmp_path / "missing.pt"))), expect=2)
    assert "missing.pt" in p.stderr and "does not exist" in p.stderr
    assert read_json(tmp_path / "a" / "run.json")["status"] == "failed"
    other = make_dataset(tmp_path, users=120, items=130, attributes=20)
    p = run(command("single", "s3rec.finetune", train_args(
        other, tmp_path / "b", "--init", str(pretrained / "final.pt"))), expect=2)
    assert "num_users" in p.stderr or "num_items" in p.stderr
    p = run(command("single", "s3rec.finetune", train_args(tiny_data, tmp_path / "c")), expect=2)
    assert "variant=finetune-only" in p.stderr
    p = run(command("single", "s3rec.pretrain", train_args(
        tiny_data, tmp_path / "d", "variant=finetune-only")), expect=2)
    assert "finetune-only has no pretraining stage" in p.stderr


def test_out_that_is_a_file_or_under_one_stops_with_a_message(tiny_data, tmp_path):
    (tmp_path / "afile").write_text("mine")
    for module, out, extra, why in (
            ("s3rec.pretrain", tmp_path / "afile", [], "exists and is not a folder"),
            ("s3rec.finetune", tmp_path / "afile" / "run", ["variant=finetune-only"],
             "cannot be created (Not a directory")):
        p = run(command("single", module, train_args(tiny_data, out, *extra)), expect=2)
        assert f"error: --out {out}: {why}" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert (tmp_path / "afile").read_text() == "mine"


def test_bf16_zero2_final_pt_holds_the_fp32_master_weights(tiny_data, tmp_path, shm_clean):
    """bf16 (CPU: ZeRO >= 1): the module runs in bf16; final.pt must hold the fp32 masters."""
    pre = tmp_path / "pre"
    run(command("torchrun", "s3rec.pretrain", train_args(
        tiny_data, pre, "pretrain.epochs=1", "deepspeed.zero_stage=2",
        "deepspeed.precision=bf16")))
    final = torch.load(pre / "final.pt", weights_only=True)["model"]
    assert all(v.dtype == torch.float32 for v in final.values())
    w = final["item_embeddings.weight"]
    assert not torch.equal(w, w.to(torch.bfloat16).float())    # not merely bf16 values widened
    losses = [v for _, v in scalars(pre)["loss/total"]]
    assert all(v == v and v < 1e6 for v in losses)              # finite


def test_ablation_skips_and_does_not_log_a_zero_weight_objective(tiny_data, tmp_path):
    """pretrain.weights.sp=0: SP is neither computed nor logged (no flat zero curve), the other
    objectives are; pretrain.sp_negatives reaches the sampler (an unknown value is refused)."""
    out = tmp_path / "no-sp"
    run(command("single", "s3rec.pretrain",
                train_args(tiny_data, out, "pretrain.weights.sp=0", "pretrain.epochs=1",
                           "pretrain.sp_negatives=train")))
    tags = scalars(out)
    assert "loss/sp" not in tags and "epoch/loss_sp" not in tags
    assert {"loss/aap", "loss/mip", "loss/map", "loss/total", "epoch/loss_total"} <= set(tags)
    assert read_json(out / "run.json")["config"]["pretrain"]["sp_negatives"] == "train"
    bad = run(command("single", "s3rec.pretrain",
                      train_args(tiny_data, tmp_path / "bad", "pretrain.sp_negatives=test")),
              expect=2)
    assert "pretrain.sp_negatives" in bad.stderr + bad.stdout


def test_mean_reduction_logs_the_mean_of_the_batch_means(tiny_data, tmp_path):
    """pretrain.reduction=mean: each loss is a mean over its batch, and the log is the mean of
    those means (not their sum divided by the samples, 64x smaller here): SP starts at ln 2 per
    row, and the logged total is the weighted sum of the logged objectives."""
    import math
    out = tmp_path / "mean"
    run(command("single", "s3rec.pretrain", train_args(tiny_data, out, "pretrain.epochs=1",
                                                       "pretrain.reduction=mean")))
    e = {k.split("_")[-1]: v[-1][1] for k, v in scalars(out).items() if k.startswith("epoch/")}
    assert e["sp"] == pytest.approx(math.log(2), abs=0.02)
    assert e["mip"] == pytest.approx(math.log(2), abs=0.05)      # per masked position
    assert e["total"] == pytest.approx(0.2 * e["aap"] + e["mip"] + e["map"] + 0.5 * e["sp"],
                                       rel=1e-5)


@pytest.mark.parametrize("zero", ["zero_stage=1", "zero_stage=2", "zero_stage=2 precision=bf16"])
def test_zero_grad_norm_at_log_steps_equals_deepspeeds_per_step_norm(tiny_data, tmp_path, zero,
                                                                     shm_clean):
    """ZeRO 1-2 runs do not compute the gradient norm every step (compute_grad_norm=false); the
    loop computes it at its log steps. The logged train/grad_norm, and the trained weights, equal
    those of a run whose DeepSpeed file makes DeepSpeed compute it every step."""
    import json
    keys = [f"deepspeed.{kv}" for kv in zero.split()]
    every_step = tmp_path / "every-step.json"
    every_step.write_text(json.dumps({"zero_optimization": {"compute_grad_norm": True}}))
    runs = {}
    for name, extra in (("at_log", []), ("every_step", [f"deepspeed.config_file={every_step}"])):
        out = tmp_path / name
        run(command("single", "s3rec.pretrain", train_args(tiny_data, out, *keys, *extra,
                                                           "pretrain.epochs=1")))
        runs[name] = out
    norms = {k: scalars(v)["train/grad_norm"] for k, v in runs.items()}
    assert len(norms["at_log"]) >= 2 and norms["at_log"] == norms["every_step"]
    a, b = (torch.load(v / "final.pt", weights_only=True)["model"] for v in runs.values())
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_profile_window_writes_a_trace_and_a_table_per_rank(tiny_data, tmp_path, shm_clean):
    """logging.profile_steps=[1, 3] under torchrun, world size 2: each rank writes a Chrome trace
    that parses and holds the model's operators, and a table whose first line gives the wall ms
    per step; nothing half-written is left. A malformed window stops the run naming the key."""
    import json
    out = tmp_path / "prof"
    run(command("torchrun", "s3rec.pretrain",
                train_args(tiny_data, out, "pretrain.epochs=1", "logging.profile_steps=[1,3]")))
    names = sorted(p.name for p in (out / "profile").iterdir())
    assert names == [f"steps-1-3.rank{r}.{ext}" for r in (0, 1) for ext in ("pt.trace.json", "txt")]
    for r in (0, 1):
        events = json.loads((out / "profile" / f"steps-1-3.rank{r}.pt.trace.json").read_text())
        ops = {e.get("name") for e in events["traceEvents"]}
        assert {"aten::mm", "aten::embedding"} <= ops
        table = (out / "profile" / f"steps-1-3.rank{r}.txt").read_text()
        first = table.splitlines()[0]
        assert first.startswith(f"steps 1..2 (optimizer steps), rank {r}, cpu: ")
        assert float(first.split(": ")[1].split()[0]) > 0 and "aten::mm" in table
    bad = run(command("single", "s3rec.pretrain",
                      train_args(tiny_data, tmp_path / "bad", "logging.profile_steps=[3,1]")),
              expect=2)
    assert "logging.profile_steps" in bad.stderr


def test_static_shapes_follow_the_default_path_and_compile_under_torchrun(tiny_data, tmp_path,
                                                                           shm_clean):
    """pretrain.static_shapes: with dropout off (so both paths draw nothing) the epoch losses equal
    the default path's up to float summation order. pretrain.compile=reduce-overhead (no CUDA
    graph on CPU: the compiled graph alone) trains under torchrun, world size 2, ZeRO 1, with
    finite losses and without a recompile, and its final.pt fine-tunes."""
    no_drop = ("model.hidden_dropout=0", "model.attention_dropout=0", "pretrain.epochs=1")
    losses = {}
    for name, extra in (("default", ()), ("static", ("pretrain.static_shapes=true",))):
        out = tmp_path / name
        run(command("single", "s3rec.pretrain", train_args(tiny_data, out, *no_drop, *extra)))
        losses[name] = {k: v[-1][1] for k, v in scalars(out).items() if k.startswith("epoch/")}
    assert set(losses["static"]) == set(losses["default"]) and len(losses["default"]) == 5
    for k, v in losses["default"].items():
        assert abs(losses["static"][k] - v) <= 1e-4 * abs(v), (k, losses["static"][k], v)
    out = tmp_path / "compiled"
    p = run(command("torchrun", "s3rec.pretrain", train_args(
        tiny_data, out, "pretrain.static_shapes=true", "pretrain.compile=reduce-overhead",
        "deepspeed.zero_stage=1")), timeout=480, TORCH_LOGS="recompiles")
    # one graph for the whole run, the short last batch of each epoch included (past 8
    # recompiles dynamo would fall back to eager; on a GPU each one is also a new CUDA graph)
    assert "Recompiling function" not in p.stderr, p.stderr[-3000:]
    assert read_json(out / "run.json")["config"]["pretrain"]["compile"] == "reduce-overhead"
    total = [v for _, v in scalars(out)["epoch/loss_total"]]
    assert len(total) == 2 and all(v == v for v in total) and total[1] < total[0]
    run(command("single", "s3rec.finetune", train_args(
        tiny_data, tmp_path / "ft", "--init", str(out / "final.pt"), "finetune.epochs=1")))
