"""Triton cross-attention with per-query key ranges (Flamingo media masking).

Algorithm: FlashAttention-2 (Dao, 2023, "FlashAttention-2: Faster Attention with Better Parallelism and
Work Partitioning"). The forward streams key/value tiles through an online softmax kept in fp32 (running
max ``m_i``, running sum ``l_i``, base-2 exponentials) and saves the per-row log-sum-exp. The backward
recomputes the probabilities from the saved log-sum-exp: a preprocess kernel computes
``delta = rowsum(dO * O)``, one kernel accumulates dK/dV per key block by looping over query blocks, one
kernel accumulates dQ per query block by looping over key blocks. No atomics: every output element is
written by exactly one program, so results are bitwise deterministic run to run.

Masking. Every query row ``i`` of sequence ``b`` sees the keys ``[lo_i, hi_i) ∩ [0, k_len_b)`` of its own
sequence (``key_range``; absent = all ``k_len_b`` keys). Per query block the kernels reduce the rows'
ranges to ``[min lo, max hi)`` and only visit key tiles inside it, so fully masked tiles cost nothing
(dK/dV likewise skips query blocks whose range misses the key block). A row with an empty range gets
output 0, log-sum-exp 0 and zero gradients (never NaN): its scores are all ``-inf`` and the kernels
substitute 0 for the running max / normaliser of such rows.

Layout (packed, "varlen"): q ``(total_q, Hq, D)``, k and v ``(total_k, Hkv, D)``; sequence ``b`` owns query
rows ``[q_start[b], q_start[b] + q_len[b])`` and key rows ``[k_start[b], k_start[b] + k_len[b])``.
Rows in no sequence (a buffer longer than the last sequence's end) are never read; they get output 0,
log-sum-exp 0 and zero gradients. The padded API ``(B, L, H, D)`` is the special case ``q_start = b * Lq``,
``k_start = b * Lk``: the kernels compute those offsets themselves (``PADDED``), so a padded call builds no
index tensors and copies nothing.
GQA: query head ``h`` reads key/value head ``h // (Hq // Hkv)``; the dK/dV kernel loops over the query
heads of a group itself, so group gradients are summed in a fixed order.

Limits:
- head dim <= 128 (tiles are padded to ``max(16, next_pow2(D))`` and masked; e.g. 40 runs as 64).
- fp16 / bf16 / fp32 inputs; q, k, v share one dtype. fp32 matmuls use IEEE fp32 (no TF32) on GPU.
- Sequence ragged edges (M and N) are always masked because lengths are per sequence (varlen) and not
  known on the host without a sync; only the head-dim edge has an ``EVEN_D`` fast path.
- CPU tensors run only under ``TRITON_INTERPRET=1`` set before ``triton`` is first imported (tests). There
  bf16 is computed in fp32 (the interpreter cannot do bf16 arithmetic) and block sizes are fixed (32x32, no
  autotune). On GPU the forward and both backward kernels are autotuned on (head dim, length buckets).
  GPU numerics and speed are not yet measured (no GPU in the dev loop; ``benchmarks/gpu_check.sh`` does both);
  every autotune config is compile-checked for sm_90 without a GPU in tests/test_kernels.py.
- Range values are clamped to ``[0, k_len)`` in the kernel; no host-side value checks (they would sync).
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["triton_cross_attention_packed", "interpreter_active", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 128
_LOG2E = 1.4426950408889634
# Sentinel start for rows that see no key; larger than any key index.
_NO_KEY = tl.constexpr(1 << 30)


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _seq_bounds(b, QStart, QLen, KStart, KLen, pad_q, pad_k, PADDED: tl.constexpr, HAS_KLEN: tl.constexpr):
    """Rows of sequence b: queries [q_start, q_start + q_len), keys [k_start, k_start + k_len) (packed indices).

    PADDED: sequence b owns query rows [b * pad_q, (b + 1) * pad_q) and key rows from b * pad_k, with k_len =
    KLen[b] clamped to [0, pad_k] when HAS_KLEN, else pad_k: no per-call index tensors on the host. Otherwise
    all four are read from the (B,) arrays.
    """
    if PADDED:
        q_start = b.to(tl.int64) * pad_q
        q_len = pad_q
        k_start = b.to(tl.int64) * pad_k
        if HAS_KLEN:
            k_len = tl.minimum(tl.maximum(tl.load(KLen + b), 0), pad_k)
        else:
            k_len = pad_k
    else:
        q_start = tl.load(QStart + b).to(tl.int64)
        q_len = tl.load(QLen + b)
        k_start = tl.load(KStart + b).to(tl.int64)
        k_len = tl.load(KLen + b)
    return q_start, q_len, k_start, k_len


@triton.jit
def _row_key_ranges(KeyRange, rows, m_valid, k_len, HAS_RANGE: tl.constexpr, BLOCK_M: tl.constexpr):
    """Per-row visible keys [lo, hi) clamped to [0, k_len) (hi = 0 for rows past q_len or with no key), and the
    interval [blk_lo, blk_hi) holding every visible key of the block (empty when no row has one)."""
    if HAS_RANGE:
        lo = tl.load(KeyRange + rows * 2, mask=m_valid, other=0)
        hi = tl.load(KeyRange + rows * 2 + 1, mask=m_valid, other=0)
        lo = tl.maximum(lo, 0)
        hi = tl.minimum(hi, k_len)
    else:
        lo = tl.zeros([BLOCK_M], dtype=tl.int32)
        hi = tl.zeros([BLOCK_M], dtype=tl.int32) + k_len
    has_key = m_valid & (hi > lo)
    hi = tl.where(has_key, hi, 0)
    blk_lo = tl.min(tl.where(has_key, lo, _NO_KEY), axis=0)
    blk_hi = tl.max(hi, axis=0)
    return lo, hi, has_key, blk_lo, blk_hi


@triton.jit
def _tile_mask(valid, offs_d, head_dim, EVEN_D: tl.constexpr):
    """(rows, BLOCK_D) load/store mask: valid rows, and the real head-dim columns unless D fills the tile."""
    if EVEN_D:
        return valid[:, None]
    else:
        return valid[:, None] & (offs_d[None, :] < head_dim)


@triton.jit
def _probs_and_dscores(q, k, v, do, lse, delta, cols, lo, hi, qk_scale, DOT_PRECISION: tl.constexpr):
    """Backward tile: softmax probabilities P recomputed from the saved log-sum-exp (0 where masked) and
    dS = P * (dO V^T - delta), the gradient of the scaled scores. (M, N) each, fp32."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    visible = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
    p = tl.exp2(tl.where(visible, s, float("-inf")) - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    return p, p * (dp - delta[:, None])


@triton.jit
def _xattn_fwd_kernel(
    Q, K, V, Out, Lse, KeyRange,  # q/out (Tq, Hq, D); k/v (Tk, Hkv, D); lse (Hq, Tq) fp32; range (Tq, 2)
    QStart, QLen, KStart, KLen,  # (B,) int32 each; with PADDED only KLen, and only if HAS_KLEN
    pad_q, pad_k,  # PADDED: query / key rows per sequence
    stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh, stride_om, stride_oh,
    stride_lse_h,
    n_q_heads, group_size, head_dim,
    qk_scale,  # softmax_scale * log2(e): scores live in base 2
    LK_BUCKET,  # autotune key only (next pow2 of max key length)
    PADDED: tl.constexpr,
    HAS_KLEN: tl.constexpr,
    HAS_RANGE: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_q_heads
    h = pid_bh % n_q_heads
    hk = h // group_size
    q_start, q_len, k_start, k_len = _seq_bounds(b, QStart, QLen, KStart, KLen, pad_q, pad_k, PADDED, HAS_KLEN)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (M,) query index within the sequence
    offs_n = tl.arange(0, BLOCK_N)  # (N,)
    offs_d = tl.arange(0, BLOCK_D)  # (D,)
    m_valid = offs_m < q_len
    rows = q_start + offs_m  # (M,) packed row index, int64

    # Per-row visible keys [lo, hi) and the block's key interval: only tiles in [start, blk_hi) can hold a
    # visible key. Empty when no row of this block has one, so no early return is needed.
    lo, hi, has_key, blk_lo, blk_hi = _row_key_ranges(KeyRange, rows, m_valid, k_len, HAS_RANGE, BLOCK_M)
    start = (blk_lo // BLOCK_N) * BLOCK_N
    # Keys [full_lo, full_hi) are visible to every row of the block (empty unless all BLOCK_M rows see a key):
    # tiles inside it skip the mask arithmetic.
    full_lo = tl.max(tl.where(has_key, lo, _NO_KEY), axis=0)
    full_hi = tl.min(hi, axis=0)

    q_mask = _tile_mask(m_valid, offs_d, head_dim, EVEN_D)
    q = tl.load(Q + rows[:, None] * stride_qm + h * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")  # running row max (base 2)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(start, blk_hi, BLOCK_N):
        cols = start_n + offs_n  # (N,) key index within the sequence
        n_valid = cols < k_len
        kv_mask = _tile_mask(n_valid, offs_d, head_dim, EVEN_D)
        krows = k_start + cols
        k = tl.load(K + krows[:, None] * stride_km + hk * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + krows[:, None] * stride_vm + hk * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (M, N) fp32
        if (start_n < full_lo) | (start_n + BLOCK_N > full_hi):  # tile holds a masked pair
            visible = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Rows with no visible key so far keep m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])  # (M, N) fp32
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    has_mass = l_i > 0.0
    l_safe = tl.where(has_mass, l_i, 1.0)
    acc = acc / l_safe[:, None]  # rows without keys: acc is 0 -> output 0
    lse = tl.where(has_mass, m_i + tl.log2(l_safe), 0.0)  # base-2 log-sum-exp; 0 for keyless rows
    tl.store(Lse + h * stride_lse_h + rows, lse, mask=m_valid)
    tl.store(Out + rows[:, None] * stride_om + h * stride_oh + offs_d[None, :], acc.to(Out.dtype.element_ty),
             mask=q_mask)


@triton.jit
def _xattn_bwd_preprocess_kernel(
    Out, DO, Delta,  # out/do (Tq, Hq, D); delta (Hq, Tq) fp32
    stride_om, stride_oh, stride_dom, stride_doh, stride_delta_h,
    total_q, head_dim,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # delta_i = sum_d dO_id * O_id  (= rowsum(dP * P), the softmax-backward correction term)
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < total_q) & (offs_d[None, :] < head_dim)
    o = tl.load(Out + rows[:, None] * stride_om + h * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + rows[:, None] * stride_dom + h * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + h * stride_delta_h + rows, delta, mask=rows < total_q)


@triton.jit
def _xattn_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, KeyRange,
    QStart, QLen, KStart, KLen,
    pad_q, pad_k,
    stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh, stride_dom, stride_doh,
    stride_dkm, stride_dkh, stride_dvm, stride_dvh,
    stride_lse_h,
    n_kv_heads, group_size, head_dim,
    qk_scale, sm_scale,
    LQ_BUCKET, LK_BUCKET,  # autotune keys only (next pow2 of the longest query / key sequence)
    PADDED: tl.constexpr,
    HAS_KLEN: tl.constexpr,
    HAS_RANGE: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program owns one key block of one kv head and loops over (query heads of the group) x (query
    # blocks), so dK/dV of a GQA group are summed in a fixed order without atomics.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_kv_heads
    hk = pid_bh % n_kv_heads
    q_start, q_len, k_start, k_len = _seq_bounds(b, QStart, QLen, KStart, KLen, pad_q, pad_k, PADDED, HAS_KLEN)

    n_lo = pid_n * BLOCK_N
    cols = n_lo + tl.arange(0, BLOCK_N)  # (N,) key index within the sequence
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = cols < k_len
    kv_mask = _tile_mask(n_valid, offs_d, head_dim, EVEN_D)
    krows = k_start + cols
    k = tl.load(K + krows[:, None] * stride_km + hk * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + krows[:, None] * stride_vm + hk * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # A key block past k_len has nothing to do: make the query loop empty instead of returning early.
    q_end = tl.where(n_lo < k_len, q_len, 0)
    for g in range(0, group_size):
        h = hk * group_size + g
        for start_m in range(0, q_end, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_valid = offs_m < q_len
            rows = q_start + offs_m
            lo, hi, has_key, blk_lo, blk_hi = _row_key_ranges(KeyRange, rows, m_valid, k_len, HAS_RANGE, BLOCK_M)
            # Skip query blocks whose key interval misses this key block.
            if (blk_lo < n_lo + BLOCK_N) & (blk_hi > n_lo):
                q_mask = _tile_mask(m_valid, offs_d, head_dim, EVEN_D)
                q = tl.load(Q + rows[:, None] * stride_qm + h * stride_qh + offs_d[None, :], mask=q_mask,
                            other=0.0)
                do = tl.load(DO + rows[:, None] * stride_dom + h * stride_doh + offs_d[None, :], mask=q_mask,
                             other=0.0)
                lse = tl.load(Lse + h * stride_lse_h + rows, mask=m_valid, other=0.0)
                delta = tl.load(Delta + h * stride_lse_h + rows, mask=m_valid, other=0.0)

                p, ds = _probs_and_dscores(q, k, v, do, lse, delta, cols, lo, hi, qk_scale, DOT_PRECISION)
                dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=DOT_PRECISION)
                dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=DOT_PRECISION)

    dk = dk * sm_scale
    tl.store(DK + krows[:, None] * stride_dkm + hk * stride_dkh + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=kv_mask)
    tl.store(DV + krows[:, None] * stride_dvm + hk * stride_dvh + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=kv_mask)


@triton.jit
def _xattn_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, KeyRange,
    QStart, QLen, KStart, KLen,
    pad_q, pad_k,
    stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh, stride_dom, stride_doh,
    stride_dqm, stride_dqh,
    stride_lse_h,
    n_q_heads, group_size, head_dim,
    qk_scale, sm_scale,
    LQ_BUCKET, LK_BUCKET,  # autotune keys only (next pow2 of the longest query / key sequence)
    PADDED: tl.constexpr,
    HAS_KLEN: tl.constexpr,
    HAS_RANGE: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_q_heads
    h = pid_bh % n_q_heads
    hk = h // group_size
    q_start, q_len, k_start, k_len = _seq_bounds(b, QStart, QLen, KStart, KLen, pad_q, pad_k, PADDED, HAS_KLEN)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < q_len
    rows = q_start + offs_m
    lo, hi, has_key, blk_lo, blk_hi = _row_key_ranges(KeyRange, rows, m_valid, k_len, HAS_RANGE, BLOCK_M)
    start = (blk_lo // BLOCK_N) * BLOCK_N

    q_mask = _tile_mask(m_valid, offs_d, head_dim, EVEN_D)
    q = tl.load(Q + rows[:, None] * stride_qm + h * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + rows[:, None] * stride_dom + h * stride_doh + offs_d[None, :], mask=q_mask, other=0.0)
    lse = tl.load(Lse + h * stride_lse_h + rows, mask=m_valid, other=0.0)
    delta = tl.load(Delta + h * stride_lse_h + rows, mask=m_valid, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(start, blk_hi, BLOCK_N):
        cols = start_n + offs_n
        n_valid = cols < k_len
        kv_mask = _tile_mask(n_valid, offs_d, head_dim, EVEN_D)
        krows = k_start + cols
        k = tl.load(K + krows[:, None] * stride_km + hk * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + krows[:, None] * stride_vm + hk * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)

        _, ds = _probs_and_dscores(q, k, v, do, lse, delta, cols, lo, hi, qk_scale, DOT_PRECISION)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)

    dq = dq * sm_scale
    tl.store(DQ + rows[:, None] * stride_dqm + h * stride_dqh + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=q_mask)


# GPU forward autotuning. Keyed on head dim and a power-of-two bucket of the longest key sequence, so a
# new batch shape re-tunes at most log2(Lk) times. Forward programs only write their own rows, so
# re-running them during tuning is harmless.
_FWD_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 32, 4, 4)]
]
_xattn_fwd_kernel_tuned = triton.autotune(configs=_FWD_CONFIGS, key=["BLOCK_D", "LK_BUCKET", "HAS_RANGE"])(
    _xattn_fwd_kernel
)

# GPU backward autotuning, keyed likewise. dK/dV programs hold a key tile and stream query tiles (narrow
# BLOCK_M), dQ programs the reverse (narrow BLOCK_N), as in Triton's fused-attention tutorial. Each program
# writes only its own rows, so tuning re-runs are harmless. Configs that do not fit (shared memory) are
# skipped by the autotuner. The chosen tiles set the summation order: results are bitwise repeatable within a
# process; another process may tune to other tiles (differences at rounding level).
_BWD_KEY = ["BLOCK_D", "LQ_BUCKET", "LK_BUCKET", "HAS_RANGE"]
_DKDV_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(32, 128, 4, 3), (64, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 3)]
]
_DQ_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(128, 32, 4, 3), (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3)]
]
_xattn_bwd_dkdv_kernel_tuned = triton.autotune(configs=_DKDV_CONFIGS, key=_BWD_KEY)(_xattn_bwd_dkdv_kernel)
_xattn_bwd_dq_kernel_tuned = triton.autotune(configs=_DQ_CONFIGS, key=_BWD_KEY)(_xattn_bwd_dq_kernel)

# Fixed tiles under the interpreter (CPU), and the GPU preprocess kernel's rows per program.
_INTERP_BLOCK_M = 32
_INTERP_BLOCK_N = 32
_GPU_PRE_BLOCK_M = 64


# ----------------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------------


def interpreter_active() -> bool:
    """True when this module's kernels run in Triton's CPU interpreter.

    Triton picks interpreter-or-compiler when ``@triton.jit`` runs, and its own standard library
    (``tl.max``, ``tl.sum``...) is decorated when ``triton`` is first imported: ``TRITON_INTERPRET=1`` must be
    in the environment before ``triton`` is imported at all. Setting it later has no effect.
    """
    return _is_interpreted(_xattn_fwd_kernel) and _is_interpreted(tl.max)


def _is_interpreted(kernel) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


def _kernel_for(kernel, device: torch.device):
    """The kernel to launch for tensors on ``device``; CPU tensors need the interpreter."""
    if _is_interpreted(kernel) != _is_interpreted(tl.max):
        raise ValueError(
            "Triton was imported without TRITON_INTERPRET=1 but mmscale.kernels was imported with it (or the "
            "reverse), so its kernels cannot call triton.language. Fix: set TRITON_INTERPRET in the "
            "environment before triton is first imported, or unset it for GPU runs."
        )
    if device.type == "cpu" and not _is_interpreted(kernel):
        raise ValueError(
            f"backend='triton' got CPU tensors but Triton was imported without its interpreter "
            f"(TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} now). Fix: move the tensors to CUDA, use "
            "backend='sdpa', or set TRITON_INTERPRET=1 in the environment before triton is first imported "
            "(CPU testing only; slow)."
        )
    return kernel


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: IEEE matmul (TF32 would cost ~1e-3 relative error); fp16/bf16 ignore this.
    return "ieee" if dtype == torch.float32 else "tf32"


_DUMMY_I32: dict = {}


def _dummy_i32(device: torch.device) -> torch.Tensor:
    """A pointer for kernel arguments a specialisation never reads (cached: no per-call allocation)."""
    key = str(device)
    if key not in _DUMMY_I32:
        _DUMMY_I32[key] = torch.zeros(1, device=device, dtype=torch.int32)
    return _DUMMY_I32[key]


def _layout(q, key_range, q_start, q_len, k_start, k_len, max_seqlen_q, max_seqlen_k):
    """(batch, pointer/size args, constexprs) shared by the kernels' signatures.

    Padded layout (q_start is None): sequence b owns rows [b * max_seqlen_q, ...) and keys [b * max_seqlen_k, ...),
    k_len optional (B,) valid keys. Packed layout: the four (B,) arrays.
    """
    padded = q_start is None
    dummy = _dummy_i32(q.device) if (padded or key_range is None) else None
    if padded:
        batch = q.shape[0] // max_seqlen_q if max_seqlen_q else 0
        seq = (dummy, dummy, dummy, k_len if k_len is not None else dummy)
    else:
        batch = q_start.shape[0]
        seq = (q_start, q_len, k_start, k_len)
    args = (key_range if key_range is not None else dummy, *seq, max_seqlen_q, max_seqlen_k)
    consts = dict(PADDED=padded, HAS_KLEN=k_len is not None, HAS_RANGE=key_range is not None)
    return batch, args, consts


def _forward(q, k, v, key_range, q_start, q_len, k_start, k_len, max_seqlen_q, max_seqlen_k, sm_scale):
    """q (Tq, Hq, D), k/v (Tk, Hkv, D) -> out (Tq, Hq, D), lse (Hq, Tq) fp32 base-2."""
    total_q, n_q_heads, head_dim = q.shape
    total_k, n_kv_heads, _ = k.shape
    batch, layout_args, consts = _layout(q, key_range, q_start, q_len, k_start, k_len, max_seqlen_q, max_seqlen_k)
    # Packed rows past the last sequence (a buffer longer than cu_seqlens_q[-1]) are written by no program, so
    # they must start at 0: a memset of out, on the stream (finding where they start would be a sync). The padded
    # layout writes all B * Lq rows.
    padded = consts["PADDED"]
    out = torch.empty_like(q) if padded else torch.zeros_like(q)
    lse = (torch.empty if padded else torch.zeros)((n_q_heads, total_q), device=q.device, dtype=torch.float32)
    if total_q == 0 or batch == 0 or max_seqlen_q == 0 or total_k == 0 or max_seqlen_k == 0:
        return out.zero_(), lse.zero_()  # no query row or no key anywhere: every row is 0
    block_d = _block_d(head_dim)
    args = (
        q, k, v, out, lse, *layout_args,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        lse.stride(0),
        n_q_heads, n_q_heads // n_kv_heads, head_dim,
        sm_scale * _LOG2E,
        triton.next_power_of_2(max_seqlen_k),
    )
    consts.update(EVEN_D=head_dim == block_d, DOT_PRECISION=_dot_precision(q.dtype), BLOCK_D=block_d)
    if q.device.type == "cpu" or _is_interpreted(_xattn_fwd_kernel):
        kernel = _kernel_for(_xattn_fwd_kernel, q.device)
        grid = (triton.cdiv(max_seqlen_q, _INTERP_BLOCK_M), batch * n_q_heads)
        kernel[grid](*args, BLOCK_M=_INTERP_BLOCK_M, BLOCK_N=_INTERP_BLOCK_N, **consts)
    else:
        def grid(meta):
            return (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), batch * n_q_heads)

        _xattn_fwd_kernel_tuned[grid](*args, **consts)
    return out, lse


def _backward(do, q, k, v, out, lse, key_range, q_start, q_len, k_start, k_len, max_seqlen_q, max_seqlen_k,
              sm_scale):
    """Gradients (dq, dk, dv) with the shapes and dtypes of (q, k, v)."""
    total_q, n_q_heads, head_dim = q.shape
    total_k, n_kv_heads, _ = k.shape
    batch, layout_args, consts = _layout(q, key_range, q_start, q_len, k_start, k_len, max_seqlen_q, max_seqlen_k)
    # Rows no program writes must read 0: packed rows outside every sequence, keys past a sequence's k_len.
    # The padded layout writes every query row (keyless rows get 0), and every key row unless k_len is given.
    dq = torch.empty_like(q) if consts["PADDED"] else torch.zeros_like(q)
    every_key_written = consts["PADDED"] and not consts["HAS_KLEN"]
    dk = torch.empty_like(k) if every_key_written else torch.zeros_like(k)
    dv = torch.empty_like(v) if every_key_written else torch.zeros_like(v)
    if total_q == 0 or total_k == 0 or batch == 0 or max_seqlen_q == 0 or max_seqlen_k == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    interp = q.device.type == "cpu" or _is_interpreted(_xattn_fwd_kernel)
    block_d = _block_d(head_dim)
    consts.update(EVEN_D=head_dim == block_d, DOT_PRECISION=_dot_precision(q.dtype), BLOCK_D=block_d)

    delta = torch.empty_like(lse)  # (Hq, Tq) fp32
    pre_m = _INTERP_BLOCK_M if interp else _GPU_PRE_BLOCK_M
    _kernel_for(_xattn_bwd_preprocess_kernel, q.device)[(triton.cdiv(total_q, pre_m), n_q_heads)](
        out, do, delta,
        out.stride(0), out.stride(1), do.stride(0), do.stride(1), delta.stride(0),
        total_q, head_dim,
        BLOCK_M=pre_m, BLOCK_D=block_d,
    )
    group_size = n_q_heads // n_kv_heads
    qk_scale = sm_scale * _LOG2E
    buckets = (triton.next_power_of_2(max_seqlen_q), triton.next_power_of_2(max_seqlen_k))
    if interp:
        tiles = dict(BLOCK_M=_INTERP_BLOCK_M, BLOCK_N=_INTERP_BLOCK_N)
        dkdv_kernel = _kernel_for(_xattn_bwd_dkdv_kernel, q.device)
        dq_kernel = _kernel_for(_xattn_bwd_dq_kernel, q.device)
    else:
        tiles = {}
        dkdv_kernel, dq_kernel = _xattn_bwd_dkdv_kernel_tuned, _xattn_bwd_dq_kernel_tuned

    def dkdv_grid(meta):
        return (triton.cdiv(max_seqlen_k, meta["BLOCK_N"]), batch * n_kv_heads)

    def dq_grid(meta):
        return (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), batch * n_q_heads)

    dkdv_kernel[dkdv_grid](
        q, k, v, do, lse, delta, dk, dv, *layout_args,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        lse.stride(0),
        n_kv_heads, group_size, head_dim,
        qk_scale, sm_scale,
        *buckets,
        **tiles, **consts,
    )
    dq_kernel[dq_grid](
        q, k, v, do, lse, delta, dq, *layout_args,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dq.stride(0), dq.stride(1),
        lse.stride(0),
        n_q_heads, group_size, head_dim,
        qk_scale, sm_scale,
        *buckets,
        **tiles, **consts,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------
# Autograd. Eager calls go through a plain autograd.Function (the lightest host path); under torch.compile the
# same code runs as torch.library custom ops, which the compiler traces through their fake implementations
# (no graph break) and differentiates through register_autograd.
# ----------------------------------------------------------------------------------------------------


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # The interpreter holds bf16 as raw bits and gets arithmetic on it wrong: compute in fp32 there.
    if t.dtype == torch.bfloat16 and (t.device.type == "cpu" or _is_interpreted(_xattn_fwd_kernel)):
        return torch.float32
    return t.dtype


def _prep(*tensors: torch.Tensor, dtype: torch.dtype):
    return tuple(_last_dim_contiguous(t if t.dtype == dtype else t.to(dtype)) for t in tensors)


def _fwd_impl(q, k, v, key_range, q_start, q_len, k_start, k_len, max_seqlen_q, max_seqlen_k, sm_scale):
    io_dtype = q.dtype
    q, k, v = _prep(q, k, v, dtype=_compute_dtype(q))
    out, lse = _forward(q, k, v, key_range, q_start, q_len, k_start, k_len, max_seqlen_q, max_seqlen_k, sm_scale)
    return (out if out.dtype == io_dtype else out.to(io_dtype)), lse


def _bwd_impl(dout, q, k, v, out, lse, key_range, q_start, q_len, k_start, k_len, max_seqlen_q, max_seqlen_k,
              sm_scale):
    io_dtype = q.dtype
    dout, q, k, v, out = _prep(dout, q, k, v, out, dtype=_compute_dtype(q))
    dq, dk, dv = _backward(dout, q, k, v, out, lse, key_range, q_start, q_len, k_start, k_len, max_seqlen_q,
                           max_seqlen_k, sm_scale)
    if dq.dtype != io_dtype:
        dq, dk, dv = dq.to(io_dtype), dk.to(io_dtype), dv.to(io_dtype)
    return dq, dk, dv


def _save(ctx, inputs, out, lse):
    q, k, v, key_range, q_start, q_len, k_start, k_len, max_seqlen_q, max_seqlen_k, sm_scale = inputs
    ctx.save_for_backward(q, k, v, out, lse, key_range, q_start, q_len, k_start, k_len)
    ctx.max_seqlen_q, ctx.max_seqlen_k, ctx.sm_scale = max_seqlen_q, max_seqlen_k, sm_scale


def _grads(ctx, dout, bwd):
    q, k, v, out, lse, key_range, q_start, q_len, k_start, k_len = ctx.saved_tensors
    dq, dk, dv = bwd(dout, q, k, v, out, lse, key_range, q_start, q_len, k_start, k_len, ctx.max_seqlen_q,
                     ctx.max_seqlen_k, ctx.sm_scale)
    return dq, dk, dv, None, None, None, None, None, None, None, None


class _XAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        out, lse = _fwd_impl(*inputs)
        _save(ctx, inputs, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        return _grads(ctx, dout, _bwd_impl)


@torch.library.custom_op("mmscale::xattn_fwd", mutates_args=())
def _xattn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_range: Optional[torch.Tensor],
                  q_start: Optional[torch.Tensor], q_len: Optional[torch.Tensor], k_start: Optional[torch.Tensor],
                  k_len: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int,
                  sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: q (Tq, Hq, D), k/v (Tk, Hkv, D) -> out (Tq, Hq, D) in q's dtype, lse (Hq, Tq) fp32."""
    return _fwd_impl(q, k, v, key_range, q_start, q_len, k_start, k_len, max_seqlen_q, max_seqlen_k, sm_scale)


@_xattn_fwd_op.register_fake
def _(q, k, v, key_range, q_start, q_len, k_start, k_len, max_seqlen_q, max_seqlen_k, sm_scale):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("mmscale::xattn_bwd", mutates_args=())
def _xattn_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, key_range: Optional[torch.Tensor], q_start: Optional[torch.Tensor],
                  q_len: Optional[torch.Tensor], k_start: Optional[torch.Tensor], k_len: Optional[torch.Tensor],
                  max_seqlen_q: int, max_seqlen_k: int,
                  sm_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: (dq, dk, dv) with the shapes and dtypes of (q, k, v)."""
    return _bwd_impl(dout, q, k, v, out, lse, key_range, q_start, q_len, k_start, k_len, max_seqlen_q,
                     max_seqlen_k, sm_scale)


@_xattn_bwd_op.register_fake
def _(dout, q, k, v, out, lse, key_range, q_start, q_len, k_start, k_len, max_seqlen_q, max_seqlen_k, sm_scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_xattn_fwd_op.register_autograd(
    lambda ctx, dout, dlse: _grads(ctx, dout, _xattn_bwd_op),  # lse is auxiliary: nothing flows through it
    setup_context=lambda ctx, inputs, output: _save(ctx, inputs, *output),
)


def triton_cross_attention_packed(q, k, v, key_range, q_start, q_len, k_start, k_len, max_seqlen_q: int,
                                  max_seqlen_k: int, softmax_scale: float) -> torch.Tensor:
    """Triton cross-attention (arguments already validated; see ``dispatch``).

    q (Tq, Hq, D), k/v (Tk, Hkv, D), key_range (Tq, 2) int32 relative to each sequence's keys or None.
    Packed: q_start/q_len/k_start/k_len (B,) int32. Padded: q_start = q_len = k_start = None, sequence b owning
    rows [b * max_seqlen_q, ...) and keys [b * max_seqlen_k, ...), k_len (B,) int32 valid keys or None.
    Returns (Tq, Hq, D).
    """
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"backend='triton' supports head_dim <= {MAX_HEAD_DIM}, got {q.shape[-1]}. "
                         "Fix: use backend='sdpa' or split heads to a smaller head dim.")
    args = (q, k, v, key_range, q_start, q_len, k_start, k_len, int(max_seqlen_q), int(max_seqlen_k),
            float(softmax_scale))
    if torch.compiler.is_compiling():
        return _xattn_fwd_op(*args)[0]
    return _XAttnFunction.apply(*args)


def default_softmax_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
