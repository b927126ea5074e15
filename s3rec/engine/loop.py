"""One training loop for both stages on a DeepSpeed engine (any world size, ZeRO stage, precision).

Per-rank data: every step is one GLOBAL batch (cfg.<stage>.batch_size samples, identical on all
ranks); the samplers hand each rank its slice, which is cut here into deepspeed.grad_accum
micro-batches.

Gradient scaling. DeepSpeed averages gradients over ranks and accumulation steps. The reference
sums the pretraining losses over the batch (reduction "sum"), so each micro-batch's loss is
multiplied by world_size x grad_accum: the gradient is then exactly the whole batch's sum at
any world size. The fine-tuning loss is a mean over the batch's non-padding positions; its
micro-batch mean is multiplied by (its positions / the global batch's positions) x world_size x
grad_accum, the global count coming from one all-reduce of a scalar per step. Both make world
size 2 follow world size 1 up to float summation order (reduction "mean" of pretraining is a
mean of micro-batch means: close, not exact).

No host syncs per step: index work (pretraining: PretrainIndex; fine-tuning: the length groups,
FinetunePlan) is done on the host before the copy (Task.prepare), the batch goes over in one
pinned copy per dtype (s3rec.data.batch.move_batch), losses are accumulated as tensors and
reduced/read every logging.every_steps steps, and the preemption flag is all-reduced every
signals.CHECK_EVERY steps.
"""
from __future__ import annotations

import dataclasses
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from s3rec import distributed as dist
from s3rec.engine import checkpoint as ckpt
from s3rec.engine import resume_check, signals
from s3rec.engine.profile import StepProfiler
from s3rec.engine.progress import Progress
from s3rec.runlog import Events


@dataclass
class Task:
    """What differs between pretraining and fine-tuning (built in s3rec/pretrain.py, finetune.py)."""
    stage: str                                   # pretrain | finetune
    epochs: int
    num_batches: int                             # global batches per epoch
    log_names: tuple                             # loss names: ("aap", ..., "total") | ("finetune",)
    batches: Callable[[int, int], Iterator]      # (epoch, start_batch) -> this rank's CPU slices
    count: Callable[[object], tuple]             # CPU batch -> (samples, tokens, denominator)
    loss: Callable                               # (model, batch) -> (objective, [log tensors])
    mean_loss: bool = False                      # objective is a mean over `denominator` units
    log_per_denominator: bool = False            # logged losses: summed over micro-batches, then
                                                 # divided by the summed denominators (True) or
                                                 # by the samples (False); implied by mean_loss
    evaluate: Callable[[str], dict] | None = None   # split -> metrics (all ranks call it)
    select_metric: str | None = None             # early stopping metric (strict improvement)
    patience: int = 0
    on_epoch_end: Callable[[int, str], None] | None = None   # (epochs done, checkpoint tag)
    prepare: Callable[[object], object] | None = None   # CPU micro-batch -> CPU micro-batch, run
                                                 # on the host just before the copy to the device
    on_progress: Callable[[dict], None] | None = None   # rank 0: progress.Progress.record, at
                                                 # each progress line and each epoch end


@dataclass
class TrainerState:
    epoch: int = 0                 # epochs finished
    batch: int = 0                 # global batches finished within `epoch`
    global_step: int = 0           # optimizer steps
    best: float | None = None      # early stopping
    best_epoch: int = 0
    bad_epochs: int = 0
    best_valid: dict = field(default_factory=dict)
    stopped: bool = False
    epoch_acc: list = field(default_factory=list)   # global sums of the epoch so far
    epoch_time: float = 0.0        # seconds of the epoch so far (before a restart)


def split_rows(batch, parts: int) -> list:
    """Cut a batch dataclass into `parts` row ranges (tensors whose first dim is B). The sparse
    `attr_index` (flat position index into B*L, attribute) of a PretrainBatch is re-based."""
    if parts == 1:
        return [batch]
    fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    ref = next(v for k, v in fields.items() if isinstance(v, torch.Tensor) and v.dim() == 2)
    B, L = ref.shape
    out = []
    for i in range(parts):
        lo, hi = B * i // parts, B * (i + 1) // parts
        part = {}
        for k, v in fields.items():
            if k == "attr_index":
                keep = (v[:, 0] >= lo * L) & (v[:, 0] < hi * L)
                part[k] = v[keep] - torch.tensor([lo * L, 0], dtype=v.dtype)
            elif isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == B:
                part[k] = v[lo:hi]
            else:
                part[k] = v
        out.append(type(batch)(**part))
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # Linux: KiB


class Trainer:
    def __init__(self, engine, task: Task, run_dir: Path, cfg, precision: str,
                 events_enabled: bool = True, dataset: dict | None = None):
        self.engine, self.task, self.cfg = engine, task, cfg
        self.dataset = dataset           # resume_check.dataset_fingerprint, kept in checkpoints
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / ckpt.CHECKPOINTS
        self.precision = precision
        info = dist.info()
        self.device, self.rank, self.world = info.device, info.rank, info.world_size
        self.accum = cfg.deepspeed.grad_accum
        self.n = len(task.log_names)
        self._per_denominator = task.mean_loss or task.log_per_denominator
        self.state = TrainerState()
        self._wc = [0.0, 0.0, 0.0]
        self.resumed = False
        self.events: Events | None = None
        self.events_enabled = events_enabled
        self.profiler = StepProfiler(cfg.logging.profile_steps, self.run_dir, self.rank,
                                     self.device)
        self.progress = (Progress(task.stage, task.epochs, task.num_batches,
                                  cfg.logging.progress_every_s) if dist.is_main() else None)
        self._rate: float | None = None      # samples/s of the last logged window
        # DeepSpeed reports a gradient norm for ZeRO >= 1 and half precision, except where it is
        # told not to compute one each step (zero_optimization.compute_grad_norm=false, see
        # deepspeed_setup); plain fp32 stage 0 computes none (unless clipping). In those two
        # cases we take it ourselves at log steps, before the optimizer step.
        self.zero_norm = getattr(engine.optimizer, "compute_grad_norm", True) is False
        self.norm_at_log_step = self.zero_norm or (engine.zero_optimization_stage() == 0
                                              and precision == "fp32")

    # ------------------------------------------------------------------ resume / save

    def resume(self) -> bool:
        tag = ckpt.read_latest(self.ckpt_dir) if self.ckpt_dir.is_dir() else None
        tag = dist.broadcast_object(tag)
        if tag is None:
            return False
        # the rest was checked at start-up (s3rec.engine.run.start); these only now have their
        # effective values (a DeepSpeed file may set them)
        resume_check.check_engine_keys(self.ckpt_dir, self.task.stage, self.cfg.to_dict())
        saved = ckpt.load(self.engine, self.ckpt_dir, tag, self.world)
        self.state = TrainerState(**saved["trainer"])
        self.resumed = True
        dist.log_main(f"resumed from {self.ckpt_dir / tag}: epoch {self.state.epoch}, batch "
                      f"{self.state.batch}, step {self.state.global_step}")
        return True

    def _state_dict(self, epoch_acc: torch.Tensor) -> dict:
        acc = dist.all_reduce_sum(epoch_acc.detach().clone().double())
        self.state.epoch_acc = acc.tolist()
        return {"trainer": dataclasses.asdict(self.state), "world_size": self.world,
                "stage": self.task.stage, "config": self.cfg.to_dict(), "dataset": self.dataset}

    def save(self, epoch_acc: torch.Tensor, latest: bool = True) -> str:
        """A checkpoint tag; `latest` names it unless latest=False (then: mark_latest)."""
        tag = ckpt.step_tag(self.state.global_step)
        ckpt.save(self.engine, self.ckpt_dir, tag, self._state_dict(epoch_acc),
                  self.cfg.checkpoint.keep_last, make_latest=latest)
        return tag

    def mark_latest(self, tag: str) -> None:
        ckpt.mark_latest(self.ckpt_dir, tag, self.cfg.checkpoint.keep_last)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> str:
        """Train to the end (or early stop). Returns "done" or "preempted". The signal handlers
        were installed by the entry at start-up (s3rec.engine.run.start)."""
        self.resume()
        self.events = Events(self.run_dir, self.events_enabled and dist.is_main(),
                             purge_step=self.state.global_step if self.resumed else None)
        st = self.state
        while st.epoch < self.task.epochs and not st.stopped:
            if self._train_epoch() == "preempted":
                return "preempted"
        self.events.flush()
        return "done"

    def _new_acc(self) -> torch.Tensor:
        # [losses..., samples, tokens, denominator] accumulated on the device, read rarely
        return torch.zeros(self.n + 3, dtype=torch.float64, device=self.device)

    def _train_epoch(self) -> str:
        st, task, eng = self.state, self.task, self.engine
        epoch_acc = self._new_acc()
        if st.batch and st.epoch_acc and dist.is_main():
            epoch_acc += torch.tensor(st.epoch_acc, dtype=torch.float64, device=self.device)
        win_acc = self._new_acc()
        wc = self._wc = [0.0, 0.0, 0.0]      # samples, tokens, denominator of the window
        win_t0, win_steps = time.perf_counter(), 0
        t0 = time.perf_counter() - st.epoch_time
        every = max(self.cfg.logging.every_steps, 1)
        every_ckpt = self.cfg.checkpoint.every_steps
        eng.train()
        for batch in task.batches(st.epoch, st.batch):
            self.profiler.before(st.global_step)
            micro = split_rows(batch, self.accum)
            counts = [task.count(m) for m in micro]
            global_denom = None
            if task.mean_loss:
                d = torch.tensor([float(sum(c[2] for c in counts))], dtype=torch.float64)
                global_denom = float(dist.all_reduce_cpu(d).item())
            log_now = (st.global_step + 1) % every == 0
            manual_norm = None
            for i, (m, (ns, nt, den)) in enumerate(zip(micro, counts)):
                if task.prepare is not None:
                    m = task.prepare(m)
                m = m.to(self.device)
                obj, logs = eng(task.loss, m)
                scale = self.world * self.accum
                if task.mean_loss:
                    scale *= den / max(global_denom, 1.0)
                eng.backward(obj * scale)
                if log_now and i == len(micro) - 1 and self.norm_at_log_step:
                    manual_norm = self._grad_norm()
                eng.step()
                # 3 launches for all the logged losses (float() is free on fp32 ones)
                vals = torch.stack([l.detach().float() for l in logs]).double()
                if task.mean_loss:
                    vals *= den
                win_acc[:self.n] += vals
                wc[0] += ns                  # counts stay on the host until they are read
                wc[1] += nt
                wc[2] += den
            st.global_step += 1
            st.batch += 1
            win_steps += 1
            if log_now:
                self._flush_counts(win_acc, wc)
                epoch_acc += self._log_window(win_acc, time.perf_counter() - win_t0, manual_norm)
                win_acc.zero_()
                if self.progress is not None and self.progress.due():
                    self._report_progress(time.perf_counter() - t0, show=True)
                win_t0, win_steps = time.perf_counter(), 0
            if every_ckpt and st.global_step % every_ckpt == 0 and st.batch < task.num_batches:
                st.epoch_time = time.perf_counter() - t0
                self.save(self._fold(epoch_acc, win_acc))
            self.profiler.after(st.global_step)
            if st.global_step % signals.CHECK_EVERY == 0 and signals.should_stop():
                return self._preempt(epoch_acc, win_acc, t0)
        # epoch end
        self._flush_counts(win_acc, wc)
        if win_steps:
            epoch_acc += self._log_window(win_acc, time.perf_counter() - win_t0, None,
                                          write=False)
        if self.device.type == "cuda":
            # The host may still be ahead of the device by the steps since the last log step's
            # read-back: the epoch ends when its work does (one wait an epoch).
            torch.cuda.synchronize(self.device)
        epoch_time = time.perf_counter() - t0
        done = st.epoch + 1
        totals = self._global(epoch_acc)
        per = totals[self.n + 2] if self._per_denominator else totals[self.n]
        self.events.scalars({f"epoch/loss_{name}": totals[i] / max(per, 1.0)
                             for i, name in enumerate(task.log_names)}, done)
        self.events.scalar("perf/epoch_s", epoch_time, done)
        self.events.scalar("perf/peak_rss_mb", peak_rss_mb(), done)
        if self.progress is not None:
            self.progress.end_line()
        dist.log_main(f"[{task.stage}] epoch {done}/{task.epochs} "
                      + " ".join(f"{name}={totals[i] / max(per, 1.0):.4f}"
                                 for i, name in enumerate(task.log_names))
                      + f" ({epoch_time:.1f} s)")
        if task.evaluate is not None:
            self._validate(done)
        if self.progress is not None:
            self._report_progress(epoch_time, show=False)
        st.epoch, st.batch, st.epoch_time = done, 0, 0.0
        zero = self._new_acc()
        # `latest` moves to the epoch's tag only after on_epoch_end (epoch-N.pt): killed in
        # between, the run resumes before this epoch's end and does it again
        tag = self.save(zero, latest=False)
        if task.on_epoch_end is not None:
            task.on_epoch_end(done, tag)
        self.mark_latest(tag)
        self.events.flush()
        if signals.should_stop():
            return self._preempt(zero, self._new_acc(), time.perf_counter(), saved=True)
        return "ok"

    def _report_progress(self, epoch_seconds: float, show: bool) -> None:
        """Rank 0: the progress record into run.json (Task.on_progress), and the line if `show`."""
        st, task = self.state, self.task
        best = ({"metric": task.select_metric, "value": st.best, "epoch": st.best_epoch}
                if task.select_metric and st.best is not None else None)
        rec = self.progress.record(st.epoch, st.batch, epoch_seconds, self._rate, best)
        if show:
            self.progress.show(rec)
        if task.on_progress is not None:
            task.on_progress(rec)

    def _flush_counts(self, win_acc: torch.Tensor, wc: list) -> None:
        if any(wc):
            win_acc[self.n:] += torch.tensor(wc, dtype=torch.float64, device=self.device)
            wc[:] = [0.0, 0.0, 0.0]

    def _fold(self, epoch_acc: torch.Tensor, win_acc: torch.Tensor) -> torch.Tensor:
        """Epoch accumulator including the current, not yet logged window (local sums)."""
        self._flush_counts(win_acc, self._wc)
        return epoch_acc + win_acc

    def _global(self, acc: torch.Tensor) -> list:
        return dist.all_reduce_sum(acc.detach().clone()).tolist()

    def _preempt(self, epoch_acc, win_acc, t0, saved: bool = False) -> str:
        st = self.state
        if not saved:
            st.epoch_time = time.perf_counter() - t0
            self.save(self._fold(epoch_acc, win_acc))
        dist.log_main(f"preempted by a signal (received here: {signals.names()}): checkpoint "
                      f"saved at step {st.global_step}; start the same command again to resume")
        self.events.flush()
        return "preempted"

    def _grad_norm(self) -> float:
        """The global gradient norm of this step, before the optimizer step. ZeRO 1-2 without a
        per-step norm: DeepSpeed's own computation over the reduced partitions (a collective:
        every rank is at the same log step), unscaled as its step would. Stage 0: the gradients
        are whole here."""
        if self.zero_norm:
            opt = self.engine.optimizer
            return float(opt.scaled_global_norm() / opt.loss_scale)
        norms = [p.grad.detach().float().norm() for p in self.engine.module.parameters()
                 if p.grad is not None]
        return float(torch.stack(norms).norm()) if norms else 0.0

    def _log_window(self, win_acc: torch.Tensor, seconds: float, manual_norm,
                    write: bool = True) -> torch.Tensor:
        """Reduce the window's sums over ranks (one all-reduce), write the scalars; returns the
        LOCAL window sums for the epoch accumulator."""
        local = win_acc.clone()
        if not write:
            return local
        g = self._global(win_acc)
        per = g[self.n + 2] if self._per_denominator else g[self.n]
        step = self.state.global_step
        prefix = "loss/"
        for i, name in enumerate(self.task.log_names):
            self.events.scalar(prefix + name, g[i] / max(per, 1.0), step)
        self.events.scalar("train/lr", self.engine.get_lr()[0], step)
        norm = manual_norm if manual_norm is not None else self.engine.get_global_grad_norm()
        if norm is not None:
            norm = float(norm)
            if math.isfinite(norm):
                self.events.scalar("train/grad_norm", norm, step)
        self._rate = g[self.n] / max(seconds, 1e-9)
        self.events.scalar("perf/samples_per_s", self._rate, step)
        self.events.scalar("perf/tokens_per_s", g[self.n + 1] / max(seconds, 1e-9), step)
        return local

    # ------------------------------------------------------------------ validation

    def _validate(self, done: int) -> None:
        st, task = self.state, self.task
        metrics = task.evaluate("valid")
        self.events.scalars(metrics, done, prefix="valid/")
        value = metrics[task.select_metric]
        line = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        if st.best is None or value > st.best:
            st.best, st.best_epoch, st.bad_epochs, st.best_valid = value, done, 0, metrics
            ckpt.save_best(self.engine, self.ckpt_dir, done, self._state_dict(self._new_acc()))
            dist.log_main(f"[valid] epoch {done}: {line} (best)")
        else:
            st.bad_epochs += 1
            dist.log_main(f"[valid] epoch {done}: {line} (no improvement {st.bad_epochs}/"
                          f"{task.patience})")
            if st.bad_epochs >= task.patience:
                st.stopped = True
                dist.log_main(f"early stop: no strict improvement of {task.select_metric} for "
                              f"{task.patience} epochs; best epoch {st.best_epoch}")

    def load_best(self) -> bool:
        """The best validation epoch's weights; False when no epoch was validated (no best)."""
        tag = ckpt.read_best(self.ckpt_dir)
        if tag is None:
            if self.state.best_epoch > 0:     # testing the last epoch instead would be silent
                raise ckpt.ResumeError(
                    f"{self.ckpt_dir / ckpt.BEST} is missing, but the trainer state says epoch "
                    f"{self.state.best_epoch} validated best: its weights are gone (a run folder "
                    f"copied without them?); test metrics would not be the best epoch's")
            return False
        ckpt.load(self.engine, self.ckpt_dir, tag, self.world, module_only=True)
        return True

    def close(self) -> None:
        self.profiler.close()
        if self.events is not None:
            self.events.close()
