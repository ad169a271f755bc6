"""Classification: a linear head on the pooled multimodal features, cross-entropy per labelled sample.

    pooled = mean of the LM's last hidden states (after its final norm) over the attended positions
    loss   = sum over every rank's and micro batch's labelled samples of CE / the global number of labelled samples

Labels come from the shards' `.cls` members (`class_labels`, -100 = none); `model.num_classes` sizes the head and
bounds the labels the data pipeline accepts. Class-incremental learning masks the classes not yet active
(`active_classes`, a buffer the trainer sets at each task).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from mmscale.objectives.base import IGNORE_INDEX, ModelDims, Objective, ObjectiveSection, register_objective


@register_objective
class Classification(Objective):
    name = "classification"
    needs_hidden = True
    sums = ("loss_sum", "correct")
    headline, eval_headline = "cls_loss", "val_cls_loss"
    eval_metrics = ("val_acc", "val_cls_loss")
    enable_hint = ("set model.num_classes (the number of classes in the shards' .cls labels: the head is then measured), "
                   "and objectives.classification.weight=1 to train it")

    def __init__(self, section: ObjectiveSection, dims: ModelDims, cfg: Any):
        super().__init__(section, dims, cfg)
        num_classes = cfg.model.num_classes
        self.head = nn.Linear(dims.hidden_size, num_classes)
        # class-incremental learning: logits of classes not (yet) active are masked out
        self.register_buffer("active_classes", torch.ones(num_classes, dtype=torch.bool))

    @classmethod
    def implied(cls, cfg: Any) -> bool:  # a head size without the objective listed: measured, as it always was
        return isinstance(cfg.model.num_classes, int) and cfg.model.num_classes > 0

    @classmethod
    def config_problems(cls, section: ObjectiveSection, cfg: Any) -> list[str]:
        if cfg.model.num_classes <= 0:
            return [f"needs model.num_classes (the number of classes in the shards' .cls labels); it is "
                    f"{cfg.model.num_classes}"]
        return []

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def count(self, batch: dict[str, Any]) -> int:
        labels = batch.get("class_labels")
        return int((labels != IGNORE_INDEX).sum()) if labels is not None else 0

    def forward(self, model: Any, out: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        last, attention_mask = out.hidden, batch["attention_mask"]
        mask = attention_mask.unsqueeze(-1).to(last.dtype)
        pooled = (last * mask).sum(1) / mask.sum(1).clamp(min=1)
        logits = self.head(pooled.to(self.head.weight.dtype)).float()
        logits = logits.masked_fill(~self.active_classes, torch.finfo(logits.dtype).min)
        labels = batch.get("class_labels")
        if labels is None:  # (generation, a batch made without labels): nothing scored, the graph the same
            labels = torch.full(logits.shape[:1], IGNORE_INDEX, dtype=torch.long, device=logits.device)
        valid = labels != IGNORE_INDEX
        loss_sum = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        return {"loss_sum": loss_sum, "correct": ((logits.argmax(-1) == labels) & valid).sum(), "count": valid.sum(),
                "logits": logits}

    def step_metrics(self, sums: dict[str, float], count: float) -> dict[str, float]:
        return {"cls_loss": sums["loss_sum"] / count, "cls_acc": sums["correct"] / count} if count else {}

    def eval_start(self) -> dict[str, Any]:
        return {"loss_sum": 0.0, "per_class": torch.zeros(2, self.num_classes, dtype=torch.float64)}

    def set_active_classes(self, classes: list[int]) -> None:
        self.active_classes.zero_()
        self.active_classes[classes] = True

    def eval_update(self, state: dict[str, Any], terms: dict[str, torch.Tensor], batch: dict[str, Any]) -> None:
        if "class_labels" not in batch:
            return
        state["loss_sum"] += float(terms["loss_sum"])
        labels = batch["class_labels"].cpu()
        valid = labels != IGNORE_INDEX
        right = (terms["logits"].argmax(-1).cpu() == labels) & valid
        n = self.num_classes
        state["per_class"][0] += torch.bincount(labels[valid], weights=right[valid].double(), minlength=n)
        state["per_class"][1] += torch.bincount(labels[valid], minlength=n).double()

    def eval_finish(self, state: dict[str, Any], all_reduce_sum: Callable[[Any], torch.Tensor],
                    all_gather_object: Callable[[Any], list[Any]]) -> dict[str, Any]:
        totals = all_reduce_sum(torch.cat([torch.tensor([state["loss_sum"]], dtype=torch.float64),
                                           state["per_class"].flatten()]))
        right, seen = totals[1:].view(2, self.num_classes)
        if seen.sum() <= 0:  # no validation sample had a label
            return {}
        return {"val_cls_loss": float(totals[0]) / float(seen.sum()), "val_acc": float(right.sum() / seen.sum()),
                "val_acc_per_class": [float(r / n) if n else None for r, n in zip(right, seen)]}
