"""s3rec-pretrain --data DATASET --out RUN [--config YAML] [key=value ...]

Self-supervised pretraining (AAP, MIP, MAP, SP; weights pretrain.weights.*, 0 skips one) on
DeepSpeed, under any launcher (deepspeed, torchrun, srun, mpirun, or none). Writes RUN/final.pt
(and RUN/epoch-N.pt for N in pretrain.save_epochs): what `s3rec-finetune --init` accepts.
Started again with the same --out, it resumes from RUN/checkpoints/latest.
"""
from __future__ import annotations

import sys

from s3rec import distributed as dist
from s3rec.config import OBJECTIVES, ConfigError
from s3rec.engine import checkpoint as ckpt
from s3rec.engine import run
from s3rec.engine.loop import Task, Trainer

PROG = "s3rec-pretrain"
LOSS_NAMES = (*OBJECTIVES, "total")


def get_args_parser():
    return run.base_parser(PROG, __doc__.split("\n\n")[1])


def _body(argv, holder) -> str:
    from s3rec.engine.deepspeed_setup import micro_batch
    from s3rec.field_objectives import field_loss_names
    from s3rec.model import build_model, param_groups, save_model_file
    from s3rec.pretrain_step import build_loss, pretrain_sampler

    args = get_args_parser().parse_args(argv)
    cfg = run.load_cfg(args)
    if cfg.variant == "finetune-only":
        raise ConfigError("config key 'variant': finetune-only has no pretraining stage; run "
                          "s3rec-finetune without --init instead")
    p = cfg.pretrain
    if all(getattr(p.weights, o) == 0 for o in OBJECTIVES):
        raise ConfigError("config keys 'pretrain.weights.*': all four are 0, nothing to train")
    s = run.start("pretrain", args, protocol=None)
    holder["runjson"] = s.runjson
    cfg, info, ds = s.cfg, s.info, s.ds

    sampler = pretrain_sampler(cfg, ds)
    ckpt.seed_everything(cfg.seed)              # the same initial model on every rank
    model = build_model(cfg, ds.item_size, ds.attribute_size, fields=ds.attribute_fields)
    ckpt.seed_everything(cfg.seed + 1000003 * info.rank)   # per-rank dropout streams
    s.runjson.update(params=model.param_counts())
    engine = run.make_engine(s, "pretrain", model, param_groups(model, cfg, p.weight_decay))
    precision = cfg.deepspeed.precision
    weights, info_ds = p.weights, run.dataset_info(ds)
    # Objectives with weight 0 are neither computed nor logged (a flat 0 curve would read as a
    # perfectly learned objective).
    # With several attribute fields each field's AAP and MAP is logged too (loss/aap.<field>);
    # loss/aap is then their weighted sum, the term pretrain.weights.aap multiplies, and with one
    # field the field's loss itself, so runs of either kind read the same tags.
    names = (*(n for n in LOSS_NAMES if n == "total" or getattr(weights, n) > 0),
             *field_loss_names(model, weights))

    micro = micro_batch(p.batch_size, cfg.deepspeed.grad_accum, info.world_size,
                        "pretrain.batch_size")
    prepare, losses = build_loss(cfg, sampler, ds.item_size, ds.attribute_size, micro,
                                 info.device)

    def loss(m, b):
        out = losses(m, b)
        return out["total"], [out[n] for n in names]

    def count(b):
        # (samples, tokens, denominator). reduction "sum": each loss is a sum over the
        # micro-batch, logged per sample. "mean": each is already a mean over its micro-batch,
        # logged as the mean of those means (denominator: one per micro-batch)
        n = b.masked_items.shape[0]
        return n, int((b.original_items > 0).sum()), (1 if p.reduction == "mean" else n)

    def save_weights(name: str, tag: str) -> None:
        sd = ckpt.full_state_dict(engine, precision, trainer.ckpt_dir, tag)
        if dist.is_main():
            save_model_file(s.run_dir / name, sd, cfg, info_ds)
        dist.barrier()

    def on_epoch_end(done: int, tag: str) -> None:
        s.runjson.update(epoch=done)
        if done in p.save_epochs:
            save_weights(f"epoch-{done}.pt", tag)

    task = Task(stage="pretrain", epochs=p.epochs, num_batches=sampler.num_batches(p.batch_size),
                log_names=names, count=count, loss=loss, on_epoch_end=on_epoch_end,
                on_progress=lambda rec: s.runjson.update(progress=rec),
                log_per_denominator=p.reduction == "mean",
                prepare=prepare,
                batches=lambda epoch, start: sampler.batches(
                    cfg.seed, epoch, p.batch_size, cfg.data.bucket_by_length,
                    cfg.data.bucket_size, info.rank, info.world_size, start))
    trainer = Trainer(engine, task, s.run_dir, cfg, precision, cfg.logging.tensorboard,
                      dataset=s.fingerprint)
    holder["trainer"] = trainer
    status = trainer.fit()
    s.runjson.update(epoch=trainer.state.epoch)
    if status == "preempted":
        s.runjson.finish("preempted")
        return status
    tag = ckpt.read_latest(trainer.ckpt_dir) if dist.is_main() else None
    tag = dist.broadcast_object(tag)
    if tag is None:          # pretrain.epochs=0: save the initial weights
        tag = trainer.save(trainer._new_acc())
    save_weights("final.pt", tag)
    trainer.events.hparams(run.hparams(s, "pretrain", args.overrides))
    s.runjson.finish("done")
    dist.log_main(f"pretraining done: {s.run_dir / 'final.pt'}")
    return status


def main(argv=None) -> int:
    return run.leave(run.guarded(PROG, _body, argv), argv)


if __name__ == "__main__":
    sys.exit(main())
