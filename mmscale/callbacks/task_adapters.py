"""Dynamic architecture for continual learning (`task_adapters`): each task of `continual.tasks` gets its own
module, chosen by task id or, without one, by the data.

    callbacks: [{name: task_adapters, args: {r: 8}}]

What each task owns: a LoRA adapter (peft's multi-adapter layers: one named adapter per task, `task0`, `task1`, ...)
on the LM's `target_modules` and on every linear layer of the gated cross-attention blocks, of the resampler and of
the vision tower (each of those three can be left out: args `xattn`, `resampler`, `vision`), and its own copy of each
objective head (the classification objective's; `TaskHeads`). All of them are built with the model, before
DeepSpeed wraps it, so that ZeRO-3 partitions them like any other parameter and every checkpoint, resume (between
and within tasks) and reload sees the same parameter set.

What stays shared: everything else. It trains in the first task only, by the freeze policy (`model.train_*`), and is
frozen from the second task on. Frozen means exactly unchanged: every parameter carries the optimizer steps it trains
in (mmscale.training.engine.LR_STEPS) and its learning rate is 0 outside them, so Adam (and AdamW's weight decay,
scaled by the learning rate) leaves it as it is; a finished task's adapter and head are frozen the same way, and a
task's module has 0 learning rate (and no gradient) until its task starts. (The shared weights still receive
gradients after the first task, and count in the gradient norm that `train.grad_clip` clips.)

Which module runs: the task being trained (from the trainer's step, so a resume or rollback picks it again); at the
end of each task, each task's own module evaluates that task, with its own classes (task-incremental: R[i][j] is
task j measured through module j). Without a task id the module is chosen from the data, an expert gate: every
module seen so far predicts with its own task's classes and the most confident one (highest softmax probability)
wins. At each task end the callback measures that over the tasks so far and logs `gate_task_accuracy` (how often the
gate picked the sample's own task) and `gate_accuracy` (class-incremental accuracy through the gate). It logs each
task's parameter growth (`params_per_task`).

`select_task(model, task)` picks a module by index or name wherever the model is loaded (evaluation: `evaluate.py
--task NAME`).
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmscale.callbacks import register_callback
from mmscale.callbacks.peft_methods import LoRA, _new_weights
from mmscale.training.callbacks import Callback
from mmscale.training.engine import LR_STEPS, all_reduce_sum

if TYPE_CHECKING:
    from mmscale.training.trainer import Trainer

log = logging.getLogger("mmscale.callbacks")

_OTHER_METHODS = ("lora", "qlora", "dora", "ia3", "adapters", "prompt_tuning", "bitfit")


def adapter_name(task: int) -> str:
    return f"task{task}"


class TaskHeads(nn.Module):
    """One copy of a linear head per task; `active` picks the one a forward runs. Reads like the nn.Linear it
    replaces (`in_features`, `out_features`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tasks: int):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(in_features, out_features, bias=bias) for _ in range(tasks))
        self.in_features, self.out_features = in_features, out_features
        self.active = 0

    @property
    def weight(self) -> torch.Tensor:  # (the objective casts its input to the head's dtype)
        return self.heads[self.active].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads[self.active](x)


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def task_names(model: nn.Module) -> list[str]:
    """The task names a task_adapters model was built with ([] for any other model)."""
    return list(getattr(model, "task_names", []))


def select_task(model: nn.Module, task: int | str) -> int:
    """Make task `task` (its index or name) the one whose adapter and heads run; returns its index. Sets the active
    adapter of every LoRA layer directly (peft's `set_adapter` would also flip requires_grad, which the optimizer
    must not see change) and the classification objective's active classes to the task's."""
    names = task_names(model)
    if not names:
        raise ValueError("this model has no task adapters (its run has no task_adapters callback)")
    index = names.index(task) if isinstance(task, str) and task in names else task
    if not isinstance(index, int) or not 0 <= index < len(names):
        raise ValueError(f"task {task!r}: not one of this model's tasks {names} (a name, or an index below "
                         f"{len(names)})")
    for layer in _lora_layers(model):
        layer._active_adapter = adapter_name(index)
    for m in model.modules():
        if isinstance(m, TaskHeads):
            m.active = index
    classes = getattr(model, "task_classes", [])
    if classes and classes[index]:
        for o in model.objectives.values():
            o.set_active_classes(classes[index])
    model.active_task = index
    return index


def choose_task(model: nn.Module, task: str | None, what: str) -> int | None:
    """For a tool that runs a loaded model (`what`: its option, e.g. `--task`): select `task` in a task_adapters
    model and return its index; None for any other model without `task`. An error names the tasks and the fix."""
    names = task_names(model)
    if not names:
        if task is not None:
            raise ValueError(f"{what} {task}: this model has no per-task modules (its run had no task_adapters "
                             f"callback); leave {what} out")
        return None
    if task is None:
        raise ValueError(f"this model has one module per task ({', '.join(names)}, from task_adapters): give "
                         f"{what} NAME to choose one")
    return select_task(model, task)


@register_callback("task_adapters")
class TaskAdapters(Callback):
    """Per-task LoRA adapters and heads over a shared model that trains in the first task (see the module). Its
    checkpoints hold every weight, frozen ones too (the shared model is trained, not a base loaded from a path, and a
    base drawn from the seed under ZeRO-3's partitioned build is not the one a single process draws)."""

    state_is_global = True

    def __init__(self, method: str = "lora", r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 target_modules: list[str] | str = ("q_proj", "k_proj", "v_proj", "o_proj"), xattn: bool = True,
                 resampler: bool = True, vision: bool = True):
        if method != "lora":
            raise ValueError(f"method: {method!r}; task_adapters builds LoRA adapters (method: lora)")
        self.lora = LoRA(r=r, alpha=alpha, dropout=dropout, target_modules=target_modules)  # checks them
        for name, value in (("xattn", xattn), ("resampler", resampler), ("vision", vision)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false (adapters on the {name} too, or not), got {value!r}")
        self.xattn, self.resampler, self.vision = xattn, resampler, vision
        self.names: list[str] = []
        self.ends: list[int] = []
        self.classes: list[list[int]] = []

    # ----------------------------------------------------------------------------------------------- config

    def config_problems(self, cfg: Any) -> list[str]:
        p = []
        if not cfg.continual.tasks:
            p.append("task_adapters gives each task of continual.tasks its own adapter; set continual.tasks")
        others = [c.name for c in cfg.callbacks if c.name in _OTHER_METHODS]
        if others:
            p.append(f"task_adapters builds its own LoRA adapters; take {others} out of callbacks")
        if "lora" in (cfg.model.train_xattn, cfg.model.train_resampler):
            p.append("task_adapters: model.train_xattn / train_resampler = lora asks for the lora callback's adapters; "
                     "set them to full or frozen (task_adapters puts its own on the cross-attention: args.xattn)")
        return p

    def on_config(self, cfg: Any) -> None:
        self.names = [t.name for t in cfg.continual.tasks]
        self.classes = [list(t.classes) for t in cfg.continual.tasks]
        self.ends, total = [], 0
        for t in cfg.continual.tasks:
            total += t.max_steps
            self.ends.append(total)

    def _span(self, task: int) -> tuple[int, int]:
        """The optimizer steps of `task` as the schedule counts them (0-based: step k of the run is k - 1)."""
        return (self.ends[task - 1] if task else 0, self.ends[task])

    # ------------------------------------------------------------------------------------------------ build

    def on_model_built(self, model: nn.Module) -> None:
        from peft import inject_adapter_in_model

        if not self.names:
            raise RuntimeError("task_adapters: on_config was not called with the job's config before the build")
        before = {id(p): p.requires_grad for p in model.parameters()}
        # the parts whose every linear layer gets each task's adapter (names taken before any is injected)
        blocks = (list(model.xattn_blocks()) if self.xattn else []) + ([model.resampler] if self.resampler else []) \
            + ([model.vision] if self.vision else [])
        targets = self.lora.targets
        if not any(n.rsplit(".", 1)[-1] in targets for n, _ in model.lm.named_modules()):
            raise ValueError(f"task_adapters: no module of the LM is named any of {targets}")
        block_linears = [[n for n, m in block.named_modules() if type(m) is nn.Linear] for block in blocks]
        blocks, block_linears = [b for b, n in zip(blocks, block_linears) if n], [n for n in block_linears if n]
        growth = []
        for task in range(len(self.names)):
            name = adapter_name(task)
            ids_before = {id(p) for p in model.parameters()}
            with _new_weights(task), warnings.catch_warnings():
                # (peft warns that a second adapter goes into a model that has one: that is the point here)
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                inject_adapter_in_model(self.lora.lora_config(targets), model.lm, adapter_name=name)
                for block, linears in zip(blocks, block_linears):
                    inject_adapter_in_model(self.lora.lora_config(linears), block, adapter_name=name)
            new = [p for p in model.parameters() if id(p) not in ids_before]
            growth.append(new)
        with _new_weights(len(self.names)):
            for objective in model.objectives.values():
                head = getattr(objective, "head", None)
                if isinstance(head, nn.Linear):
                    objective.head = TaskHeads(head.in_features, head.out_features, head.bias is not None,
                                               len(self.names))
                    for task, copy in enumerate(objective.head.heads):
                        growth[task] += list(copy.parameters())
        for p in model.parameters():  # peft froze what it adapted: give the freeze policy back
            p.requires_grad_(before.get(id(p), True))
        added = {id(p) for params in growth for p in params}
        shared = [p for p in model.parameters() if p.requires_grad and id(p) not in added]
        for p in shared:
            setattr(p, LR_STEPS, self._span(0))  # trains in the first task, frozen after
        for task, params in enumerate(growth):
            for p in params:
                p.requires_grad_(True)
                setattr(p, LR_STEPS, self._span(task))
        model.task_names, model.task_classes = list(self.names), [list(c) for c in self.classes]
        select_task(model, 0)
        self.params_per_task = [sum(getattr(p, "ds_numel", p.numel()) for p in params) for params in growth]
        parts = [n for n, on in (("cross-attention", self.xattn), ("resampler", self.resampler),
                                 ("vision tower", self.vision)) if on]
        log.info("task_adapters: %d tasks; each adds %s parameters (LoRA r=%d on the LM's %s%s, and its own heads); "
                 "the shared %s parameters train in the first task only", len(self.names),
                 f"{self.params_per_task[0]:,}", self.lora.r, targets,
                 f" and every linear layer of the {', '.join(parts)}" if parts else "",
                 f"{sum(getattr(p, 'ds_numel', p.numel()) for p in shared):,}")

    # --------------------------------------------------------------------------------------------- training

    def _task_of_step(self, step: int) -> int:
        """The task that trains optimizer step `step` + 1 (the last task once the sequence is done)."""
        return next((i for i, end in enumerate(self.ends) if step < end), len(self.ends) - 1)

    def _train_task(self, trainer: Trainer) -> None:
        """The module of the task the next step trains, if another one is active (a task end, an evaluation of
        every task, a resume or a rollback changed it)."""
        task = self._task_of_step(trainer.step)
        if trainer.engine.module.active_task != task:
            select_task(trainer.engine.module, task)
            trainer._activate_classes()  # the trainer's classes for training (the tasks so far)

    def _reselect(self, trainer: Trainer) -> None:
        """The training task's module and the trainer's classes again, after the build or a measurement selected
        modules (and classes) of its own."""
        trainer.engine.module.active_task = None
        self._train_task(trainer)

    def on_train_start(self, trainer: Trainer) -> None:
        self._reselect(trainer)
        if trainer.is_main:
            trainer._log({"params_per_task": float(self.params_per_task[0])})

    def on_batch(self, trainer: Trainer, batch: dict[str, Any]) -> dict[str, Any]:
        self._train_task(trainer)  # (after a resume or a rollback too)
        return batch

    def on_task_eval(self, trainer: Trainer, task: int | None) -> None:
        if task is None:
            self._reselect(trainer)
        else:
            select_task(trainer.engine.module, task)

    def on_task_end(self, trainer: Trainer, task: int, row: list[float]) -> None:
        if "classification" in trainer.objectives:
            trainer._log(self.gate_metrics(trainer, task))
        self._reselect(trainer)

    @torch.no_grad()
    def gate_metrics(self, trainer: Trainer, last: int) -> dict[str, float]:
        """The expert gate over tasks 0..last: for every validation sample of those tasks, each of their modules
        predicts among its own task's classes; the most confident one is chosen. Returns how often it chose the
        sample's own task and how often its prediction was right (class-incremental accuracy), over all ranks."""
        model = trainer.engine.module
        trainer.engine.train(False)
        counts = torch.zeros(3, dtype=torch.float64)  # samples, right task, right class
        for j in range(last + 1):
            for batch in trainer.tasks.eval_loaders[j]:
                inputs = trainer._to_device(batch)
                best_conf, best_task, best_class = None, None, None
                for k in range(last + 1):
                    select_task(model, k)
                    logits = trainer.engine.forward(**inputs).terms["classification"]["logits"].float()
                    conf, pred = logits.softmax(-1).max(-1)
                    if best_conf is None:
                        best_conf, best_task, best_class = conf, torch.zeros_like(pred), pred
                    else:
                        better = conf > best_conf
                        best_conf = torch.where(better, conf, best_conf)
                        best_task = torch.where(better, torch.full_like(pred, k), best_task)
                        best_class = torch.where(better, pred, best_class)
                labels = batch["class_labels"].to(best_class.device)
                valid = labels >= 0
                counts += torch.tensor([float(valid.sum()), float(((best_task == j) & valid).sum()),
                                        float(((best_class == labels) & valid).sum())], dtype=torch.float64)
        trainer.engine.train(True)
        counts = all_reduce_sum(counts)
        n = max(float(counts[0]), 1.0)
        metrics = {"gate_task_accuracy": float(counts[1]) / n, "gate_accuracy": float(counts[2]) / n}
        if trainer.is_main:
            log.info("task_adapters after task %d, without a task id (expert gate over %d modules): task chosen "
                     "right %.3f, class right %.3f", last, last + 1, metrics["gate_task_accuracy"],
                     metrics["gate_accuracy"])
        return metrics
