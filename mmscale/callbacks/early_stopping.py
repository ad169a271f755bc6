"""Stop training when a validation metric has not improved for `patience` evaluations."""

from __future__ import annotations

import logging
import math
from typing import Any

from mmscale.callbacks import register_callback
from mmscale.objectives import metric_problems
from mmscale.training.callbacks import Callback

log = logging.getLogger("mmscale.callbacks")


@register_callback("early_stopping")
class EarlyStopping(Callback):
    state_is_global = True  # best and bad_evals follow the validation metrics, which every rank reduces alike
    def __init__(self, metric: str = "val_loss", patience: int = 3, min_delta: float = 0.0, mode: str = "min"):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an integer >= 1, got {patience!r}")
        if not isinstance(min_delta, (int, float)) or min_delta < 0:
            raise ValueError(f"min_delta must be a number >= 0, got {min_delta!r}")
        if not isinstance(metric, str):
            raise ValueError(f"metric must be a validation metric's name (e.g. val_loss), got {metric!r}")
        self.metric, self.patience, self.min_delta, self.mode = metric, patience, min_delta, mode
        self.best = math.inf if mode == "min" else -math.inf
        self.bad_evals = 0
        self._warned = False

    def config_problems(self, cfg: Any) -> list[str]:
        return metric_problems("args.metric", self.metric, cfg, "metric: val_loss")

    def on_eval_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        if self.metric not in metrics:  # e.g. val_acc when no validation sample had a label: nothing to judge by
            if not self._warned:
                log.warning("early_stopping: no %r in this validation's metrics %s; not stopping on it",
                            self.metric, sorted(metrics))
                self._warned = True
            return
        value = metrics[self.metric]
        better = value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        if better:
            self.best, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
            if self.bad_evals >= self.patience:
                log.info("early stopping at step %d: %s did not improve on %.4f for %d evals",
                         trainer.step, self.metric, self.best, self.patience)
                trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_evals = state["best"], state["bad_evals"]
