"""World size 2 with half the micro-batch follows world size 1: same per-step losses and gradient
norms and the same evaluation metrics (fp32, CPU, ZeRO 0-2).

Dropout is off here: its masks come from each rank's own generator, so with dropout the two runs
are different (equally valid) random draws. The data side needs nothing: every rank sees the
same global batch, sliced. Tolerance: relative 1e-5 on every logged step loss (float sums in a
different order, compounded over the steps); weights after an epoch within 1e-4; metrics
equal to 1e-12 (float64 sums)."""
import numpy as np
import pytest
import torch

from tests.train_helpers import TINY as TINY_CONFIG, command, read_json, run, scalars, shm_clean, tiny_data, train_args  # noqa: F401

pytestmark = pytest.mark.multiproc

NO_DROPOUT = ("model.hidden_dropout=0", "model.attention_dropout=0", "logging.every_steps=1")
FT = ("variant=finetune-only", "finetune.epochs=2", "finetune.batch_size=32", *NO_DROPOUT)


@pytest.fixture(scope="module")
def reference_finetune(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("w1") / "ft"
    run(command("single", "s3rec.finetune", train_args(tiny_data, out, *FT)))
    return out


def _close(a, b, rel=1e-5):
    assert [s for s, _ in a] == [s for s, _ in b]
    for (step, x), (_, y) in zip(a, b):
        assert y == pytest.approx(x, rel=rel), f"step {step}: {x} vs {y}"


@pytest.mark.parametrize("zero,accum", [(0, 1), (1, 2), (2, 1)])
def test_finetune_world2_matches_world1(zero, accum, reference_finetune, tiny_data, tmp_path,
                                        shm_clean):
    out = tmp_path / "ft"
    run(command("torchrun", "s3rec.finetune", train_args(
        tiny_data, out, *FT, f"deepspeed.zero_stage={zero}", f"deepspeed.grad_accum={accum}")))
    ref, got = scalars(reference_finetune), scalars(out)
    assert len(ref["loss/finetune"]) == 14                      # 7 steps x 2 epochs
    _close(ref["loss/finetune"], got["loss/finetune"])
    _close(ref["epoch/loss_finetune"], got["epoch/loss_finetune"])
    # ZeRO 1-2 take the norm over the reduced gradient partitions at the log step (a collective
    # over both ranks); stage 0 from the whole gradients: the same global norm
    _close(ref["train/grad_norm"], got["train/grad_norm"])
    r1, r2 = read_json(reference_finetune / "results.json"), read_json(out / "results.json")
    assert r2["best_epoch"] == r1["best_epoch"]
    for split in ("valid", "test"):
        assert r2[split] == pytest.approx(r1[split], rel=1e-12, abs=1e-12)
    # each rank ranked its own share of the users; the gathered ranks are one process's
    assert np.array_equal(np.load(out / "test_ranks.npy"),
                          np.load(reference_finetune / "test_ranks.npy"))


@pytest.mark.parametrize("static", ["false", "true"])
def test_pretrain_world2_matches_world1(static, tiny_data, tmp_path, shm_clean):
    """static=true: pretrain.static_shapes, each rank's half padded to the same fixed shape (the
    epoch's short last batch with filler rows on both ranks)."""
    args = ("pretrain.epochs=1", f"pretrain.static_shapes={static}", *NO_DROPOUT)
    one, two = tmp_path / "w1", tmp_path / "w2"
    run(command("single", "s3rec.pretrain", train_args(tiny_data, one, *args)))
    run(command("torchrun", "s3rec.pretrain", train_args(tiny_data, two, *args)))
    a, b = scalars(one), scalars(two)
    for name in ("aap", "mip", "map", "sp", "total"):
        assert len(a[f"loss/{name}"]) > 10
        _close(a[f"loss/{name}"], b[f"loss/{name}"])
    w1 = torch.load(one / "final.pt", weights_only=True)["model"]
    w2 = torch.load(two / "final.pt", weights_only=True)["model"]
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-4)   # Adam: near-zero grads


def _short_last_batch(total: int) -> tuple[int, int]:
    """(grad_accum, batch size) at world size 2: a batch that splits evenly into 2 x grad_accum
    micro-batches, with an epoch that ends in fewer rows than that, so some are empty."""
    for accum in (3, 2):
        slices = 2 * accum
        for b in range(slices * 2, slices * 40, slices):
            if 0 < total % b < slices:
                return accum, b
    raise AssertionError(f"no batch size for {total} rows")


@pytest.mark.parametrize("stage", ["finetune", "pretrain_static"])
def test_empty_shares_of_a_short_last_batch_add_nothing(stage, tiny_data, tmp_path, shm_clean):
    """World size 2 x 2-3 micro-batches against one process: the epoch's last global batch has
    fewer rows than the slices, so some micro-batches are empty; they train (a 0 reaching the
    same parameters on both ranks, ZeRO 2) and the runs agree as above."""
    from s3rec.config import load_config
    from s3rec.data.reader import Dataset
    from s3rec.pretrain_step import pretrain_sampler
    ds = Dataset(tiny_data)
    if stage == "finetune":
        accum, b = _short_last_batch(ds.num_users)
        module, args = "s3rec.finetune", (*FT, f"finetune.batch_size={b}")
        tags = ("loss/finetune", "epoch/loss_finetune")
    else:
        accum, b = _short_last_batch(pretrain_sampler(load_config(TINY_CONFIG, []),
                                                      ds).num_samples)
        module, tags = "s3rec.pretrain", ("loss/total", "loss/mip", "epoch/loss_total")
        args = ("pretrain.epochs=1", "pretrain.static_shapes=true", f"pretrain.batch_size={b}",
                *NO_DROPOUT)
    one, two = tmp_path / "w1", tmp_path / "w2"
    run(command("single", module, train_args(tiny_data, one, *args)))
    run(command("torchrun", module, train_args(tiny_data, two, *args, "deepspeed.zero_stage=2",
                                               f"deepspeed.grad_accum={accum}")))
    a, c = scalars(one), scalars(two)
    for tag in tags:
        _close(a[tag], c[tag])
    if stage == "finetune":
        r1, r2 = read_json(one / "results.json"), read_json(two / "results.json")
        for split in ("valid", "test"):
            assert r2[split] == pytest.approx(r1[split], rel=1e-12, abs=1e-12)


def test_more_ranks_than_users_evaluates_like_one_process_under_zero3(tmp_path, shm_clean):
    """One user, two ranks: rank 1 has no one to evaluate, yet under ZeRO 3 every forward gathers
    parameters collectively, so it must still run as many (stand-in) forwards as rank 0; before,
    it skipped them and rank 0 waited forever. Metrics as one process's."""
    from tests.train_helpers import make_dataset
    data = make_dataset(tmp_path, users=1)
    args = (*FT, "finetune.epochs=1")
    one, two = tmp_path / "w1", tmp_path / "w2"
    run(command("single", "s3rec.finetune", train_args(data, one, *args)))
    run(command("torchrun", "s3rec.finetune", train_args(data, two, *args,
                                                          "deepspeed.zero_stage=3")), timeout=180)
    r1, r2 = read_json(one / "results.json"), read_json(two / "results.json")
    for split in ("valid", "test"):
        assert r2[split] == pytest.approx(r1[split], rel=1e-12, abs=1e-12)
    assert r1["test"]["MRR"] > 0
