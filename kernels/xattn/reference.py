"""Plain-PyTorch pieces shared by every backend: the visibility mask, the Flamingo key-range builder, the
float64 reference used by tests, and the SDPA backend.

Mask semantics (one definition for all backends): query ``i`` of sample ``b`` sees key ``j`` iff
``lo[b, i] <= j < hi[b, i]`` and ``j < kv_lens[b]``. A query that sees no key gets output 0 and zero
gradients.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["build_visibility_mask", "build_media_key_range", "cross_attention_reference", "sdpa_cross_attention"]


def build_visibility_mask(key_range: Optional[torch.Tensor], kv_lens: Optional[torch.Tensor], batch: int,
                          len_q: int, len_k: int, device: torch.device) -> Optional[torch.Tensor]:
    """(B, Lq, Lk) bool mask, True = visible; None when every query sees every key."""
    if key_range is None and kv_lens is None:
        return None
    cols = torch.arange(len_k, device=device)  # (Lk,)
    mask = torch.ones(batch, len_q, len_k, dtype=torch.bool, device=device)
    if key_range is not None:
        lo = key_range[..., 0].to(device=device, dtype=torch.long)  # (B, Lq)
        hi = key_range[..., 1].to(device=device, dtype=torch.long)
        mask = (cols >= lo[..., None]) & (cols < hi[..., None])
    if kv_lens is not None:
        mask = mask & (cols < kv_lens.to(device=device, dtype=torch.long)[:, None, None])
    return mask


def build_media_key_range(latest_media: torch.Tensor, tokens_per_media: int, mode: str = "previous") -> torch.Tensor:
    """Flamingo key ranges from each text token's latest preceding image.

    latest_media: (B, Lq) int, index of the latest image at or before each text token, -1 if none.
    Visual keys are laid out image after image, ``tokens_per_media`` each.
    mode "previous": image m only -> [m*n, (m+1)*n); mode "all": images 0..m -> [0, (m+1)*n).
    Returns (B, Lq, 2) int32; tokens before the first image get the empty range [0, 0).
    """
    if mode not in ("previous", "all"):
        raise ValueError(f"mode must be 'previous' or 'all', got {mode!r}")
    m = latest_media.to(torch.int64)
    has = m >= 0
    hi = torch.where(has, (m + 1) * tokens_per_media, 0)
    lo = torch.where(has, m * tokens_per_media, 0) if mode == "previous" else torch.zeros_like(hi)
    return torch.stack([lo, hi], dim=-1).to(torch.int32)


def _masked_softmax_attention(q, k, v, mask, scale):
    """q (B, H, Lq, D), k/v (B, H, Lk, D), mask (B, 1, Lq, Lk) bool or None -> (B, H, Lq, D)."""
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if mask is None:
        return torch.einsum("bhqk,bhkd->bhqd", torch.softmax(s, dim=-1), v)
    any_key = mask.any(dim=-1, keepdim=True)  # (B, 1, Lq, 1)
    # Keyless rows: softmax over unmasked zeros (finite), then multiply by 0 -> output and grads 0.
    s = torch.where(mask | ~any_key, s, float("-inf"))
    p = torch.softmax(s, dim=-1) * any_key
    return torch.einsum("bhqk,bhkd->bhqd", p, v)


def cross_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              key_range: Optional[torch.Tensor] = None, kv_lens: Optional[torch.Tensor] = None,
                              softmax_scale: Optional[float] = None) -> torch.Tensor:
    """Float64 einsum reference. q (B, Lq, Hq, D), k/v (B, Lk, Hkv, D) -> (B, Lq, Hq, D) float64."""
    batch, len_q, n_q_heads, head_dim = q.shape
    len_k, n_kv_heads = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    group = n_q_heads // n_kv_heads
    q64 = q.double().transpose(1, 2)  # (B, Hq, Lq, D)
    k64 = k.double().transpose(1, 2).repeat_interleave(group, dim=1)  # (B, Hq, Lk, D)
    v64 = v.double().transpose(1, 2).repeat_interleave(group, dim=1)
    mask = build_visibility_mask(key_range, kv_lens, batch, len_q, len_k, q.device)
    out = _masked_softmax_attention(q64, k64, v64, None if mask is None else mask[:, None], scale)
    return out.transpose(1, 2)


def sdpa_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_range: Optional[torch.Tensor],
                         kv_lens: Optional[torch.Tensor], softmax_scale: float) -> torch.Tensor:
    """torch SDPA with a boolean mask; rows without a visible key are zeroed. Same shapes as the API."""
    batch, len_q, n_q_heads, head_dim = q.shape
    len_k, n_kv_heads = k.shape[1], k.shape[2]
    if len_k == 0:
        return q.new_zeros(q.shape) + 0.0 * q  # keeps the graph; grads are zero
    mask = build_visibility_mask(key_range, kv_lens, batch, len_q, len_k, q.device)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, D)
    if n_q_heads != n_kv_heads:
        group = n_q_heads // n_kv_heads
        kt = kt.repeat_interleave(group, dim=1)
        vt = vt.repeat_interleave(group, dim=1)
    if mask is None:
        return F.scaled_dot_product_attention(qt, kt, vt, scale=softmax_scale).transpose(1, 2)
    any_key = mask.any(dim=-1, keepdim=True)  # (B, Lq, 1)
    # Give keyless rows a harmless full row so SDPA never sees an all-masked row (NaN in some kernels),
    # then zero those rows with a select, which also zeroes their gradients.
    attn_mask = (mask | ~any_key)[:, None]  # (B, 1, Lq, Lk)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=attn_mask, scale=softmax_scale)
    out = out.transpose(1, 2)  # (B, Lq, Hq, D)
    return torch.where(any_key[..., None], out, out.new_zeros(()))
