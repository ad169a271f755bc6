"""Public entry points: argument checks, backend choice, padded and packed (varlen) layouts.

Backends:
- "triton": kernels in ``triton_xattn`` (CUDA; CPU only under ``TRITON_INTERPRET=1``, for tests).
- "flash":  flash-attn's ``flash_attn_varlen_func``; full attention per sample only (no key_range, or every
            row's range equal to ``[0, kv_len)``), fp16/bf16 on CUDA.
- "sdpa":   ``torch.nn.functional.scaled_dot_product_attention`` with a boolean mask (any device/dtype).
- "auto":   CUDA -> flash when installed, half precision and ``key_range is None``; else triton.
            CPU  -> sdpa.
            "auto" never inspects key_range values (that would be a CPU-GPU sync), so any key_range -> triton.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from .reference import sdpa_cross_attention
from .triton_xattn import default_softmax_scale, triton_cross_attention_packed

try:  # optional dependency
    from flash_attn import flash_attn_varlen_func as _flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the environment
    _flash_attn_varlen_func = None

__all__ = ["cross_attention", "cross_attention_varlen", "resolve_backend", "flash_attn_available"]

logger = logging.getLogger("mmscale.kernels")

BACKENDS = ("auto", "triton", "flash", "sdpa")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_logged_choices: set = set()


def flash_attn_available() -> bool:
    return _flash_attn_varlen_func is not None


def resolve_backend(backend: str, device, *, has_key_range: bool = False,
                    dtype: Optional[torch.dtype] = None) -> str:
    """Concrete backend for ``backend`` on ``device``.

    ``has_key_range`` and ``dtype`` refine "auto" (flash only handles full attention in fp16/bf16).
    Raises ValueError for an unknown name or a backend that cannot run on ``device``.
    """
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            flash_ok = flash_attn_available() and not has_key_range and dtype in (None, torch.float16, torch.bfloat16)
            return "flash" if flash_ok else "triton"
        return "sdpa"
    if backend == "flash":
        if not flash_attn_available():
            raise ValueError("backend='flash' needs the flash-attn package (`pip install flash-attn`); "
                             "it is not importable. Fix: install it or use backend='triton' / 'auto'.")
        if device.type != "cuda":
            raise ValueError(f"backend='flash' needs CUDA tensors, got device {device}. Fix: use backend='sdpa'.")
        if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"backend='flash' needs fp16/bf16 inputs, got {dtype}. Fix: cast or use 'triton'.")
    if backend == "triton" and device.type != "cuda":
        from .triton_xattn import interpreter_active

        if not interpreter_active():
            raise ValueError(
                f"backend='triton' on device {device} needs the Triton CPU interpreter: set TRITON_INTERPRET=1 "
                "in the environment before triton is first imported (tests only, slow), move the tensors to "
                "CUDA, or use backend='sdpa'.")
    return backend


def _log_choice(requested: str, chosen: str, device: torch.device) -> None:
    if torch.compiler.is_compiling():  # a logging call would break the graph; eager calls log it
        return
    key = (requested, chosen, device.type)
    if key not in _logged_choices:
        _logged_choices.add(key)
        logger.info("cross_attention backend=%r on %s -> %s", requested, device.type, chosen)


# ----------------------------------------------------------------------------------------------------
# Argument checks (host side; no value checks that would need a device sync)
# ----------------------------------------------------------------------------------------------------


def _check_qkv(q, k, v, *, packed: bool, backend: str) -> None:
    rank = 3 if packed else 4
    layout = "(total, H, D)" if packed else "(B, L, H, D)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{name} must have rank {rank} {layout}, got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if not packed and q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got q B={q.shape[0]} and k B={k.shape[0]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head dim, got q D={q.shape[-1]} and k D={k.shape[-1]}")
    n_q_heads, n_kv_heads = q.shape[-2], k.shape[-2]
    if n_kv_heads == 0 or n_q_heads % n_kv_heads != 0:
        raise ValueError(f"the number of query heads must be a multiple of the key/value heads (GQA), got "
                         f"Hq={n_q_heads} and Hkv={n_kv_heads}. Fix: choose Hkv dividing Hq.")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    sdpa_possible = backend == "sdpa" or (backend == "auto" and q.device.type != "cuda")
    allowed = _FLOAT_DTYPES + ((torch.float64,) if sdpa_possible else ())
    if q.dtype not in allowed:
        raise ValueError(f"dtype {q.dtype} is not supported by backend={backend!r}; use one of {allowed}")
    if q.shape[-1] == 0:
        raise ValueError("head dim must be positive, got 0")


def _check_int_tensor(name, t, shape, device, hint):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} {hint}, got {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor (int32 preferred), got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on the same device as q ({device}), got {t.device}")


def _check_scale(softmax_scale):
    if softmax_scale is not None and not isinstance(softmax_scale, (int, float)):
        raise ValueError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")


# ----------------------------------------------------------------------------------------------------
# Padded API
# ----------------------------------------------------------------------------------------------------


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_range: Optional[torch.Tensor] = None,
                    kv_lens: Optional[torch.Tensor] = None, backend: str = "auto",
                    softmax_scale: Optional[float] = None) -> torch.Tensor:
    """Cross-attention with per-query key ranges.

    q: (B, Lq, Hq, D); k, v: (B, Lk, Hkv, D) with Hq % Hkv == 0 (GQA).
    key_range: (B, Lq, 2) int, query i of sample b sees keys [lo, hi) of sample b; None = all keys.
    kv_lens: (B,) int, valid keys per sample (keys >= kv_lens[b] are ignored); None = Lk.
    Returns (B, Lq, Hq, D). Queries seeing no key get output 0 and zero gradients.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _check_qkv(q, k, v, packed=False, backend=backend)
    _check_scale(softmax_scale)
    batch, len_q, _, head_dim = q.shape
    len_k = k.shape[1]
    if key_range is not None:
        _check_int_tensor("key_range", key_range, (batch, len_q, 2), q.device, "(B, Lq, 2) = [lo, hi) per query")
    if kv_lens is not None:
        _check_int_tensor("kv_lens", kv_lens, (batch,), q.device, "(B,) valid keys per sample")
    scale = float(softmax_scale) if softmax_scale is not None else default_softmax_scale(head_dim)
    chosen = resolve_backend(backend, q.device, has_key_range=key_range is not None, dtype=q.dtype)
    _log_choice(backend, chosen, q.device)

    if chosen == "sdpa":
        return sdpa_cross_attention(q, k, v, key_range, kv_lens, scale)
    if chosen == "flash":
        return _flash_padded(q, k, v, key_range, kv_lens, scale)

    # triton: the padded batch is read in place, sequence b at rows b * Lq and keys b * Lk (no index tensors).
    kl = None if kv_lens is None else kv_lens.to(torch.int32)  # clamped to [0, Lk] in the kernel
    kr = None if key_range is None else key_range.reshape(batch * len_q, 2).to(torch.int32).contiguous()
    out = triton_cross_attention_packed(
        q.reshape(batch * len_q, q.shape[2], head_dim), k.reshape(batch * len_k, k.shape[2], head_dim),
        v.reshape(batch * len_k, v.shape[2], head_dim), kr, None, None, None, kl, len_q, len_k, scale)
    return out.view(q.shape)


def _flash_padded(q, k, v, key_range, kv_lens, scale):
    """Padded layout through flash_attn_varlen_func (full attention per sample)."""
    batch, len_q, n_q_heads, head_dim = q.shape
    len_k = k.shape[1]
    device = q.device
    k_len = (torch.full((batch,), len_k, device=device, dtype=torch.int32) if kv_lens is None
             else kv_lens.to(torch.int32).clamp(0, len_k))
    _require_full_ranges(key_range, k_len)
    cu_q = torch.arange(batch + 1, device=device, dtype=torch.int32) * len_q
    cu_k = torch.zeros(batch + 1, device=device, dtype=torch.int32)
    cu_k[1:] = torch.cumsum(k_len, 0)
    if kv_lens is None:
        k_packed, v_packed = k.reshape(batch * len_k, -1, head_dim), v.reshape(batch * len_k, -1, head_dim)
    else:
        keep = torch.arange(len_k, device=device)[None, :] < k_len[:, None]  # (B, Lk)
        # note: boolean indexing is a CPU-GPU sync point
        k_packed, v_packed = k[keep], v[keep]
    out = _flash_attn_varlen_func(q.reshape(batch * len_q, n_q_heads, head_dim), k_packed, v_packed, cu_q, cu_k,
                                  len_q, len_k, softmax_scale=scale)
    out = out.view(q.shape)
    # Samples with no keys: force exact zeros whatever flash-attn returns for them.
    return torch.where((k_len > 0)[:, None, None, None], out, out.new_zeros(()))


def _require_full_ranges(key_range, k_len):
    """flash-attn cannot express ranges: accept key_range only when every row is [0, kv_len).

    key_range (B, Lq, 2) with k_len (B,), or (Tq, 2) with k_len per row (Tq,).
    """
    if key_range is None:
        return
    klen = k_len[:, None] if key_range.dim() == 3 else k_len
    lo, hi = key_range[..., 0], key_range[..., 1]
    # A row without keys is 0 whatever its range. note: CPU-GPU sync point (explicit backend='flash' + key_range)
    full = bool((((lo <= 0) & (hi >= klen)) | (klen == 0)).all())
    if not full:
        raise ValueError("backend='flash' supports only full attention per sample: every key_range row must "
                         "be [0, kv_len). Fix: use backend='triton' (or 'auto') for media-masked attention.")


# ----------------------------------------------------------------------------------------------------
# Packed (varlen) API
# ----------------------------------------------------------------------------------------------------


def cross_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                           key_range: Optional[torch.Tensor] = None, backend: str = "auto",
                           softmax_scale: Optional[float] = None) -> torch.Tensor:
    """Packed cross-attention.

    q: (total_q, Hq, D); k, v: (total_k, Hkv, D); cu_seqlens_q/k: (B+1,) int32 prefix sums of the lengths;
    max_seqlen_q/k: Python ints >= every length (sizes the launch grid); key_range: (total_q, 2) int, relative
    to each sequence's own keys. Returns (total_q, Hq, D); rows past cu_seqlens_q[-1] belong to no sequence
    and get 0 (their values are never read), as rows without a visible key do.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _check_qkv(q, k, v, packed=True, backend=backend)
    _check_scale(softmax_scale)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.shape[0] < 1:
            raise ValueError(f"{name} must be a 1-D tensor of B+1 prefix sums, got "
                             f"{tuple(cu.shape) if isinstance(cu, torch.Tensor) else type(cu).__name__}")
        _check_int_tensor(name, cu, cu.shape, q.device, "")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both have B+1 entries, got "
                         f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(m, int) or m < 0:
            raise ValueError(f"{name} must be a non-negative Python int, got {m!r}")
    total_q, head_dim = q.shape[0], q.shape[-1]
    if key_range is not None:
        _check_int_tensor("key_range", key_range, (total_q, 2), q.device, "(total_q, 2) = [lo, hi) per query")
    scale = float(softmax_scale) if softmax_scale is not None else default_softmax_scale(head_dim)
    chosen = resolve_backend(backend, q.device, has_key_range=key_range is not None, dtype=q.dtype)
    _log_choice(backend, chosen, q.device)
    cu_q, cu_k = cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32)

    if chosen == "triton":
        kr = None if key_range is None else key_range.to(torch.int32).contiguous()
        return triton_cross_attention_packed(q, k, v, kr, cu_q[:-1], cu_q[1:] - cu_q[:-1], cu_k[:-1],
                                             cu_k[1:] - cu_k[:-1], max_seqlen_q, max_seqlen_k, scale)
    if chosen == "flash":
        return _flash_varlen(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, key_range, scale)
    return _sdpa_varlen(q, k, v, cu_q, cu_k, key_range, scale)


def _k_len_per_row(cu_q, cu_k, total_q):
    """(total_q,) keys of each query row's sequence, 0 for rows in no sequence (past cu_q[-1]); no sync."""
    rows = torch.arange(total_q, device=cu_q.device, dtype=cu_q.dtype)
    seq = torch.searchsorted(cu_q, rows, right=True) - 1  # (total_q,) in [0, B]; B = past the last sequence
    k_lens = torch.cat([cu_k[1:] - cu_k[:-1], cu_k.new_zeros(1)])  # (B + 1,)
    return k_lens[seq]


def _flash_varlen(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, key_range, scale):
    """Packed layout through flash_attn_varlen_func (full attention per sequence)."""
    k_len_rows = _k_len_per_row(cu_q, cu_k, q.shape[0])
    _require_full_ranges(key_range, k_len_rows)
    out = _flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, softmax_scale=scale)
    # Rows without keys or in no sequence (flash-attn leaves the latter unwritten): force exact zeros.
    return torch.where((k_len_rows > 0)[:, None, None], out, out.new_zeros(()))


def _sdpa_varlen(q, k, v, cu_q, cu_k, key_range, scale):
    """Packed layout through the sdpa backend: unpack to padded, run, repack; rows in no sequence get 0."""
    total_q, n_q_heads, head_dim = q.shape
    # note: .tolist() is a CPU-GPU sync point (sdpa is the CPU path).
    q_off, k_off = cu_q.tolist(), cu_k.tolist()
    if len(q_off) == 1:  # no sequence: run one empty one, so the output stays in the autograd graph (as triton's)
        q_off, k_off = [0, 0], [0, 0]
    batch = len(q_off) - 1
    q_lens = [q_off[b + 1] - q_off[b] for b in range(batch)]
    k_lens = [k_off[b + 1] - k_off[b] for b in range(batch)]
    len_q, len_k = max(q_lens), max(k_lens)
    qp = q.new_zeros(batch, len_q, n_q_heads, head_dim)
    kp = k.new_zeros(batch, len_k, k.shape[1], head_dim)
    vp = v.new_zeros(batch, len_k, v.shape[1], head_dim)
    krp = None if key_range is None else key_range.new_zeros(batch, len_q, 2)
    for b in range(batch):
        qp[b, : q_lens[b]] = q[q_off[b]: q_off[b + 1]]
        kp[b, : k_lens[b]] = k[k_off[b]: k_off[b + 1]]
        vp[b, : k_lens[b]] = v[k_off[b]: k_off[b + 1]]
        if krp is not None:
            krp[b, : q_lens[b]] = key_range[q_off[b]: q_off[b + 1]]
    kv_lens = torch.tensor(k_lens, device=q.device, dtype=torch.int32)
    out = sdpa_cross_attention(qp, kp, vp, krp, kv_lens, scale)
    rows = [out[b, : q_lens[b]] for b in range(batch)]
    rows.append(q.new_zeros(total_q - q_off[-1], n_q_heads, head_dim))  # past the last sequence
    return torch.cat(rows)
