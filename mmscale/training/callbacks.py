"""The trainer's callback protocol: a small, fixed set of events.

QLoRA, replay buffers, EWC, distillation and early stopping plug in here. The trainer calls these events and
never imports a callback; callbacks live in `mmscale.callbacks` and depend on this protocol only.

Event order in one run::

    on_config(cfg)                   # the job's config, before the model is built (task_adapters: the tasks)
    on_build(options)                # before the model is built: requests to the builder (quantize the LM)
    on_model_built(model)            # before DeepSpeed wraps it: swap layers, add adapters, freeze
    on_train_start(trainer)          # after resume: the trainer's step, engine and data are ready
    for each optimizer step:
        on_batch(trainer, batch)     # per micro batch, may return a changed batch (replay mixes samples in)
        on_loss(trainer, batch, out, loss) -> loss   # per micro batch, may add terms (EWC, distillation)
        on_gradients(trainer)        # once, after the last micro batch's backward, before the optimizer step:
                                     # the step's gradients are complete (EWC adds its penalty's under ZeRO-3)
        on_step_end(trainer, metrics)                # after the optimizer step; may add metrics (numbers:
                                                     # logged as their mean over each log window)
    on_eval_end(trainer, metrics)    # after each validation; may set trainer.should_stop
    on_task_eval(trainer, task)      # a task sequence, at the end of a task: before task `task` is evaluated into
                                     # R, and with None after the row (task_adapters picks that task's module)
    on_task_end(trainer, task, row)  # a task sequence: after task `task`'s last step and the evaluation of every
                                     # task (`row`: R[task][j]); EWC takes its Fisher here, replay its task id
    on_train_end(trainer)
    state_dict() / load_state_dict() # saved in every checkpoint, restored on --resume

A callback's constructor only checks and stores its arguments (raising ValueError or TypeError with the value and
the fix): config validation constructs every configured callback once, before any process group starts, and asks
it `config_problems(cfg)` for what it needs of the rest of the config.
`state_dict()` returns plain Python values and tensors only, so that checkpoints load with `weights_only=True`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from mmscale.training.trainer import Trainer


class Callback:
    """Base class: every event is a no-op, override the ones you need."""

    name: str = "callback"
    needs_raw_samples: bool = False
    """True: training batches must carry each sample's raw members (`__raw__`: image bytes, caption, label), which
    the data pipeline sends only when a callback asks (they cost a copy per batch)."""
    state_is_global: bool = False
    """True: `state_dict()` is the same on every rank (nothing per rank or per partition), so a resume on another
    world size gives every new rank saved rank 0's state. False (a replay buffer's per-rank share, EWC's per-partition
    Fisher): a resume on another world size is refused, naming the callback."""

    def config_problems(self, cfg: Any) -> list[str]:
        """What this callback needs of the rest of the job config (a JobConfig), checked with it: one message per
        problem, naming the field and the fix."""
        return []

    def on_config(self, cfg: Any) -> None:
        """The job's validated config (a JobConfig), before `on_build`, wherever the model is built (training,
        evaluation, export): what the callback needs of it to build (task_adapters: the task list)."""

    def on_build(self, options: Any) -> None:
        """`options` is a mmscale.model.BuildOptions: set what must happen while the model is built."""

    def on_model_built(self, model: torch.nn.Module) -> None:
        pass

    def on_train_start(self, trainer: Trainer) -> None:
        pass

    def on_batch(self, trainer: Trainer, batch: dict[str, Any]) -> dict[str, Any]:
        return batch

    def on_loss(self, trainer: Trainer, batch: dict[str, Any], out: Any, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def on_gradients(self, trainer: Trainer) -> None:
        pass

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        pass

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        pass

    def on_task_eval(self, trainer: Trainer, task: int | None) -> None:
        pass

    def on_task_end(self, trainer: Trainer, task: int, row: list[float]) -> None:
        pass

    def on_train_end(self, trainer: Trainer) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
