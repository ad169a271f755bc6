"""A continual-learning task sequence in one job (`continual.tasks`): the data, task after task, and what the trainer
needs to know about the tasks (where each ends, how to evaluate each, which classes each brings).

The trainer reads from `TaskSequence` as from any training loader: it switches to the next task's loader when the
current task has had its `max_steps` optimizer steps, and its `state_dict` (the task, the micro batches taken from
it, that loader's own position) makes the sequence resumable at any step, between tasks too. After the last step
of each task the trainer evaluates every task (`Tasks.eval_loaders`) into a row of the accuracy matrix R
(mmscale.continual.metrics).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence


class TaskSequence:
    """The training micro batches of `loaders[0]` for `steps[0] * grad_accum` micro batches, then `loaders[1]`'s..."""

    def __init__(self, loaders: Sequence[Any], steps: Sequence[int], grad_accum: int):
        if len(loaders) != len(steps) or not loaders:
            raise ValueError(f"one loader per task: {len(loaders)} loaders, {len(steps)} step budgets")
        self.loaders, self.steps, self.grad_accum = list(loaders), list(steps), grad_accum
        self.task = 0  # the task being read
        self.taken = 0  # micro batches taken from it

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while self.task < len(self.loaders):
            budget = self.steps[self.task] * self.grad_accum
            if self.taken < budget:
                it = iter(self.loaders[self.task])
                while self.taken < budget:
                    batch = next(it)
                    self.taken += 1
                    yield batch
            if hasattr(self.loaders[self.task], "close"):  # its workers are done
                self.loaders[self.task].close()
            self.task, self.taken = self.task + 1, 0

    def state_dict(self) -> dict[str, Any]:
        current = self.loaders[min(self.task, len(self.loaders) - 1)]
        return {"task": self.task, "taken": self.taken, "loader": current.state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.task, self.taken = sd["task"], sd["taken"]
        if self.task < len(self.loaders):
            self.loaders[self.task].load_state_dict(sd["loader"])

    def resume_problems(self, sd: dict[str, Any]) -> list[str]:
        if sd.get("task", 0) >= len(self.loaders):
            return []
        loader = self.loaders[sd["task"]]
        return loader.resume_problems(sd["loader"]) if hasattr(loader, "resume_problems") else []

    def close(self) -> None:
        for loader in self.loaders:
            if hasattr(loader, "close"):
                loader.close()


@dataclass
class Tasks:
    """What the trainer knows of a task sequence."""

    names: list[str]
    steps: list[int]
    eval_loaders: list[Any]
    metric: str = "val_loss"
    classes: list[list[int]] = field(default_factory=list)
    train_shards: list[str] = field(default_factory=list)
    loader: Callable[[str, int], Any] | None = None
    """`loader(shards, max_batches)`: a finite, unshuffled loader over any shards (an EvalLoader)."""

    def train_batches(self, task: int, max_batches: int) -> Any:
        """Up to `max_batches` micro batches of `task`'s training data, the same on every pass (EWC's Fisher pass
        reads the task it has just finished)."""
        if self.loader is None or not self.train_shards:
            raise RuntimeError("this task sequence was built without a loader for its training shards")
        return self.loader(self.train_shards[task], max_batches)

    def end_of(self, task: int) -> int:
        """The optimizer step after which `task` (0-based) is done."""
        return sum(self.steps[: task + 1])

    def active_classes(self, task: int) -> list[int] | None:
        """The classes the head may predict while `task` trains: those of the tasks so far (None: no task says)."""
        if not any(self.classes):
            return None
        return sorted({c for cls in self.classes[: task + 1] for c in cls})
