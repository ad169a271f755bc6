"""Captioning: next-token cross-entropy on the caption's tokens, token-weighted over the global batch.

    loss = sum over every rank's and micro batch's target tokens of CE / the global number of target tokens

`count` is the micro batch's target tokens (labels[:, 1:] != -100): a caption of 30 tokens weighs 30 times one of a
single token, on any number of ranks and accumulation steps (see mmscale.objectives.base for the scaling). No head:
the LM's own logits are the prediction.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from mmscale.objectives.base import IGNORE_INDEX, Objective, register_objective


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, L-1) fp32 cross-entropy of predicting labels[:, t+1] at position t (whatever the logits' dtype), 0 where
    the label is ignored. The captioning loss, and what evaluation tools measure per word."""
    target = labels[:, 1:]
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none").view(target.shape)


def mean_loss(out: Any) -> torch.Tensor:
    """The micro batch's mean caption loss, from a forward's output (one process, tests and benchmarks; training
    normalises over the global batch instead)."""
    terms = out.terms["captioning"]
    return terms["loss_sum"] / terms["count"].clamp(min=1)


@register_objective
class Captioning(Objective):
    name = "captioning"
    sums = ("loss_sum",)
    headline, eval_headline = "loss", "val_loss"
    eval_metrics = ("val_loss",)

    def count(self, batch: dict[str, Any]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def forward(self, model: Any, out: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        labels = batch.get("labels")
        if labels is None:
            return {}
        token_loss = next_token_loss(out.logits, labels)
        terms = {"loss_sum": token_loss.sum(), "count": (labels[:, 1:] != IGNORE_INDEX).sum()}
        if batch.get("return_token_loss"):
            terms["token_loss"] = token_loss  # (B, L-1): [b, t] predicts labels[b, t + 1], 0 where ignored
        return terms

    def step_metrics(self, sums: dict[str, float], count: float) -> dict[str, float]:
        return {"loss": sums["loss_sum"] / count if count else None}  # None: every step of the window was skipped

    def eval_start(self) -> dict[str, Any]:
        return {"loss_sum": 0.0, "tokens": 0.0}

    def eval_update(self, state: dict[str, Any], terms: dict[str, torch.Tensor], batch: dict[str, Any]) -> None:
        state["loss_sum"] += float(terms["loss_sum"])
        state["tokens"] += float(terms["count"])

    def eval_finish(self, state: dict[str, Any], all_reduce_sum: Callable[[Any], torch.Tensor],
                    all_gather_object: Callable[[Any], list[Any]]) -> dict[str, Any]:
        loss_sum, tokens = all_reduce_sum([state["loss_sum"], state["tokens"]]).tolist()
        return {"val_loss": loss_sum / max(tokens, 1.0), "val_tokens": int(tokens)}
