"""GPU checks of the Triton cross-attention: bf16/fp16/fp32 numerics and determinism.

Run on a CUDA machine: python -m pytest tests/test_kernels_gpu.py -q   (TRITON_INTERPRET unset)
Skipped without CUDA. If this pytest process runs Triton in its interpreter (TRITON_INTERPRET=1, as the CPU
kernel tests need), the checks skip here and test_gpu_suite_in_subprocess reruns this file without it.

bf16/fp16 tolerance follows flash-attn's tests: the kernel's error against the float64 reference may be at
most twice that of PyTorch's own attention in the same low precision, plus a small floor.
"""

import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]


def _interpreted() -> bool:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    if "triton" not in sys.modules:
        return False
    from mmscale.kernels import triton_xattn

    return triton_xattn._is_interpreted(triton_xattn._xattn_fwd_kernel)


compiled_only = pytest.mark.skipif(CUDA and _interpreted(), reason="Triton interpreter is on in this process; "
                                                                    "covered by test_gpu_suite_in_subprocess")


@pytest.mark.slow
@pytest.mark.skipif(not (CUDA and _interpreted()), reason="checks run in this process")
def test_gpu_suite_in_subprocess():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__], env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-2000:]


def _case(B, Lq, Lk, Hq, Hkv, D, mode, dtype, seed=0, n_media=6, tokens=64):
    from mmscale.kernels import build_media_key_range

    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, Hq, D, generator=gen)
    k = torch.randn(B, Lk, Hkv, D, generator=gen)
    v = torch.randn(B, Lk, Hkv, D, generator=gen)
    latest = torch.full((B, Lq), -1, dtype=torch.long)
    for b in range(B):
        pos = torch.sort(torch.randperm(Lq, generator=gen)[:n_media]).values
        for m, p in enumerate(pos.tolist()):
            latest[b, p:] = m
    key_range = build_media_key_range(latest, tokens, mode)
    kv_lens = torch.randint(Lk // 2, Lk + 1, (B,), generator=gen, dtype=torch.int32)
    dev = "cuda"
    return (q.to(dev, dtype), k.to(dev, dtype), v.to(dev, dtype), key_range.to(dev), kv_lens.to(dev))


def _fwd_bwd(fn, q, k, v, dout):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    return out, dq, dk, dv


# (B, Lq, n_media, tokens per media, Hq, Hkv, D, mode); Lk = n_media * tokens
CASES = [
    (2, 300, 6, 64, 8, 2, 64, "previous"),
    (2, 300, 6, 64, 8, 8, 128, "all"),
    (3, 257, 5, 40, 4, 1, 40, "all"),
    (1, 1024, 8, 128, 16, 16, 64, "previous"),
]


@compiled_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[7]}-D{c[6]}-Hkv{c[5]}")
def test_low_precision_vs_reference(case, dtype):
    from mmscale.kernels import cross_attention, cross_attention_reference

    B, Lq, n_media, tokens, Hq, Hkv, D, mode = case
    q, k, v, key_range, kv_lens = _case(B, Lq, n_media * tokens, Hq, Hkv, D, mode, dtype, n_media=n_media,
                                        tokens=tokens)
    dout = torch.randn(q.shape, device="cuda", dtype=dtype)
    ref = _fwd_bwd(lambda a, b, c: cross_attention_reference(a, b, c, key_range, kv_lens), q, k, v, dout.double())
    tri = _fwd_bwd(lambda a, b, c: cross_attention(a, b, c, key_range, kv_lens, backend="triton"), q, k, v, dout)
    base = _fwd_bwd(lambda a, b, c: cross_attention(a, b, c, key_range, kv_lens, backend="sdpa"), q, k, v, dout)
    for name, t, r, p in zip(("out", "dq", "dk", "dv"), tri, ref, base):
        assert torch.isfinite(t.float()).all(), name
        err = (t.double() - r.double()).abs().max().item()
        base_err = (p.double() - r.double()).abs().max().item()
        assert err <= 2 * base_err + 1e-3, f"{name}: triton err {err:.3e} vs torch {dtype} err {base_err:.3e}"


@compiled_only
def test_fp32_vs_reference_tight():
    from mmscale.kernels import cross_attention, cross_attention_reference

    q, k, v, key_range, kv_lens = _case(2, 200, 6 * 32, 4, 2, 64, "all", torch.float32, tokens=32)
    dout = torch.randn(q.shape, device="cuda")
    ref = _fwd_bwd(lambda a, b, c: cross_attention_reference(a, b, c, key_range, kv_lens), q, k, v, dout.double())
    tri = _fwd_bwd(lambda a, b, c: cross_attention(a, b, c, key_range, kv_lens, backend="triton"), q, k, v, dout)
    for t, r in zip(tri, ref):
        torch.testing.assert_close(t.double(), r.double(), atol=2e-4, rtol=2e-4)


@compiled_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_deterministic(dtype):
    from mmscale.kernels import cross_attention

    q, k, v, key_range, kv_lens = _case(2, 512, 6 * 64, 8, 2, 64, "previous", dtype, n_media=6, tokens=64)
    dout = torch.randn(q.shape, device="cuda", dtype=dtype)
    fn = lambda a, b, c: cross_attention(a, b, c, key_range, kv_lens, backend="triton")  # noqa: E731
    first = _fwd_bwd(fn, q, k, v, dout)
    second = _fwd_bwd(fn, q, k, v, dout)
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"{name} differs between identical runs"


@compiled_only
def test_varlen_matches_padded_on_gpu():
    from mmscale.kernels import cross_attention, cross_attention_varlen

    q, k, v, key_range, kv_lens = _case(3, 160, 6 * 32, 4, 2, 64, "all", torch.float16, tokens=32)
    kv = kv_lens.tolist()
    out = cross_attention(q, k, v, key_range, kv_lens, backend="triton")
    cu_q = torch.arange(4, device="cuda", dtype=torch.int32) * 160
    cu_k = torch.tensor([0] + torch.tensor(kv).cumsum(0).tolist(), device="cuda", dtype=torch.int32)
    kp = torch.cat([k[b, :n] for b, n in enumerate(kv)])
    vp = torch.cat([v[b, :n] for b, n in enumerate(kv)])
    outp = cross_attention_varlen(q.flatten(0, 1), kp, vp, cu_q, cu_k, 160, max(kv),
                                  key_range=key_range.flatten(0, 1), backend="triton")
    # Same tiles relative to each sequence, but autotune may pick another config for another max length.
    torch.testing.assert_close(outp, out.flatten(0, 1), atol=2e-3, rtol=2e-3)
