"""s3rec-finetune --data DATASET --out RUN [--init CHECKPOINT] [--config YAML] [key=value ...]

Fine-tuning (next-item prediction, causal encoder) with early stopping on the validation set
(finetune.patience epochs without strict improvement of MRR for the sampled protocol, NDCG@20 for
full ranking); the best epoch's weights are then tested once. Writes RUN/results.json.

--init: a pretraining model file (RUN/final.pt, RUN/epoch-N.pt) or a DeepSpeed checkpoint folder
(a pretraining RUN, RUN/checkpoints or one tag in it; any world size and ZeRO stage, consolidated
to fp32). Without --init the variant must be finetune-only (training from scratch).
Started again with the same --out, it resumes from RUN/checkpoints/latest.

Batches are the original's plain random batches of users by default; finetune.bucket_by_length=true
groups users of similar length (~5x less padding on Beauty, faster), but it changes each batch's
loss mean and, measured on Beauty from the authors' checkpoint, costs about .01 of test HR@10.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from s3rec import distributed as dist
from s3rec.config import ConfigError, FinetuneConfig
from s3rec.engine import checkpoint as ckpt
from s3rec.engine import run
from s3rec.engine.evaluate import evaluate
from s3rec.engine.loop import Task, Trainer
from s3rec.runlog import (BEST_MODEL, RESULTS_JSON, TEST_RANKS, write_json_atomic,
                          write_npy_atomic)

if TYPE_CHECKING:
    from s3rec.data.finetune_samples import FinetuneSampler
    from s3rec.objectives import FinetuneObjective

PROG = "s3rec-finetune"


def get_args_parser():
    p = run.base_parser(PROG, __doc__.split("\n\n")[1])
    p.add_argument("--init", default=None,
                   help="pretrained weights: RUN/final.pt, RUN/epoch-N.pt or a DeepSpeed "
                        "checkpoint folder")
    return p


def load_init(path: str, cfg, ds) -> dict:
    """The state dict to start from, checked against this dataset. Raises CheckpointError."""
    from s3rec.model import CheckpointError, load_model_file
    from s3rec.model.field_heads import state_attribute_size
    p = Path(path)
    info = run.dataset_info(ds)
    if p.is_file():
        return load_model_file(p, cfg, info)
    if not p.exists():
        raise CheckpointError(f"--init {p}: does not exist")
    found = ckpt.find_checkpoint_folder(p)
    if found is None:
        raise CheckpointError(f"--init {p}: a folder, but not a DeepSpeed checkpoint (no "
                              f"'latest' file, no *model_states.pt); pass RUN/final.pt instead")
    root, tag = found
    sd = ckpt.consolidate_folder(root, tag)
    emb = sd.get("item_embeddings.weight")
    att = state_attribute_size(sd)          # one table, or one per attribute field
    if emb is None or att is None:
        raise CheckpointError(f"--init {root / tag}: no item/attribute embeddings: not an S3Rec "
                              f"checkpoint")
    if emb.shape[0] != ds.item_size or att != ds.attribute_size:
        raise CheckpointError(
            f"--init {root / tag}: made for item_size {emb.shape[0]}, attribute_size "
            f"{att}, but dataset {ds.name} has item_size {ds.item_size}, "
            f"attribute_size {ds.attribute_size}")
    return sd


def save_best_model(engine, cfg, s, best_tag: str | None) -> None:
    """RUN/best.pt: the weights being tested. Half precision takes the fp32 master weights of the
    best tag; with no validated epoch (finetune.epochs=0) the fp32 module is the initial one."""
    from s3rec.model import save_model_file
    precision = cfg.deepspeed.precision
    if precision != "fp32" and best_tag is None:
        return                          # nothing was trained: no master weights to consolidate
    sd = ckpt.full_state_dict(engine, precision, s.run_dir / ckpt.CHECKPOINTS, best_tag)
    if dist.is_main():
        save_model_file(s.run_dir / BEST_MODEL, sd, cfg, run.dataset_info(s.ds))
    dist.barrier()


def finetune_objective(f: FinetuneConfig, sampler: "FinetuneSampler",
                       device: torch.device | str) -> "FinetuneObjective":
    """The loss of finetune config `f` (FinetuneObjective) for the data of `sampler`
    (a FinetuneSampler made with f.loss and f.loss_negatives), its tables on `device`."""
    from s3rec.objectives import FinetuneObjective, gbce_beta
    log_kq = (torch.as_tensor(sampler.log_sampling_q(), dtype=torch.float32, device=device)
              if f.loss == "sampled_softmax" else None)
    beta = gbce_beta(f.loss_negatives, sampler.num_items, f.gbce_t) if f.loss == "gbce" else 1.0
    return FinetuneObjective(f.loss, f.loss_chunk_rows, log_kq, beta)


def _body(argv, holder) -> str:
    from s3rec.data.eval_views import EvalView
    from s3rec.data.finetune_samples import FinetuneSampler
    from s3rec.model import build_model, param_groups
    from s3rec.objectives import finetune_batch_loss_chunked, finetune_plan

    args = get_args_parser().parse_args(argv)
    cfg = run.load_cfg(args)
    if args.init and cfg.variant == "finetune-only":
        raise ConfigError("config key 'variant': finetune-only trains from scratch; drop --init "
                          "or choose variant s3rec / s3rec-lowrank")
    if not args.init and cfg.variant != "finetune-only":
        raise ConfigError(f"config key 'variant': {cfg.variant} fine-tunes pretrained weights: "
                          f"pass --init RUN/final.pt, or set variant=finetune-only")
    f = cfg.finetune
    protocol = "sampled-99" if f.protocol == "sampled" else "full"
    s = run.start("finetune", args, protocol=protocol)
    holder["runjson"] = s.runjson
    cfg, info, ds = s.cfg, s.info, s.ds
    s.runjson.update(init=str(Path(args.init).resolve()) if args.init else None)

    items, offsets = ds.load_sequences()
    negatives = ds.load_negatives() if f.protocol == "sampled" else None
    L = cfg.model.max_seq_length
    sampler = FinetuneSampler(items, offsets, ds.num_items, L, f.loss, f.loss_negatives)
    views = {split: EvalView(items, offsets, ds.num_items, split, negatives, L)
             for split in ("valid", "test")}
    init_state = load_init(args.init, cfg, ds) if args.init else None
    ckpt.seed_everything(cfg.seed)
    model = build_model(cfg, ds.item_size, ds.attribute_size, init_state=init_state)
    ckpt.seed_everything(cfg.seed + 1000003 * info.rank)
    params = model.param_counts()
    s.runjson.update(params=params)
    engine = run.make_engine(s, "finetune", model, param_groups(model, cfg, f.weight_decay))

    objective = finetune_objective(f, sampler, info.device)

    def loss(m, b):
        neg = b.target_neg if b.loss_negatives is None else b.loss_negatives
        shared = None if b.shared_negatives is None else b.shared_negatives.items
        out = finetune_batch_loss_chunked(m, b.items, b.positions, b.target_pos, neg,
                                          f.length_chunks, plan=b.plan, objective=objective,
                                          shared=shared)
        return out, [out]

    def count(b):
        return b.items.shape[0], int((b.items > 0).sum()), int((b.target_pos > 0).sum())

    def on_epoch_end(done: int, tag: str) -> None:
        s.runjson.update(epoch=done)

    task = Task(stage="finetune", epochs=f.epochs, num_batches=sampler.num_batches(f.batch_size),
                log_names=("finetune",), count=count, loss=loss, mean_loss=True,
                evaluate=lambda split: evaluate(engine, views[split], f.protocol,
                                                f.eval_batch_size, info.device),
                select_metric="MRR" if f.protocol == "sampled" else "NDCG@20",
                patience=f.patience, on_epoch_end=on_epoch_end,
                on_progress=lambda rec: s.runjson.update(progress=rec),
                prepare=lambda b: dataclasses.replace(
                    b, plan=finetune_plan(b.items, b.target_pos, f.length_chunks)),
                batches=lambda epoch, start: sampler.batches(
                    cfg.seed, epoch, f.batch_size, info.rank, info.world_size, start,
                    f.bucket_by_length, cfg.data.bucket_size))
    trainer = Trainer(engine, task, s.run_dir, cfg, cfg.deepspeed.precision,
                      cfg.logging.tensorboard, dataset=s.fingerprint)
    holder["trainer"] = trainer
    status = trainer.fit()
    st = trainer.state
    s.runjson.update(epoch=st.epoch)
    if status == "preempted":
        s.runjson.finish("preempted")
        return status
    trainer.load_best()
    save_best_model(engine, cfg, s, ckpt.read_best(trainer.ckpt_dir))
    valid = st.best_valid or task.evaluate("valid")   # finetune.epochs=0: the initial weights
    test, test_ranks = evaluate(engine, views["test"], f.protocol, f.eval_batch_size,
                                info.device, with_ranks=True)
    trainer.events.scalars(test, st.best_epoch, prefix="test/")
    trainer.events.hparams(run.hparams(s, "finetune", args.overrides, args.init))
    results = {"protocol": protocol, "valid": valid, "test": test, "best_epoch": st.best_epoch,
               "seed": cfg.seed, "params": params}
    if dist.is_main():
        write_npy_atomic(s.run_dir / TEST_RANKS, test_ranks.numpy())
        write_json_atomic(s.run_dir / RESULTS_JSON, results)
    s.runjson.finish("done")
    dist.log_main("[test] " + " ".join(f"{k}={v:.4f}" for k, v in test.items())
                  + f" (best epoch {st.best_epoch})")
    return status


def main(argv=None) -> int:
    return run.leave(run.guarded(PROG, _body, argv), argv)


if __name__ == "__main__":
    sys.exit(main())
