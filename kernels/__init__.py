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

if __name__ == "kernels":
    # Python found this folder as a top-level `kernels` because the repository root is on sys.path (`python -c`
    # or `python -m` run from it). transformers and bitsandbytes import the Hugging Face `kernels` package by
    # that name; refuse clearly so they fall back instead of half-importing our code.
    raise ImportError(
        "this `kernels` folder is mmscale's Triton kernels, installed as `mmscale.kernels`; it is not the Hugging "
        "Face `kernels` package (found it because the repository root is on sys.path)"
    )


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
