"""A tiny training run for the multi-process tests: started by `deepspeed --num_gpus N` or as a plain process.

    run_tiny.py OUT_JSON [--stop-at K] [--resume] [--same-global-batches] [--kill-after-step K --kill-rank R]
                [--kill-in-save K] [--signal-in-save K] [--nan-at-steps 3,6,7,8] section.key=value ...

Writes this run's logged records (rank 0) to OUT_JSON. `--kill-after-step K --kill-rank R` SIGKILLs rank R (-1: every
rank) right after optimizer step K; `--kill-in-save K` SIGKILLs every rank in the middle of the checkpoint of step K
(DeepSpeed's shards written, trainer state and manifest not); `--signal-in-save K` sends every rank SIGUSR1 (a
preemption) as step K's checkpoint starts; `--nan-at-steps` makes rank 1's loss NaN in those step attempts. `--same-global-batches` feeds every world size the same
global batches (each global batch is read by one loader and cut into world_size x grad_accum micro batches), so
a 2-rank run and a 1-rank run can be compared step by step (a task sequence too: each task's global batches, and
the micro_batch_size x world_size batches `Tasks.train_batches` gives, e.g. EWC's Fisher pass). OUT_JSON also holds
`step_metrics`: what the callbacks added to each step's metrics in `on_step_end`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

import torch

from mmscale.job.preflight import load_config
from mmscale.training.callbacks import Callback


class StopAt(Callback):
    """Interrupt the run after step K (as a preemption would), after the trainer's checkpoint at K."""

    name = "stop_at"

    def __init__(self, k: int):
        self.k = k

    def on_step_end(self, trainer, metrics):
        if trainer.step >= self.k:
            trainer.should_stop = True


class KillAfterStep(Callback):
    """`kill -9` of one rank (or all) right after step K: no exception handler, no atexit, no flush."""

    name = "kill_after_step"

    def __init__(self, k: int, rank: int):
        self.k, self.rank = k, rank

    def on_step_end(self, trainer, metrics):
        if trainer.step == self.k and self.rank in (-1, trainer.rank):
            os.kill(os.getpid(), signal.SIGKILL)


class NanAt(Callback):
    """Rank 1's loss becomes NaN in the given optimizer-step attempts, counted from 1 over the whole run (a rollback
    goes back in steps, not in attempts). Rank 0's loss stays finite: the skip must still be global."""

    name = "nan_at"

    def __init__(self, attempts: set[int]):
        self.attempts, self.done = attempts, 0

    def on_loss(self, trainer, batch, out, loss):
        if self.done + 1 in self.attempts and trainer.rank == min(1, trainer.world_size - 1):
            return loss * float("nan")
        return loss

    def on_step_end(self, trainer, metrics):
        self.done += 1


def signal_in_save(trainer, k: int) -> None:
    """Every rank sends itself SIGUSR1 (a preemption) in the middle of step K's checkpoint write."""
    save = trainer.engine.save

    def save_signalled(directory, tag):
        if trainer.step == k:
            os.kill(os.getpid(), signal.SIGUSR1)
        save(directory, tag)

    trainer.engine.save = save_signalled


def kill_in_save(trainer, k: int) -> None:
    """Every rank SIGKILLs itself after DeepSpeed has written its shards of step K's checkpoint."""
    save = trainer.engine.save

    def save_then_die(directory, tag):
        save(directory, tag)
        if trainer.step == k:
            os.kill(os.getpid(), signal.SIGKILL)

    trainer.engine.save = save_then_die


class StepMetrics(Callback):
    """Records each step's metrics as the callbacks before it left them (appended after the configured ones)."""

    name = "step_metrics"

    def __init__(self):
        self.records = []

    def on_step_end(self, trainer, metrics):
        self.records.append({"step": trainer.step, **metrics})


class SameGlobalBatches:
    """Micro batch (rank r, accumulation step g) = slice g * world_size + r of one shared global batch."""

    def __init__(self, loader, micro: int, rank: int, world: int, accum: int):
        self.loader, self.micro, self.rank, self.world, self.accum = loader, micro, rank, world, accum

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, sd):
        self.loader.load_state_dict(sd)

    def __iter__(self):
        for batch in self.loader:
            for g in range(self.accum):
                i = g * self.world + self.rank
                yield {k: (v[i * self.micro:(i + 1) * self.micro] if torch.is_tensor(v) and v.dim() > 0 else v)
                       for k, v in batch.items()}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--stop-at", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--same-global-batches", action="store_true")
    p.add_argument("--kill-after-step", type=int, default=0)
    p.add_argument("--kill-rank", type=int, default=-1)
    p.add_argument("--kill-in-save", type=int, default=0)
    p.add_argument("--signal-in-save", type=int, default=0)
    p.add_argument("--nan-at-steps", default="")
    p.add_argument("--eval-thrice", action="store_true", help="evaluate 3 times before training, record the losses")
    p.add_argument("--local_rank", type=int, default=None)
    args = p.parse_intermixed_args()
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs/tiny.yaml", args.overrides)

    from mmscale.data import TrainLoader, load_tokenizer
    from mmscale.job.build import build_trainer, close
    from mmscale.training.engine import init_distributed

    rank, world = init_distributed()
    data = None
    if args.same_global_batches:
        tok = load_tokenizer(cfg.data.tokenizer)
        accum = cfg.train.global_batch_size // (cfg.train.micro_batch_size * world)
        if not cfg.continual.tasks:
            loader = TrainLoader(cfg.data, tok, cfg.train.global_batch_size, rank=0, world_size=1,
                                 seed=cfg.train.seed, shards=cfg.data.train_shards, keep_raw=True)
            data = SameGlobalBatches(loader, cfg.train.micro_batch_size, rank, world, accum)
    if args.same_global_batches and cfg.continual.tasks:  # the task sequence as built, its batches cut as above
        from mmscale.continual.sequence import TaskSequence
        from mmscale.data import EvalLoader

        trainer = build_trainer(cfg)
        trainer.train_data.close()
        micro, specs = cfg.train.micro_batch_size, cfg.continual.tasks
        trainer.train_data = SameGlobalBatches(TaskSequence(
            [TrainLoader(cfg.data, tok, cfg.train.global_batch_size, rank=0, world_size=1, seed=cfg.train.seed + i,
                         shards=t.train_shards, keep_raw=True) for i, t in enumerate(specs)], [t.max_steps for t in specs], 1),
            micro, rank, world, accum)
        trainer.tasks.loader = lambda shards, n: SameGlobalBatches(
            EvalLoader(cfg.data, tok, micro * world, rank=0, world_size=1, shards=shards, max_batches=n),
            micro, rank, world, 1)
        if args.resume:
            trainer.resume()
    else:
        trainer = build_trainer(cfg, resume="required" if args.resume else None, train_data=data)
    step_metrics = StepMetrics()
    trainer.callbacks.append(step_metrics)
    if args.stop_at:
        trainer.callbacks.append(StopAt(args.stop_at))
    if args.kill_after_step:
        trainer.callbacks.append(KillAfterStep(args.kill_after_step, args.kill_rank))
    if args.kill_in_save:
        kill_in_save(trainer, args.kill_in_save)
    if args.signal_in_save:
        signal_in_save(trainer, args.signal_in_save)
    if args.nan_at_steps:
        trainer.callbacks.append(NanAt({int(x) for x in args.nan_at_steps.split(",")}))
    evals = [trainer.evaluate()["val_loss"] for _ in range(3)] if args.eval_thrice else []
    history = trainer.train()
    out = Path(args.out) if rank == 0 else Path(args.out).with_suffix(f".rank{rank}.json")
    out.write_text(json.dumps({"world_size": world, "history": history, "nonfinite_steps": trainer.nonfinite_steps,
                               "rollbacks": trainer.rollbacks, "lr_scale": trainer.lr_scale, "evals": evals,
                               "preempted": trainer.preempted, "step": trainer.step,
                               "step_metrics": step_metrics.records}))
    close()
    return 0


if __name__ == "__main__":
    code = main()
    # Leave without the interpreter's teardown, everything being closed and flushed: now and then a C++ thread
    # that torch.distributed leaves joinable aborts a finished run at exit ("terminate called without an active
    # exception", SIGABRT: exit 250 from the launcher, seen about once in a hundred 2-rank jobs).
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
