"""mmscale.kernels against a float64 reference (CPU; Triton through its interpreter).

Run: TRITON_INTERPRET=1 python -m pytest tests/test_kernels.py -q
Triton reads TRITON_INTERPRET when it is first imported. This module sets it (setdefault) before importing
anything; if another test module imported triton earlier without it, the in-process Triton tests skip and
test_triton_suite_in_subprocess reruns this file in a fresh process with the variable set.
GPU checks live in tests/test_kernels_gpu.py.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import logging  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import mmscale.kernels as mk  # noqa: E402
from mmscale.kernels import (  # noqa: E402
    build_media_key_range,
    cross_attention,
    cross_attention_reference,
    cross_attention_varlen,
    resolve_backend,
)
from mmscale.kernels import dispatch, triton_xattn  # noqa: E402

INTERPRETER_ON = triton_xattn.interpreter_active()
needs_interpreter = pytest.mark.skipif(
    not INTERPRETER_ON, reason="triton was imported before TRITON_INTERPRET=1 was set; covered by "
                               "test_triton_suite_in_subprocess")

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2),
       torch.float64: dict(atol=1e-10, rtol=1e-10)}


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


def _media_ranges(gen, batch, len_q, n_media, tokens, mode):
    """Random media positions -> key ranges; some text precedes the first image."""
    latest = torch.full((batch, len_q), -1, dtype=torch.long)
    for b in range(batch):
        pos = torch.sort(torch.randperm(len_q, generator=gen)[:n_media]).values
        for m, p in enumerate(pos.tolist()):
            latest[b, p:] = m
    return build_media_key_range(latest, tokens, mode)


def _make_case(case, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    B, Lq, Lk, Hq, Hkv, D = case["shape"]
    q = torch.randn(B, Lq, Hq, D, generator=gen).to(dtype)
    k = torch.randn(B, Lk, Hkv, D, generator=gen).to(dtype)
    v = torch.randn(B, Lk, Hkv, D, generator=gen).to(dtype)
    mask = case.get("mask", "none")
    key_range = kv_lens = None
    if mask in ("previous", "all"):
        n_media, tokens = case["media"]
        key_range = _media_ranges(gen, B, Lq, n_media, tokens, mask)
        kv_lens = torch.tensor(case["kv_lens"], dtype=torch.int32) if "kv_lens" in case else None
    elif mask == "kv_lens":
        kv_lens = torch.tensor(case["kv_lens"], dtype=torch.int32)
    elif mask == "random":  # arbitrary, often empty or out-of-bounds ranges
        lo = torch.randint(-3, Lk + 3, (B, Lq), generator=gen)
        hi = lo + torch.randint(-4, Lk // 2 + 2, (B, Lq), generator=gen)
        key_range = torch.stack([lo, hi], -1).to(torch.int32)
        kv_lens = torch.tensor(case["kv_lens"], dtype=torch.int32) if "kv_lens" in case else None
    elif mask == "empty":  # every query sees nothing
        key_range = torch.zeros(B, Lq, 2, dtype=torch.int32)
        key_range[..., 0] = 5
        key_range[..., 1] = 2
    return q, k, v, key_range, kv_lens


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


def _check_against_reference(q, k, v, key_range, kv_lens, backend, tol, softmax_scale=None):
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = cross_attention(q, k, v, key_range=key_range, kv_lens=kv_lens, backend=backend,
                          softmax_scale=softmax_scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(q.dtype)
    grads = _grads(out, (q, k, v), dout)
    ref = cross_attention_reference(q, k, v, key_range=key_range, kv_lens=kv_lens, softmax_scale=softmax_scale)
    ref_grads = _grads(ref, (q, k, v), dout.double())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, **tol)
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert g.dtype == q.dtype, name
        assert torch.isfinite(g).all(), f"d{name} has non-finite values"
        torch.testing.assert_close(g.double(), rg.to(torch.float64), **tol, msg=lambda m: f"d{name}: {m}")
    # Queries with no visible key: exactly zero output and zero dq.
    mask = mk.build_visibility_mask(key_range, kv_lens, q.shape[0], q.shape[1], k.shape[1], q.device)
    if mask is not None:
        keyless = ~mask.any(-1)  # (B, Lq)
        assert (out[keyless] == 0).all()
        assert (grads[0][keyless] == 0).all()
    return out, grads


# (B, Lq, Lk, Hq, Hkv, D); BLOCK_M = BLOCK_N = 32 under the interpreter, so lengths > 32 cover multi-tile
# loops and masked-tile skipping.
TRITON_CASES = {
    "full_odd_lengths": dict(shape=(2, 17, 13, 2, 2, 32)),
    "kv_lens_0_1": dict(shape=(3, 9, 13, 2, 1, 32), mask="kv_lens", kv_lens=[0, 1, 13]),
    "previous_gqa2": dict(shape=(2, 40, 48, 4, 2, 64), mask="previous", media=(4, 12)),
    "all_gqa2": dict(shape=(2, 40, 48, 4, 2, 64), mask="all", media=(4, 12)),
    "previous_mqa_multitile": dict(shape=(2, 70, 100, 4, 1, 32), mask="previous", media=(5, 20)),
    # Whole query blocks that see whole key tiles: the forward's unmasked fast path, then a ragged kv edge.
    "full_tiles_kv_lens": dict(shape=(2, 64, 96, 2, 1, 32), mask="kv_lens", kv_lens=[96, 70]),
    "all_kv_lens": dict(shape=(2, 33, 40, 2, 2, 32), mask="all", media=(4, 10), kv_lens=[40, 25]),
    "previous_headdim40": dict(shape=(2, 21, 30, 2, 1, 40), mask="previous", media=(3, 10)),
    "random_ranges": dict(shape=(2, 35, 37, 2, 2, 32), mask="random", kv_lens=[37, 20]),
    "all_masked": dict(shape=(1, 12, 9, 2, 2, 32), mask="empty"),
    "headdim128": dict(shape=(1, 16, 24, 2, 1, 128), mask="previous", media=(2, 12)),
    "headdim24_padded": dict(shape=(1, 10, 12, 2, 2, 24), mask="all", media=(2, 6)),
    "single_key": dict(shape=(2, 5, 1, 2, 1, 32)),
}
FP16_CASES = ["previous_gqa2", "all_kv_lens", "random_ranges", "previous_headdim40"]


# ----------------------------------------------------------------------------------------------------
# Triton backend (interpreter)
# ----------------------------------------------------------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize("name", list(TRITON_CASES))
def test_triton_fp32_matches_reference(name):
    q, k, v, key_range, kv_lens = _make_case(TRITON_CASES[name], torch.float32)
    _check_against_reference(q, k, v, key_range, kv_lens, "triton", TOL[torch.float32])


@needs_interpreter
@pytest.mark.parametrize("name", FP16_CASES)
def test_triton_fp16_matches_reference(name):
    q, k, v, key_range, kv_lens = _make_case(TRITON_CASES[name], torch.float16)
    _check_against_reference(q, k, v, key_range, kv_lens, "triton", TOL[torch.float16])


@needs_interpreter
def test_triton_custom_scale_and_empty_key_tensor():
    q, k, v, key_range, kv_lens = _make_case(TRITON_CASES["all_gqa2"], torch.float32)
    _check_against_reference(q, k, v, key_range, kv_lens, "triton", TOL[torch.float32], softmax_scale=0.3)
    # No keys at all (Lk = 0): zeros, zero grads.
    k0, v0 = k[:, :0].clone().requires_grad_(True), v[:, :0].clone().requires_grad_(True)
    q0 = q.clone().requires_grad_(True)
    out = cross_attention(q0, k0, v0, backend="triton")
    assert (out == 0).all()
    out.sum().backward()
    assert (q0.grad == 0).all() and k0.grad.shape == k0.shape


@needs_interpreter
def test_triton_bf16_runs_close_to_fp32():
    # The interpreter computes bf16 in fp32; real bf16 numerics are checked in test_kernels_gpu.py.
    q, k, v, key_range, kv_lens = _make_case(TRITON_CASES["previous_gqa2"], torch.float32)
    out32 = cross_attention(q, k, v, key_range, kv_lens, backend="triton")
    qb, kb, vb = (t.bfloat16().requires_grad_(True) for t in (q, k, v))
    out16 = cross_attention(qb, kb, vb, key_range, kv_lens, backend="triton")
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), out32, atol=3e-2, rtol=3e-2)
    out16.float().sum().backward()
    assert qb.grad.dtype == torch.bfloat16 and torch.isfinite(qb.grad.float()).all()


# ----------------------------------------------------------------------------------------------------
# torch.library custom ops and torch.compile
# ----------------------------------------------------------------------------------------------------


def _op_args(with_range: bool, padded: bool):
    gen = torch.Generator().manual_seed(3)
    B, Lq, Lk, Hq, Hkv, D = 2, 20, 24, 4, 2, 32
    q = torch.randn(B * Lq, Hq, D, generator=gen, requires_grad=True)
    k = torch.randn(B * Lk, Hkv, D, generator=gen, requires_grad=True)
    v = torch.randn(B * Lk, Hkv, D, generator=gen, requires_grad=True)
    key_range = None
    if with_range:
        lo = torch.randint(-2, Lk, (B * Lq,), generator=gen)
        key_range = torch.stack([lo, lo + 7], -1).to(torch.int32)
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    if padded:  # sequence b at rows b * Lq, keys b * Lk
        return (q, k, v, key_range, None, None, None, i32([Lk, 17]), Lq, Lk, 0.2)
    return (q, k, v, key_range, i32([0, Lq]), i32([Lq, Lq]), i32([0, Lk]), i32([Lk, 17]), Lq, Lk, 0.2)


@needs_interpreter
@pytest.mark.parametrize("padded", [False, True], ids=["packed", "padded"])
@pytest.mark.parametrize("with_range", [True, False], ids=["key_range", "no_range"])
def test_triton_custom_ops_pass_opcheck(with_range, padded):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of the Triton ops."""
    args = _op_args(with_range, padded)
    torch.library.opcheck(triton_xattn._xattn_fwd_op, args)
    q, k, v = args[:3]
    out, lse = triton_xattn._xattn_fwd_op(*args)
    dout = torch.randn_like(out)
    torch.library.opcheck(triton_xattn._xattn_bwd_op, (dout, q.detach(), k.detach(), v.detach(), out.detach(),
                                                       lse) + args[3:],
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_interpreter), "sdpa"])
def test_cross_attention_compiles_without_graph_breaks(backend):
    """fullgraph=True fails on any graph break: the Triton path is one opaque op for torch.compile."""
    q, k, v, key_range, kv_lens = _make_case(TRITON_CASES["previous_gqa2"], torch.float32)

    def fn(q, k, v):
        return cross_attention(q, k, v, key_range=key_range, kv_lens=kv_lens, backend=backend)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    results = []
    for f in (fn, compiled):
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        out = f(qq, kk, vv)
        results.append((out, *_grads(out, (qq, kk, vv), dout)))
    for name, eager, comp in zip(("out", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(comp, eager, atol=0, rtol=0, msg=lambda m: f"{name}: {m}")


def _pack(x, lens):
    return torch.cat([x[b, :n] for b, n in enumerate(lens)], dim=0)


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_interpreter), "sdpa"])
def test_varlen_matches_padded(backend):
    gen = torch.Generator().manual_seed(3)
    B, Lq, Lk, Hq, Hkv, D = 3, 37, 41, 4, 2, 32
    q_lens, k_lens = [37, 5, 20], [30, 41, 0]
    q = torch.randn(B, Lq, Hq, D, generator=gen)
    k = torch.randn(B, Lk, Hkv, D, generator=gen)
    v = torch.randn(B, Lk, Hkv, D, generator=gen)
    key_range = _media_ranges(gen, B, Lq, 3, 10, "all")
    kv_lens = torch.tensor(k_lens, dtype=torch.int32)
    ref = cross_attention_reference(q, k, v, key_range, kv_lens)

    qp, kp, vp = (_pack(q, q_lens), _pack(k, k_lens), _pack(v, k_lens))
    qp, kp, vp = (t.requires_grad_(True) for t in (qp, kp, vp))
    out = cross_attention_varlen(qp, kp, vp, _cu(q_lens), _cu(k_lens), max(q_lens), max(k_lens),
                                 key_range=_pack(key_range, q_lens), backend=backend)
    assert out.shape == qp.shape
    torch.testing.assert_close(out.double(), _pack(ref, q_lens), **TOL[torch.float32])

    # Gradients against the padded reference, restricted to the packed rows.
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    dout = torch.randn(out.shape, generator=gen)
    ref_out = cross_attention_reference(qr, kr, vr, key_range, kv_lens)
    ref_out_packed = _pack(ref_out, q_lens)
    gq, gk, gv = torch.autograd.grad(ref_out_packed, (qr, kr, vr), dout.double())
    dq, dk, dv = torch.autograd.grad(out, (qp, kp, vp), dout)
    torch.testing.assert_close(dq.double(), _pack(gq, q_lens).double(), **TOL[torch.float32])
    torch.testing.assert_close(dk.double(), _pack(gk, k_lens).double(), **TOL[torch.float32])
    torch.testing.assert_close(dv.double(), _pack(gv, k_lens).double(), **TOL[torch.float32])


# ----------------------------------------------------------------------------------------------------
# Packed rows outside every sequence, and the early returns: defined (0) whatever the allocator held
# ----------------------------------------------------------------------------------------------------


def _garbage(t):
    return t.fill_(float("nan") if t.dtype.is_floating_point else -7)


class _GarbageTorch:
    """``torch`` as a kernels module sees it, except that ``empty``/``empty_like`` return NaN-filled tensors: a row
    the code never writes then reads NaN every time, instead of whatever the allocator happened to hold."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        return _garbage(torch.empty(*args, **kwargs))

    @staticmethod
    def empty_like(*args, **kwargs):
        return _garbage(torch.empty_like(*args, **kwargs))


@pytest.fixture
def garbage_alloc(monkeypatch):
    from mmscale.kernels import reference

    for module in (triton_xattn, dispatch, reference):
        monkeypatch.setattr(module, "torch", _GarbageTorch())


def _varlen_grads(out, q, k, v, dout):
    # An input the backend never read has no gradient path (sdpa); it reads as zeros, as it should.
    return torch.autograd.grad(out, (q, k, v), dout, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_interpreter), "sdpa"])
def test_varlen_rows_past_last_sequence_are_zero(backend, garbage_alloc):
    """q and k/v buffers longer than cu_seqlens[-1] (a collator's fixed-size packing buffer): the rows in no
    sequence hold NaN here, yet their output, dq, dk and dv are exactly 0 and the other rows match the reference."""
    gen = torch.Generator().manual_seed(5)
    B, Lq, Lk, Hq, Hkv, D = 2, 21, 15, 4, 2, 32
    q_lens, k_lens, tail_q, tail_k = [21, 6], [15, 9], 5, 3
    q, k, v = (torch.randn(B, n, h, D, generator=gen) for n, h in ((Lq, Hq), (Lk, Hkv), (Lk, Hkv)))
    key_range = _media_ranges(gen, B, Lq, 3, 5, "previous")
    nan_rows = lambda n, h: torch.full((n, h, D), float("nan"))  # noqa: E731
    qp = torch.cat([_pack(q, q_lens), nan_rows(tail_q, Hq)]).requires_grad_(True)
    kp = torch.cat([_pack(k, k_lens), nan_rows(tail_k, Hkv)]).requires_grad_(True)
    vp = torch.cat([_pack(v, k_lens), nan_rows(tail_k, Hkv)]).requires_grad_(True)
    kr = torch.cat([_pack(key_range, q_lens), torch.tensor([[0, 4]] * tail_q, dtype=torch.int32)])
    n_q, n_k = sum(q_lens), sum(k_lens)

    out = cross_attention_varlen(qp, kp, vp, _cu(q_lens), _cu(k_lens), max(q_lens), max(k_lens), key_range=kr,
                                 backend=backend)
    assert out.shape == qp.shape
    assert torch.equal(out[n_q:], torch.zeros_like(out[n_q:]))
    ref = cross_attention_reference(q, k, v, key_range, torch.tensor(k_lens, dtype=torch.int32))
    torch.testing.assert_close(out[:n_q].double(), _pack(ref, q_lens), **TOL[torch.float32])
    dq, dk, dv = _varlen_grads(out, qp, kp, vp, torch.randn(out.shape, generator=gen))
    for name, g, n in (("dq", dq, n_q), ("dk", dk, n_k), ("dv", dv, n_k)):
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        assert torch.equal(g[n:], torch.zeros_like(g[n:])), f"{name} is not 0 on rows outside every sequence"


# (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) over 6 query rows and 5 key rows, none attended.
EARLY_RETURN_CASES = {
    "no_sequence": ([0], [0], 0, 0),
    "no_query_in_any_sequence": ([0, 0, 0], [0, 3, 5], 0, 3),
    "no_key_and_tail_rows": ([0, 2, 4], [0, 0, 0], 2, 0),
}


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_interpreter), "sdpa"])
@pytest.mark.parametrize("name", list(EARLY_RETURN_CASES))
def test_varlen_early_returns_are_zero(name, backend, garbage_alloc):
    cu_q, cu_k, max_q, max_k = EARLY_RETURN_CASES[name]
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(6, 4, 32, generator=gen, requires_grad=True)
    k, v = (torch.randn(5, 2, 32, generator=gen, requires_grad=True) for _ in range(2))
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    out = cross_attention_varlen(q, k, v, i32(cu_q), i32(cu_k), max_q, max_k, backend=backend)
    assert out.shape == q.shape and torch.equal(out, torch.zeros_like(out))
    assert out.requires_grad, "the output left the autograd graph"
    for name_, g in zip(("dq", "dk", "dv"), _varlen_grads(out, q, k, v, torch.randn(out.shape, generator=gen))):
        assert torch.equal(g, torch.zeros_like(g)), f"{name_} is not 0"


@needs_interpreter
@pytest.mark.parametrize("cu_q,max_q", [([0, 3, 7], 4), ([0], 0)], ids=["tail_rows", "no_sequence"])
def test_triton_saved_lse_is_zero_outside_sequences(cu_q, max_q, garbage_alloc):
    """The forward's saved log-sum-exp (returned by the custom op) is defined for every row too."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(10, 2, 32, generator=gen)
    k, v = (torch.randn(8, 1, 32, generator=gen) for _ in range(2))
    cu_q = torch.tensor(cu_q, dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 8][: len(cu_q)], dtype=torch.int32)
    out, lse = triton_xattn._xattn_fwd_op(q, k, v, None, cu_q[:-1], cu_q[1:] - cu_q[:-1], cu_k[:-1],
                                          cu_k[1:] - cu_k[:-1], max_q, 5, 0.2)
    n_q = int(cu_q[-1])
    assert torch.isfinite(lse).all() and torch.isfinite(out).all()
    assert torch.equal(lse[:, n_q:], torch.zeros_like(lse[:, n_q:]))
    assert torch.equal(out[n_q:], torch.zeros_like(out[n_q:]))


# ----------------------------------------------------------------------------------------------------
# SDPA backend and reference
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["full_odd_lengths", "kv_lens_0_1", "previous_gqa2", "all_kv_lens",
                                  "random_ranges", "all_masked"])
def test_sdpa_matches_reference(name, dtype):
    q, k, v, key_range, kv_lens = _make_case(TRITON_CASES[name], dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else TOL[torch.float64]
    _check_against_reference(q, k, v, key_range, kv_lens, "sdpa", tol)


def test_auto_on_cpu_is_sdpa_and_logged_once(caplog):
    q, k, v, key_range, kv_lens = _make_case(TRITON_CASES["previous_gqa2"], torch.float32)
    dispatch._logged_choices.clear()
    with caplog.at_level(logging.INFO, logger="mmscale.kernels"):
        a = cross_attention(q, k, v, key_range, kv_lens)
        cross_attention(q, k, v, key_range, kv_lens)
    b = cross_attention(q, k, v, key_range, kv_lens, backend="sdpa")
    assert torch.equal(a, b)
    msgs = [r.getMessage() for r in caplog.records if r.name == "mmscale.kernels"]
    assert len(msgs) == 1 and "sdpa" in msgs[0]


def test_media_key_range_modes():
    latest = torch.tensor([[-1, -1, 0, 0, 1, 2]])
    prev = build_media_key_range(latest, 4, "previous")
    allm = build_media_key_range(latest, 4, "all")
    assert prev.dtype == torch.int32
    assert prev[0].tolist() == [[0, 0], [0, 0], [0, 4], [0, 4], [4, 8], [8, 12]]
    assert allm[0].tolist() == [[0, 0], [0, 0], [0, 4], [0, 4], [0, 8], [0, 12]]
    with pytest.raises(ValueError, match="mode"):
        build_media_key_range(latest, 4, "next")


def test_resolve_backend(monkeypatch):
    assert resolve_backend("auto", "cpu") == "sdpa"
    assert resolve_backend("sdpa", "cpu") == "sdpa"
    assert resolve_backend("auto", "cuda") == ("flash" if mk.flash_attn_available() else "triton")
    assert resolve_backend("auto", "cuda", has_key_range=True) == "triton"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("xformers", "cpu")
    if not mk.flash_attn_available():
        with pytest.raises(ValueError, match="flash-attn"):
            resolve_backend("flash", "cuda")
    # triton on CPU without the interpreter: a clear error naming the fix.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(triton_xattn, "_is_interpreted", lambda kernel: False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", "cpu")


def test_flash_padded_path_with_fake_flash(monkeypatch):
    """The flash path's packing and zeroing, with flash_attn_varlen_func replaced by the reference."""
    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None):
        outs = []
        for b in range(cu_q.numel() - 1):
            qs, ks = q[cu_q[b]:cu_q[b + 1]], k[cu_k[b]:cu_k[b + 1]]
            vs = v[cu_k[b]:cu_k[b + 1]]
            if ks.shape[0] == 0:
                outs.append(torch.full_like(qs, float("nan")))  # flash may return garbage here
                continue
            outs.append(cross_attention_reference(qs[None], ks[None], vs[None], softmax_scale=softmax_scale)[0]
                        .to(q.dtype))
        return torch.cat(outs)

    monkeypatch.setattr(dispatch, "_flash_attn_varlen_func", fake_varlen)
    q, k, v, _, kv_lens = _make_case(TRITON_CASES["kv_lens_0_1"], torch.float32)
    out = dispatch._flash_padded(q, k, v, None, kv_lens, 0.2)
    ref = cross_attention_reference(q, k, v, None, kv_lens, softmax_scale=0.2)
    torch.testing.assert_close(out.double(), ref, **TOL[torch.float32])
    full = torch.stack([torch.zeros(3, 9), kv_lens[:, None].expand(3, 9).float()], -1).to(torch.int32)
    dispatch._flash_padded(q, k, v, full, kv_lens, 0.2)  # full ranges are accepted
    full[0, 0, 1] = 0
    full[1, 3, 1] = 0
    with pytest.raises(ValueError, match="only full attention"):
        dispatch._flash_padded(q, k, v, full, kv_lens, 0.2)


def test_flash_varlen_path_zeroes_rows_outside_sequences(monkeypatch):
    """flash-attn leaves rows past cu_seqlens_q[-1] unwritten (NaN in the fake): they, and rows of a keyless
    sequence, come out exactly 0; their key ranges are not held against the full-attention check."""
    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None):
        out = torch.full_like(q, float("nan"))
        for b in range(cu_q.numel() - 1):
            qs, ks, vs = q[cu_q[b]:cu_q[b + 1]], k[cu_k[b]:cu_k[b + 1]], v[cu_k[b]:cu_k[b + 1]]
            if ks.shape[0]:
                out[cu_q[b]:cu_q[b + 1]] = cross_attention_reference(qs[None], ks[None], vs[None],
                                                                     softmax_scale=softmax_scale)[0].to(q.dtype)
        return out

    monkeypatch.setattr(dispatch, "_flash_attn_varlen_func", fake_varlen)
    gen = torch.Generator().manual_seed(8)
    q_lens, k_lens, tail = [4, 3, 5], [6, 0, 2], 3
    q = torch.randn(sum(q_lens) + tail, 2, 16, generator=gen)
    k, v = (torch.randn(sum(k_lens) + 1, 1, 16, generator=gen) for _ in range(2))
    full = torch.tensor([[0, n] for n, m in zip(k_lens, q_lens) for _ in range(m)] + [[9, -9]] * tail,
                        dtype=torch.int32)
    out = dispatch._flash_varlen(q, k, v, _cu(q_lens), _cu(k_lens), 5, 6, full, 0.2)
    assert torch.isfinite(out).all()
    assert torch.equal(out[4:7], torch.zeros_like(out[4:7])) and torch.equal(out[12:], torch.zeros_like(out[12:]))
    ref = cross_attention_reference(q[None, :4], k[None, :6], v[None, :6], softmax_scale=0.2)[0]
    torch.testing.assert_close(out[:4].double(), ref, **TOL[torch.float32])
    full[0, 1] = 5
    with pytest.raises(ValueError, match="only full attention"):
        dispatch._flash_varlen(q, k, v, _cu(q_lens), _cu(k_lens), 5, 6, full, 0.2)


# ----------------------------------------------------------------------------------------------------
# Host-side checks
# ----------------------------------------------------------------------------------------------------


def _qkv(B=2, Lq=5, Lk=6, Hq=4, Hkv=2, D=32, dtype=torch.float32):
    return torch.randn(B, Lq, Hq, D, dtype=dtype), torch.randn(B, Lk, Hkv, D, dtype=dtype), \
        torch.randn(B, Lk, Hkv, D, dtype=dtype)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_host_checks(backend):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"q must have rank 4 \(B, L, H, D\), got shape \(10, 4, 32\)"):
        cross_attention(q.flatten(0, 1), k, v, backend=backend)
    with pytest.raises(ValueError, match="Hq=4 and Hkv=3"):
        cross_attention(q, torch.randn(2, 6, 3, 32), torch.randn(2, 6, 3, 32), backend=backend)
    with pytest.raises(ValueError, match="same head dim.*D=32.*D=16"):
        cross_attention(q, k[..., :16], v[..., :16], backend=backend)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        cross_attention(q, k, v[:, :3], backend=backend)
    with pytest.raises(ValueError, match="share one dtype"):
        cross_attention(q, k.half(), v, backend=backend)
    with pytest.raises(ValueError, match=r"key_range must have shape \(2, 5, 2\)"):
        cross_attention(q, k, v, key_range=torch.zeros(2, 5, dtype=torch.int32), backend=backend)
    with pytest.raises(ValueError, match="key_range must be an integer tensor"):
        cross_attention(q, k, v, key_range=torch.zeros(2, 5, 2), backend=backend)
    with pytest.raises(ValueError, match=r"kv_lens must have shape \(2,\)"):
        cross_attention(q, k, v, kv_lens=torch.zeros(3, dtype=torch.int32), backend=backend)
    with pytest.raises(ValueError, match="must be on the same device as q"):
        cross_attention(q, k, v, kv_lens=torch.zeros(2, dtype=torch.int32, device="meta"), backend=backend)
    with pytest.raises(ValueError, match="q, k, v must be on one device"):
        cross_attention(q, k.to("meta"), v, backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        cross_attention(q, k, v, backend="cudnn")


@needs_interpreter
def test_host_checks_triton_specific():
    q, k, v = _qkv(D=160)
    with pytest.raises(ValueError, match="head_dim <= 128, got 160.*backend='sdpa'"):
        cross_attention(q, k, v, backend="triton")
    q, k, v = _qkv(dtype=torch.float64)
    with pytest.raises(ValueError, match="float64 is not supported by backend='triton'"):
        cross_attention(q, k, v, backend="triton")
    q, k, v = _qkv()
    qp, kp, vp = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
    with pytest.raises(ValueError, match="max_seqlen_q must be a non-negative Python int"):
        cross_attention_varlen(qp, kp, vp, _cu([5, 5]), _cu([6, 6]), torch.tensor(5), 6, backend="triton")
    with pytest.raises(ValueError, match="B\\+1 entries"):
        cross_attention_varlen(qp, kp, vp, _cu([5, 5]), _cu([12]), 5, 12, backend="triton")
    with pytest.raises(ValueError, match=r"key_range must have shape \(10, 2\)"):
        cross_attention_varlen(qp, kp, vp, _cu([5, 5]), _cu([6, 6]), 5, 6,
                               key_range=torch.zeros(2, 5, 2, dtype=torch.int32), backend="triton")


# ----------------------------------------------------------------------------------------------------
# Robustness of the interpreter switch, and the GPU build (both in fresh processes)
# ----------------------------------------------------------------------------------------------------


def _run_python(code, env_updates, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_updates)
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def test_cpu_triton_without_interpreter_is_a_clear_error(monkeypatch):
    # As if triton had been imported without the interpreter (kernels and triton.language compiled).
    monkeypatch.setattr(triton_xattn, "_is_interpreted", lambda kernel: False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1 in the environment before triton is first imported"):
        triton_xattn._kernel_for(triton_xattn._xattn_fwd_kernel, torch.device("cpu"))


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETER_ON, reason="the Triton tests already ran in this process")
def test_triton_suite_in_subprocess():
    """triton was imported without the interpreter in this process: run this file where it is on."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-2000:]


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_gpu():
    """Compile the kernels' autotune configs to Hopper cubins (no GPU needed): catches what the interpreter lets
    through, and a kernel none of whose configs fits an H100's shared memory."""
    out = _run_python("""
        import triton
        from triton.compiler import ASTSource
        from triton.backends.compiler import GPUTarget
        from mmscale.kernels import triton_xattn as tx
        PTR = {"Q", "K", "V", "Out", "DO", "DQ", "DK", "DV"}
        def signature(kernel, dtype, consts):
            sig = {}
            for name in kernel.arg_names:
                if name in consts: sig[name] = "constexpr"
                elif name in PTR: sig[name] = "*" + dtype
                elif name in ("Lse", "Delta"): sig[name] = "*fp32"
                elif name in ("KeyRange", "QStart", "QLen", "KStart", "KLen"): sig[name] = "*i32"
                elif name in ("qk_scale", "sm_scale"): sig[name] = "fp32"
                else: sig[name] = "i32"
            return sig
        H100_SMEM = 232448  # bytes of shared memory one block may use on sm_90
        def compile_all(kern, configs, dtype, consts, failures):
            fits = []
            for cfg in configs:
                full = dict(consts, **cfg.kwargs)
                src = ASTSource(kern, signature(kern, dtype, full), constexprs=full)
                ck = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                    options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
                fits.append(ck.metadata.shared <= H100_SMEM)
            if not any(fits):
                failures.append(f"{kern.fn.__name__} {dtype}: no config fits in shared memory")
        failures = []
        for dtype, d, bd in [("bf16", 128, 128), ("fp16", 40, 64), ("fp32", 64, 64), ("bf16", 64, 64)]:
            common = dict(PADDED=dtype == "bf16", HAS_KLEN=True, HAS_RANGE=True, EVEN_D=d == bd,
                          DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", BLOCK_D=bd)
            # Every autotune config of the heaviest case; one per kernel for the others (compiles are slow).
            pick = (lambda cs: cs) if (dtype, d) == ("bf16", 128) else (lambda cs: cs[:1])
            compile_all(tx._xattn_fwd_kernel, pick(tx._FWD_CONFIGS), dtype, common, failures)
            compile_all(tx._xattn_bwd_dkdv_kernel, pick(tx._DKDV_CONFIGS), dtype, common, failures)
            compile_all(tx._xattn_bwd_dq_kernel, pick(tx._DQ_CONFIGS), dtype, common, failures)
            compile_all(tx._xattn_bwd_preprocess_kernel, [triton.Config(dict(BLOCK_M=64), num_warps=4)], dtype,
                        dict(BLOCK_D=bd), failures)
        assert not failures, failures
        print("OK")
    """, {"TRITON_DEFAULT_FP_FUSION": "1"}, timeout=600)
    assert "OK" in out
