"""CLIP-style contrastive image-text objective (symmetric InfoNCE with a learned temperature) whose negatives come
from every rank.

Math and shapes
---------------
Each rank holds B local pairs, already L2-normalised embeddings::

    image  # (B, E)   rank r's images
    text   # (B, E)   rank r's captions; text[i] belongs with image[i]

With W ranks the gathered embeddings are the rank-ordered concatenation::

    all_image = cat(image_0, ..., image_{W-1})  # (W*B, E)
    all_text  = cat(text_0,  ..., text_{W-1})   # (W*B, E)

so local row i of rank r is global row ``r*B + i``, its target. With ``s = min(exp(logit_scale), 100)`` (logit_scale
holds log(1/temperature); the clamp at 100 is CLIP's, it stops the temperature collapsing)::

    logits_i2t = s * image @ all_text.T   # (B, W*B)  each local image against every caption of the step
    logits_t2i = s * text  @ all_image.T  # (B, W*B)  each local caption against every image of the step
    loss_row   = (CE(logits_i2t[i], r*B+i) + CE(logits_t2i[i], r*B+i)) / 2

``info_nce_sums`` returns the *sum* of loss_row over the local rows and the row count, not a mean, so that the
caller can form the exact global mean ``sum_r loss_sum_r / sum_r count_r`` however many rows each step has.

Why the gradient is exactly the gradient of the global mean loss
----------------------------------------------------------------
Let N be the global row count of an optimizer step (all ranks, all micro batches), A the gradient accumulation
steps, W the world size, S_r the loss_sum of rank r in one micro batch and f_r rank r's local features in it. The
global mean loss is L = (1/N) * sum over micro batches of sum_r S_r, and S_r depends on *every* rank's features
(through the gathered negatives), so

    dL/df_q = (1/N) * sum_r dS_r/df_q.

The trainer backpropagates ``S_r * A*W/N`` on rank r, and DeepSpeed divides by A, so rank r seeds its backward
with (W/N) * S_r. The backward of the all_gather here (a reduce-scatter with SUM) hands
rank q, for its own slice, the sum over every rank r of the gradient rank r computed for that slice:

    grad f_q on rank q = (W/N) * sum_r dS_r/df_q = W * dL/df_q.

That flows into rank q's parameters through its own encoder; DeepSpeed then averages the parameter gradients over
the W ranks (sum / W), which cancels the factor W: (1/N) * sum_q sum_r dS_r/df_q * df_q/dtheta = dL/dtheta. The
logit scale is replicated, not gathered: rank r's gradient for it is (W/N) * dS_r/ds, and the average over ranks is
(1/N) * sum_r dS_r/ds = dL/ds. A plain ``dist.all_gather`` (no autograd) would drop every term with r != q: the
loss of the other ranks would never move this rank's features, which is the mistake this module exists to avoid.
Gradient accumulation keeps this exact: the negatives of a row are the rows of the same micro batch on all ranks,
and L is the mean over the step of those losses.

Requirements on the caller
--------------------------
* Every rank must pass the same shape (B, E) in every call: ``all_gather`` moves equally sized tensors, a rank with
  another B would read garbage or hang. The trainer's micro batches are static (padded/dropped to
  micro_batch_size), which guarantees it.
* Every rank must call ``info_nce_sums`` (and run the backward) the same number of times: the forward and the
  backward are collectives.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

# CLIP clamps the logit scale (1 / temperature) at 100: larger values let the loss saturate and training diverge.
MAX_LOGIT_SCALE = 100.0
LOG_MAX_LOGIT_SCALE = math.log(MAX_LOGIT_SCALE)


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGather(torch.autograd.Function):
    """all_gather whose backward hands each rank the sum, over every rank, of the gradient for its own slice."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:  # (B, ...) -> (W*B, ...)
        rank, world = _world()
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        ctx.rows = (rank * x.shape[0], (rank + 1) * x.shape[0])
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        # a reduce-scatter with SUM, written as an all-reduce and a slice (gloo has no reduce-scatter)
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start, end = ctx.rows
        return grad[start:end]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) from all ranks along dim 0, in rank order, keeping the autograd
    graph: the backward sums every rank's gradient for rank q's slice into rank q's ``x`` (see the module docstring).

    x: (B, ...) on every rank -> (W*B, ...). Returns ``x`` itself when torch.distributed is not initialized or the
    world size is 1 (nothing to gather, and no collective to wait on).
    """
    _, world = _world()
    if world == 1:
        return x
    # Not a bare dist.all_gather: that one has no backward, the other ranks' losses would not reach this rank's
    # features. (torch.distributed.nn.functional.all_gather does the same as _AllGather, and is deprecated.)
    return _AllGather.apply(x)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: bf16/fp16 logits lose the small differences the softmax is about; float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def info_nce_sums(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                  gather: bool = True) -> dict[str, torch.Tensor]:
    """Symmetric InfoNCE sums over this rank's rows, negatives from every rank (``gather=True``) or only this rank.

    image, text: (B, E) local, L2-normalised embeddings (row i of each is a pair). logit_scale: scalar parameter
    holding log(1/temperature); the scale used is ``min(exp(logit_scale), 100)``.

    Returns (all on image's device):
      loss_sum:    scalar, sum over the B local rows of (CE_i2t + CE_t2i) / 2, in float32 (float64 for float64 input)
      count:       int64 scalar, B
      correct_i2t: int64 scalar, local rows whose image->text argmax is its own caption (among all W*B captions)
      correct_t2i: int64 scalar, same for text->image
    The global mean loss is sum over ranks of loss_sum / sum over ranks of count.
    """
    if image.dim() != 2 or image.shape != text.shape:
        raise ValueError(f"image and text must both be (B, E) with the same shape, got {tuple(image.shape)} and "
                         f"{tuple(text.shape)}")
    if logit_scale.numel() != 1:
        raise ValueError(f"logit_scale must be a scalar, got shape {tuple(logit_scale.shape)}")
    b = image.shape[0]
    rank, world = _world() if gather else (0, 1)
    dtype = _compute_dtype(image.dtype)
    # Autocast would run the matmuls in bf16/fp16 whatever the inputs are: the logits and the softmax must be fp32.
    with torch.autocast(device_type=image.device.type, enabled=False):
        image = image.to(dtype)  # (B, E)
        text = text.to(dtype)  # (B, E)
        all_image = all_gather_with_grad(image) if world > 1 else image  # (W*B, E)
        all_text = all_gather_with_grad(text) if world > 1 else text  # (W*B, E)
        scale = logit_scale.to(dtype).reshape(()).exp().clamp(max=MAX_LOGIT_SCALE)
        logits_i2t = scale * image @ all_text.T  # (B, W*B)
        logits_t2i = scale * text @ all_image.T  # (B, W*B)
        # Local row i is global row rank*B + i: its positive sits in this rank's slice of the gathered matrix.
        targets = rank * b + torch.arange(b, device=image.device)  # (B,)
        ce_i2t = F.cross_entropy(logits_i2t, targets, reduction="sum")
        ce_t2i = F.cross_entropy(logits_t2i, targets, reduction="sum")
        loss_sum = (ce_i2t + ce_t2i) / 2
    with torch.no_grad():
        correct_i2t = (logits_i2t.argmax(dim=1) == targets).sum()
        correct_t2i = (logits_t2i.argmax(dim=1) == targets).sum()
    return {
        "loss_sum": loss_sum,
        "count": torch.tensor(b, dtype=torch.int64, device=image.device),
        "correct_i2t": correct_i2t.to(torch.int64),
        "correct_t2i": correct_t2i.to(torch.int64),
    }
