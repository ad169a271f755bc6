"""Contrastive image-text learning (CLIP-style symmetric InfoNCE, learned temperature) on pooled features.

    image embedding = normalise(W_i · mean of the image's resampled visual tokens)          (B, E)
    text embedding  = normalise(W_t · mean of the LM's last hidden states over the caption,  (B, E)
                      the text run alone: no token sees an image, as in a two-tower model)
    loss            = sum over every rank's and micro batch's pairs of (CE_i2t + CE_t2i) / 2 / the global pair count

The negatives of a pair are every other pair of the same micro batch on every rank, gathered with a gradient
(mmscale.objectives.gather: why the gradient is that of the global mean, and why every rank's micro batch must have
the same shape, which the trainer's static micro batches give). `count` is the micro batch's pairs: the trainer
scales each micro batch's sum by weight * grad_accum * world_size / global pairs (mmscale.objectives.base).

Validation: the loss with the micro batch's own negatives (validation batches are not gathered: their last one may
be short, and ranks may see different numbers), and retrieval over all validation pairs of all ranks: image→text and
text→image recall@1/5/10, a caption that occurs several times counting as right wherever it appears
(mmscale.objectives.retrieval). Captions are compared by their token ids.

Every sample of a contrastive batch must hold an image (its first slot is the one compared).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from mmscale.objectives.base import ModelDims, Objective, ObjectiveSection, register_objective
from mmscale.objectives.gather import info_nce_sums
from mmscale.objectives.retrieval import retrieval_recall

RECALL_AT = (1, 5, 10)


@dataclass
class ContrastiveSection(ObjectiveSection):
    embed_dim: int = 64
    """Width of the shared image-text embedding space."""
    init_temperature: float = 0.07
    """The softmax temperature at the start (CLIP's 0.07); it is learned, and never goes below 0.01 (a logit
    scale above 100 is clamped)."""
    gather: bool = True
    """Negatives from every rank's micro batch (an all-gather with its gradient); false: this rank's only."""


@register_objective
class Contrastive(Objective):
    name = "contrastive"
    Section = ContrastiveSection
    needs_logits = False  # the text is encoded alone; the image-conditioned LM pass is not needed for this loss
    sums = ("loss_sum", "correct_i2t", "correct_t2i")
    headline, eval_headline = "contrastive_loss", "val_contrastive_loss"
    eval_metrics = ("val_contrastive_loss", *(f"val_{d}_recall_at_{k}" for d in ("i2t", "t2i") for k in RECALL_AT))

    def __init__(self, section: ContrastiveSection, dims: ModelDims, cfg: Any):
        super().__init__(section, dims, cfg)
        self.num_latents = dims.num_latents
        self.image_proj = nn.Linear(dims.media_size, section.embed_dim, bias=False)
        self.text_proj = nn.Linear(dims.hidden_size, section.embed_dim, bias=False)
        # shape (1,), not a 0-dim scalar: DeepSpeed broadcasts and flattens parameters as bytes, which a 0-dim
        # tensor cannot be viewed as
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / section.init_temperature)))

    @classmethod
    def config_problems(cls, section: ContrastiveSection, cfg: Any) -> list[str]:
        p = []
        if not (isinstance(section.embed_dim, int) and section.embed_dim >= 1):
            p.append(f"embed_dim: {section.embed_dim!r} must be an integer >= 1, e.g. 64")
        if not (isinstance(section.init_temperature, (int, float)) and 0.01 <= section.init_temperature <= 1):
            p.append(f"init_temperature: {section.init_temperature!r} must be in [0.01, 1], e.g. 0.07 (CLIP)")
        if cfg.train.micro_batch_size < 2 and not section.gather:
            p.append(f"gather: false with train.micro_batch_size {cfg.train.micro_batch_size}: a pair needs other "
                     f"pairs as negatives; gather them from every rank (gather: true) or raise micro_batch_size")
        return p

    def count(self, batch: dict[str, Any]) -> int:
        return int(batch["input_ids"].shape[0])

    def embed(self, model: Any, out: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, text) L2-normalised embeddings, (B, E) each, in fp32."""
        visual = out.media[:, : self.num_latents].mean(1)  # (B, Dv): the first image's resampled tokens, pooled
        image = self.image_proj(visual.to(self.image_proj.weight.dtype))
        mask = batch["attention_mask"]
        hidden = model.encode_text(batch["input_ids"], mask)  # (B, L, D), the text alone
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        text = self.text_proj(pooled.to(self.text_proj.weight.dtype))
        at_least_fp32 = torch.promote_types(image.dtype, torch.float32)  # (a float64 model stays float64)
        return F.normalize(image.to(at_least_fp32), dim=-1), F.normalize(text.to(at_least_fp32), dim=-1)

    def forward(self, model: Any, out: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if batch.get("labels") is None:  # generation: nothing to compare
            return {}
        image, text = self.embed(model, out, batch)
        # validation is never gathered (see the module doc); training gathers unless told not to
        terms = info_nce_sums(image, text, self.logit_scale, gather=self.training and self.section.gather)
        return {**terms, "image": image.detach(), "text": text.detach()}

    def step_metrics(self, sums: dict[str, float], count: float) -> dict[str, float]:
        if not count:
            return {}
        return {"contrastive_loss": sums["loss_sum"] / count, "contrastive_acc_i2t": sums["correct_i2t"] / count,
                "contrastive_acc_t2i": sums["correct_t2i"] / count,
                "temperature": 1.0 / min(float(self.logit_scale.detach().float().exp()), 100.0)}

    def eval_start(self) -> dict[str, Any]:
        return {"loss_sum": 0.0, "count": 0.0, "image": [], "text": [], "captions": []}

    def eval_update(self, state: dict[str, Any], terms: dict[str, torch.Tensor], batch: dict[str, Any]) -> None:
        state["loss_sum"] += float(terms["loss_sum"])
        state["count"] += float(terms["count"])
        state["image"].append(terms["image"].cpu())
        state["text"].append(terms["text"].cpu())
        ids, mask = batch["input_ids"].cpu(), batch["attention_mask"].cpu().bool()
        state["captions"] += [" ".join(map(str, row[m].tolist())) for row, m in zip(ids, mask)]

    def eval_finish(self, state: dict[str, Any], all_reduce_sum: Callable[[Any], torch.Tensor],
                    all_gather_object: Callable[[Any], list[Any]]) -> dict[str, Any]:
        loss_sum, count = all_reduce_sum([state["loss_sum"], state["count"]]).tolist()
        if not count:
            return {}
        mine = (torch.cat(state["image"]), torch.cat(state["text"]), state["captions"])
        every = all_gather_object(mine)  # every rank's pairs (one collective), the same metrics on every rank
        image = torch.cat([e[0] for e in every])
        text = torch.cat([e[1] for e in every])
        captions = [c for e in every for c in e[2]]
        recall = retrieval_recall(image, text, captions, ks=RECALL_AT)
        return {"val_contrastive_loss": loss_sum / count, **{f"val_{k}": v for k, v in recall.items()}}
