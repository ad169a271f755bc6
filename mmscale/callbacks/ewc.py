"""The `ewc` callback: Elastic Weight Consolidation over a task sequence (`continual.tasks`).

At the end of every task but the last, the callback measures the diagonal empirical Fisher of that task on
`fisher_batches` micro batches of its training data (the trainer's own loss, LM and/or classification, weighted as
the trainer weighs them) and keeps it with the weights of that moment (mmscale.continual.ewc.EWCState). While later
tasks train, every optimizer step's gradient gets the penalty's, lam * sum_t F_t * (theta - theta*_t), and the
penalty lam/2 * sum_t F_t * (theta - theta*_t)^2 is reported as the step metric `ewc_penalty` (at the weights the
step's gradient was taken at: 0 at a task's first step, where the weights are the anchor).

Under ZeRO-3 every rank works on its own partitions and nothing is gathered: the anchors, the Fisher and the
penalty's gradient are per partition element, the gradient is added to this rank's gradient partitions after the
step's last backward (`on_gradients`; autograd cannot reach the partitions, the parameters are gathered only inside
the forward), and only the penalty's value is summed over ranks, for the metric. Memory per rank: 8 bytes per
parameter of its partitions per kept task ("separate": one per finished task; "online": one), 4 more during the
Fisher pass.

Under ZeRO 0-2 (every rank holds the whole weights) the penalty is added to each micro batch's loss (`on_loss`) and
differentiated by autograd: DeepSpeed divides each micro batch's loss by the accumulation steps and averages the
ranks' (identical) penalty gradients, so it counts once per step. Adding to `p.grad` after the backward instead
would be lost under ZeRO 1-2, whose optimizer has already moved the step's gradients into its own flat partitions
and released `p.grad`. The anchors are then the parameters in the training dtype (bf16 under bf16 training).

Arguments: `lam` (>= 0, required: the penalty's strength, in units of the trainer's mean loss per sample),
`mode` ("separate": one anchor and Fisher per finished task, the paper; "online": one of each, F <- gamma * F +
F_new), `gamma` (online mode's decay in [0, 1]), `fisher_batches` (>= 1: micro batches per rank of the finished
task's training data; each Fisher batch is micro_batch_size x world_size samples, see mmscale.continual.ewc for what
the batch size does to the estimate).

Checkpoints hold each rank's state (its partitions under ZeRO-3) with its rank and world size; a resume with
another world size is refused.
"""

from __future__ import annotations

import contextlib
import logging
import random
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from mmscale.callbacks import register_callback
from mmscale.continual.ewc import MODES, EWCState, FisherAccumulator
from mmscale.training.callbacks import Callback

log = logging.getLogger("mmscale.callbacks")



def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(values: list[float]) -> list[float]:
    from mmscale.training.engine import all_reduce_sum

    return all_reduce_sum(values).tolist()


@contextlib.contextmanager
def _rng_untouched() -> Iterator[None]:
    """Whatever the Fisher pass draws (dropout, a loader), training goes on with the random state it had."""
    py, npy = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


@register_callback("ewc")
class EWC(Callback):
    def __init__(self, lam: float | None = None, mode: str = "separate", gamma: float = 1.0,
                 fisher_batches: int = 8):
        if lam is None:
            raise ValueError("lam: missing; give the EWC strength, a number >= 0 (e.g. lam: 100; 0 turns the "
                             "penalty off)")
        if isinstance(fisher_batches, bool) or not isinstance(fisher_batches, int) or fisher_batches < 1:
            raise ValueError(f"fisher_batches={fisher_batches!r}: must be an integer >= 1 (micro batches per rank "
                             f"of the finished task's training data the Fisher is measured on), e.g. 8")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: must be one of {', '.join(MODES)}")
        self.state = EWCState(lam, mode, gamma)  # checks lam, gamma and their combination with mode
        self.lam, self.mode, self.gamma, self.fisher_batches = float(lam), mode, float(gamma), fisher_batches
        self._partitioned: bool | None = None  # known from the engine at on_train_start
        self._penalty = 0.0  # this rank's share of the penalty at the current step's weights

    def config_problems(self, cfg: Any) -> list[str]:
        tasks = cfg.continual.tasks
        if not tasks:
            return ["continual.tasks: empty; ewc keeps what each task of a task sequence learned and acts from the "
                    "second task on: give a task sequence (continual.tasks), or drop the callback"]
        if len(tasks) < 2:
            return [f"continual.tasks: 1 task ({tasks[0].name}); ewc acts from the second task on: add tasks, or "
                    f"drop the callback"]
        return []

    # ------------------------------------------------------------------------------------------- events

    def on_train_start(self, trainer: Any) -> None:
        if trainer.tasks is None:
            raise RuntimeError("ewc: this trainer has no task sequence (trainer.tasks is None; was it built with "
                               "train_data of its own?); ewc needs continual.tasks")
        engine = trainer.engine
        self._partitioned = engine.partitioned
        if self.state.slot_numels is not None:  # restored from a checkpoint: the same parameters, the same shares
            slots, _ = engine.trainable_slots()
            numels = [s.numel() for s in slots]
            if numels != self.state.slot_numels:
                raise RuntimeError(f"ewc: the restored state has {len(self.state.slot_numels)} slots of "
                                   f"{sum(self.state.slot_numels)} elements, this rank's trainable parameters "
                                   f"{len(numels)} of {sum(numels)}: resume with the model, callbacks and world size "
                                   f"it was saved with")

    def on_loss(self, trainer: Any, batch: dict[str, Any], out: Any, loss: torch.Tensor) -> torch.Tensor:
        if self._partitioned or not self.state.num_kept:
            return loss
        penalty = self.state.penalty(trainer.engine.trainable_params())
        self._penalty = float(penalty.detach())
        return loss + penalty

    def on_gradients(self, trainer: Any) -> None:
        if not self._partitioned or not self.state.num_kept:
            return
        engine = trainer.engine
        slots, _ = engine.trainable_slots()
        engine.add_to_local_grads(self.state.penalty_grad(slots))
        self._penalty = float(self.state.penalty(slots))

    def on_step_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        if not self.state.num_kept:  # every rank alike: no collective
            metrics["ewc_penalty"] = 0.0
            return
        # ZeRO-3: each rank's share, summed; ZeRO 0-2: every rank has the whole (and the same) penalty
        metrics["ewc_penalty"] = _all_reduce_sum([self._penalty])[0] if self._partitioned else self._penalty

    def on_task_end(self, trainer: Any, task: int, row: list[float]) -> None:
        if task >= len(trainer.tasks.names) - 1:  # no task after it to keep it for
            return
        engine, t = trainer.engine, trainer.cfg.train
        slots, valid = engine.trainable_slots()
        acc = FisherAccumulator(slots, valid)
        world = engine.world_size
        batch_size = t.micro_batch_size * world  # the gradient of the mean loss over the ranks' micro batches
        skipped = 0
        engine.train(False)  # the Fisher of the model as it predicts (no dropout)
        try:
            with _rng_untouched():
                for batch in trainer.tasks.train_batches(task, self.fisher_batches):
                    grads = engine.grads_of(trainer._to_device(batch), self._loss_fn(batch, trainer.objectives, world))
                    bad = sum(1 for g in grads if g is not None and not bool(torch.isfinite(g).all()))
                    if _all_reduce_sum([float(bad > 0)])[0]:  # a non-finite gradient on any rank: skip everywhere
                        skipped += 1
                        continue
                    acc.add(grads, batch_size=batch_size)
        finally:
            engine.train(True)
        if acc.num_added == 0:
            log.warning("ewc: every one of the %d Fisher batches of task %d had a non-finite gradient; task %d is "
                        "not consolidated", skipped, task, task)
            return
        fisher = acc.result()
        self.state.consolidate(slots, fisher)
        total, count = _all_reduce_sum([sum(float(f.double().sum()) for f in fisher),
                                        float(sum(f.numel() for f in fisher))])
        if trainer.is_main:
            log.info("ewc: task %d (%s) consolidated: Fisher from %d batch(es) of %d samples (%d skipped), mean "
                     "%.4g over %d elements; %d (anchor, Fisher) pair(s) kept", task, trainer.tasks.names[task],
                     acc.num_added, batch_size, skipped, total / max(count, 1.0), int(count), self.state.num_kept)

    @staticmethod
    def _loss_fn(batch: dict[str, Any], objectives: dict[str, Any], world: int) -> Any:
        """The trainer's loss on one micro batch per rank (Trainer.train_step with one accumulation step): every
        objective's loss sum over its global count on all ranks' batches, with its weight, times world_size (the
        engine averages over the ranks): Objective.scale with grad_accum 1."""
        counts = _all_reduce_sum([o.count(batch) for o in objectives.values()])
        scales = {name: o.scale(n, 1, world) for (name, o), n in zip(objectives.items(), counts)}

        def loss_fn(out: Any) -> torch.Tensor:
            return sum(out.terms[name]["loss_sum"] * scale for name, scale in scales.items())

        return loss_fn

    # ------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        rank, world = _rank_world()
        return {"ewc": self.state.state_dict(), "rank": rank, "world_size": world}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rank, world = _rank_world()
        if state["world_size"] != world:
            raise ValueError(f"ewc: the state was saved by {state['world_size']} ranks, this run has {world}: under "
                             f"ZeRO-3 each rank keeps the anchors and Fisher of its own partitions; resume with "
                             f"{state['world_size']} ranks")
        if state["rank"] != rank:
            raise ValueError(f"ewc: rank {rank} was given the state of rank {state['rank']}: each rank resumes from "
                             f"its own file")
        self.state.load_state_dict(state["ewc"])
