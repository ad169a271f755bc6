"""mmscale.kernels: cross-attention for Flamingo-style media masking (Triton / flash-attn / SDPA).

Public API:
    cross_attention(q, k, v, key_range=None, kv_lens=None, backend="auto", softmax_scale=None)
    cross_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           key_range=None, backend="auto", softmax_scale=None)
    resolve_backend(backend, device) -> str
    cross_attention_reference(q, k, v, key_range=None, kv_lens=None, softmax_scale=None)  # float64
    build_media_key_range(latest_media, tokens_per_media, mode)  # Flamingo "previous" / "all" ranges

Layout: q (B, Lq, Hq, D), k/v (B, Lk, Hkv, D); see ``triton_xattn`` for the algorithm and its limits.
"""

from .dispatch import cross_attention, cross_attention_varlen, flash_attn_available, resolve_backend
from .reference import build_media_key_range, build_visibility_mask, cross_attention_reference

__all__ = [
    "cross_attention",
    "cross_attention_varlen",
    "resolve_backend",
    "flash_attn_available",
    "cross_attention_reference",
    "build_media_key_range",
    "build_visibility_mask",
]
