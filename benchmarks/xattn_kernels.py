"""Cross-attention kernel benchmark: Triton vs flash-attn vs FlexAttention vs SDPA, in TFLOP/s.

FLOPs count only visible query-key pairs: forward = 4 * D * sum over (sample, head, query) of the keys the
query sees; forward+backward = 3.5x forward (flash-attention convention: backward = 2.5x forward).
flash-attn cannot express media masks, so it runs full attention over each sample's keys (more work than the
others do); its row is a dense-kernel reference, credited with the same visible-pair FLOPs.

Cases (defaults): bf16, head dim 64 and 128, 16 heads, batch 8, 2048 text tokens, 4-8 images per sample with
64-128 visual tokens each (256-1024 keys per sample), media positions random; media modes "previous" and
"all", plus "full": every sample has the maximum image count and every query sees every key (no mask), the
like-for-like case for dense kernels. Backend "sdpa_flash" is PyTorch's SDPA held to its FlashAttention-2
kernel (the one PyTorch ships; "full" only): a stand-in for flash-attn where that package is not installed.
Timing: triton.testing.do_bench on CUDA. The JSON also carries flash-attn 2's published H100 forward figures
for an indicative comparison (other shapes and card: not a side-by-side measurement).

    python benchmarks/xattn_kernels.py                       # GPU, full size
    python benchmarks/xattn_kernels.py --smoke --out /tmp/kernels.json   # tiny shapes, proves the script runs (on a
                                                  # CPU, Triton runs through its interpreter: TRITON_INTERPRET=1)

Writes benchmarks/results/kernels.json (`--out`; a smoke run without it, a temporary folder's); the last stdout
line is one JSON object with the headline ratios (TFLOP/s of triton over each other backend, per case and the
minimum over cases). A backend that cannot run here (not installed, CUDA only, wrong dtype) is skipped; one that
raises is recorded as an error, the run goes on to the other cases, and the script exits 1 at the end, naming the
failures on stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # also when imported from elsewhere (tests load it by its path)

import smoke  # noqa: E402  (benchmarks/smoke.py)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    smoke.add_smoke_args(p, "kernels")  # tiny shapes, fp32 by default, runs on CPU
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="input dtype (default bf16; smoke fp32)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None, help="GQA key/value heads (default = --heads)")
    p.add_argument("--seqlen-q", type=int, default=2048)
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--modes", nargs="+", default=["full", "previous", "all"], choices=["full", "previous", "all"])
    p.add_argument("--images", type=int, nargs=2, default=[4, 8], metavar=("MIN", "MAX"))
    p.add_argument("--tokens", type=int, nargs=2, default=[64, 128], metavar=("MIN", "MAX"),
                   help="visual tokens per image (one value drawn per case)")
    p.add_argument("--backends", nargs="+", default=["triton", "flash", "sdpa_flash", "flex", "sdpa"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    smoke.check_smoke_paths(p, args)
    if args.smoke:
        args.batch, args.heads, args.seqlen_q, args.head_dims = 2, 2, 64, [32]
        args.images, args.tokens = [2, 3], [8, 16]
        args.dtype = args.dtype or "fp32"
    args.dtype = args.dtype or "bf16"
    args.kv_heads = args.kv_heads or args.heads
    return args


def build_case(args, head_dim, mode, device, gen):
    """Random Flamingo batch: per-sample image count, random media positions in the text."""
    from mmscale.kernels import build_media_key_range

    tokens = int(torch.randint(args.tokens[0], args.tokens[1] + 1, (1,), generator=gen))
    n_images = torch.randint(args.images[0], args.images[1] + 1, (args.batch,), generator=gen)
    if mode == "full":
        n_images.fill_(args.images[1])
    kv_lens = (n_images * tokens).to(torch.int32)
    len_k = int(kv_lens.max())
    if mode == "full":  # every query sees every key: the ranges are [0, Lk), passed to the kernels as None
        key_range = torch.stack([torch.zeros(args.batch, args.seqlen_q, dtype=torch.int32),
                                 torch.full((args.batch, args.seqlen_q), len_k, dtype=torch.int32)], -1)
    else:
        latest = torch.full((args.batch, args.seqlen_q), -1, dtype=torch.long)
        for b in range(args.batch):
            pos = torch.sort(torch.randperm(args.seqlen_q, generator=gen)[: int(n_images[b])]).values
            for m, p in enumerate(pos.tolist()):
                latest[b, p:] = m
        key_range = build_media_key_range(latest, tokens, mode)
    dtype = DTYPES[args.dtype]
    q = torch.randn(args.batch, args.seqlen_q, args.heads, head_dim, generator=gen).to(device, dtype)
    k = torch.randn(args.batch, len_k, args.kv_heads, head_dim, generator=gen).to(device, dtype)
    v = torch.randn(args.batch, len_k, args.kv_heads, head_dim, generator=gen).to(device, dtype)
    lo = key_range[..., 0].clamp(min=0)
    hi = torch.minimum(key_range[..., 1], kv_lens[:, None].to(key_range.dtype))
    visible_pairs = int((hi - lo).clamp(min=0).sum()) * args.heads  # (sample, head, query, key) quadruples
    return dict(q=q, k=k, v=v, key_range=key_range.to(device), kv_lens=kv_lens.to(device), tokens=tokens,
                len_k=len_k, visible_pairs=visible_pairs, head_dim=head_dim, mode=mode)


# ----------------------------------------------------------------------------------------------------
# Backends: each returns a function (q, k, v) -> out in the (B, L, H, D) layout. backends_to_run skips those
# that cannot run on this machine, so a raise from one that runs is a failure of the run.
# ----------------------------------------------------------------------------------------------------


def make_triton(case):
    from mmscale.kernels import cross_attention

    kr, kl = (None, None) if case["mode"] == "full" else (case["key_range"], case["kv_lens"])
    return lambda q, k, v: cross_attention(q, k, v, key_range=kr, kv_lens=kl, backend="triton")


def make_sdpa_flash(case):
    """SDPA restricted to its FlashAttention-2 kernel, no mask: dense cases only."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if case["mode"] != "full":
        raise RuntimeError("dense only (no mask): runs in the 'full' case")
    gqa = case["q"].shape[2] != case["k"].shape[2]

    def fn(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 enable_gqa=gqa)
        return out.transpose(1, 2)

    return fn


def make_sdpa(case):
    from mmscale.kernels import build_visibility_mask

    q, k = case["q"], case["k"]
    B, Lq, Hq, _ = q.shape
    mask = build_visibility_mask(case["key_range"], case["kv_lens"], B, Lq, k.shape[1], q.device)
    any_key = mask.any(-1, keepdim=True)
    attn_mask = (mask | ~any_key)[:, None]  # (B, 1, Lq, Lk); keyless rows unmasked (no NaN), zeroed below
    group = Hq // k.shape[2]

    def fn(q, k, v):
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if group > 1:
            kt, vt = kt.repeat_interleave(group, 1), vt.repeat_interleave(group, 1)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=attn_mask).transpose(1, 2)
        return out * any_key[..., None]

    return fn


def make_flex(case):
    if case["q"].device.type != "cuda":
        raise RuntimeError("FlexAttention benchmark runs on CUDA only")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q, k = case["q"], case["k"]
    B, Lq, Hq, _ = q.shape
    Lk = k.shape[1]
    lo = case["key_range"][..., 0].contiguous()
    hi = torch.minimum(case["key_range"][..., 1], case["kv_lens"][:, None]).contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= lo[b, q_idx]) & (kv_idx < hi[b, q_idx])

    block_mask = create_block_mask(mask_mod, B, None, Lq, Lk, device=q.device)
    flex = torch.compile(flex_attention, dynamic=False)
    gqa = Hq != k.shape[2]

    def fn(q, k, v):
        out = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, enable_gqa=gqa)
        return out.transpose(1, 2)

    return fn


def make_flash(case):
    from flash_attn import flash_attn_varlen_func  # optional; ImportError -> reported as unavailable

    q, k = case["q"], case["k"]
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError("flash-attn needs CUDA fp16/bf16")
    B, Lq, Hq, D = q.shape
    Lk = k.shape[1]
    kv_lens = case["kv_lens"]
    keep = torch.arange(Lk, device=q.device)[None, :] < kv_lens[:, None]
    cu_q = torch.arange(B + 1, device=q.device, dtype=torch.int32) * Lq
    cu_k = torch.zeros(B + 1, device=q.device, dtype=torch.int32)
    cu_k[1:] = torch.cumsum(kv_lens, 0)
    max_k = int(kv_lens.max())

    def fn(q, k, v):  # packing included: it is part of what a caller would pay
        out = flash_attn_varlen_func(q.reshape(B * Lq, Hq, D), k[keep], v[keep], cu_q, cu_k, Lq, max_k)
        return out.view(B, Lq, Hq, D)

    return fn


BACKEND_FACTORIES = {"triton": make_triton, "flash": make_flash, "sdpa_flash": make_sdpa_flash, "flex": make_flex,
                     "sdpa": make_sdpa}

# flash-attn 2's own published forward speed (bf16, head dim 128, no mask, H100 80GB SXM5, batch x seqlen = 16k,
# 2048 = heads x head dim), as read from the FlashAttention-3 paper (Shah et al., 2024), TFLOP/s by seqlen.
PUBLISHED_FA2_H100_FWD_D128 = {"512": 309, "1k": 350, "2k": 362}


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------


def bench_ms(fn, grad_tensors, device):
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_tensors)
    fn()  # warm-up (interpreter rewrite, allocator)
    reps = 2
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e3


def run_backend(name, case, device):
    fn = BACKEND_FACTORIES[name](case)
    q, k, v = (case[n].detach().clone().requires_grad_(True) for n in "qkv")
    dout = torch.randn_like(case["q"])
    with torch.no_grad():
        fwd_ms = bench_ms(lambda: fn(q, k, v), None, device)

    def fwd_bwd():
        fn(q, k, v).backward(dout)

    fwd_bwd_ms = bench_ms(fwd_bwd, [q, k, v], device)
    fwd_flops = 4.0 * case["visible_pairs"] * case["head_dim"]
    return dict(fwd_ms=fwd_ms, fwd_bwd_ms=fwd_bwd_ms, fwd_tflops=fwd_flops / fwd_ms / 1e9,
                fwd_bwd_tflops=3.5 * fwd_flops / fwd_bwd_ms / 1e9)


def backends_to_run(args, device):
    from mmscale.kernels.triton_xattn import interpreter_active

    chosen, skipped = [], {}
    for name in args.backends:
        if name not in BACKEND_FACTORIES:
            raise SystemExit(f"unknown backend {name!r}; choose from {sorted(BACKEND_FACTORIES)}")
        if device.type != "cuda":
            if name == "triton" and not interpreter_active():
                skipped[name] = "CPU without TRITON_INTERPRET=1"
                continue
            if name in ("flash", "flex"):
                skipped[name] = "CUDA only"
                continue
        elif name == "flash" and importlib.util.find_spec("flash_attn") is None:
            skipped[name] = "flash-attn not installed"
            continue
        elif name in ("flash", "sdpa_flash") and args.dtype == "fp32":
            skipped[name] = "FlashAttention kernels need fp16/bf16"
            continue
        chosen.append(name)
    return chosen, skipped


def device_name(device) -> str:
    return torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def failures_of(results) -> list:
    """["case/backend", ...] for every backend that raised (skips are not failures)."""
    return [f"{e['case']}/{name}" for e in results for name, res in e["backends"].items() if "error" in res]


def headline_of(args, device, results) -> dict:
    """Triton TFLOP/s over each other backend's (> 1 = triton faster), per case and the minimum over cases."""
    ratios, minima = {}, {}
    for entry in results:
        tri = entry["backends"].get("triton", {})
        if "fwd_ms" not in tri:
            continue
        for name, res in entry["backends"].items():
            if name == "triton" or "fwd_ms" not in res:
                continue
            for pass_ in ("fwd", "fwd_bwd"):
                key = f"{pass_}:triton/{name}"
                r = _sig(tri[f"{pass_}_tflops"] / res[f"{pass_}_tflops"])
                ratios.setdefault(entry["case"], {})[key] = r
                minima[key] = min(minima.get(key, math.inf), r)
    triton_tflops = {e["case"]: {p: _sig(e["backends"]["triton"][f"{p}_tflops"]) for p in ("fwd", "fwd_bwd")}
                     for e in results if "fwd_ms" in e["backends"].get("triton", {})}
    dense128 = triton_tflops.get("full-D128", {}).get("fwd")
    return dict(
        benchmark="kernels", date=time.strftime("%Y-%m-%d"), device=device_name(device), smoke=args.smoke,
        dtype=args.dtype, meaningful=device.type == "cuda" and not args.smoke,
        cases_done=len(results), failed=failures_of(results), triton_tflops=triton_tflops, ratios=ratios,
        min_ratios=minima,
        # Indicative only: flash-attn 2's published H100 figure at seqlen 1k, not measured in this run.
        fwd_full_D128_over_published_fa2_h100_1k=None if dense128 is None else _sig(
            dense128 / PUBLISHED_FA2_H100_FWD_D128["1k"]),
    )


def write_results(args, device, results) -> dict:
    """(Re)write the JSON file; called after every case, so a run cut short still leaves its finished cases."""
    import triton

    headline = headline_of(args, device, results)
    payload = dict(headline=headline, config=vars(args), torch=torch.__version__, triton=triton.__version__,
                   interpret=os.environ.get("TRITON_INTERPRET"),
                   published_fa2_h100_fwd_d128_tflops=dict(PUBLISHED_FA2_H100_FWD_D128,
                                                           source="FlashAttention-3 paper (Shah et al., 2024), "
                                                                  "bf16 forward, head dim 128, no mask"),
                   cases=results)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(out_path)
    return headline


def print_row(case_id, name, res):
    if "fwd_ms" in res:
        print(f"{case_id:<16}{name:<11}{res['fwd_ms']:>10.3f}{res['fwd_tflops']:>10.3f}"
              f"{res['fwd_bwd_ms']:>10.3f}{res['fwd_bwd_tflops']:>10.3f}", flush=True)
    else:
        print(f"{case_id:<16}{name:<11}  {res.get('error') or 'skipped: ' + res.get('skipped', '')}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("no CUDA device: run with --smoke (tiny CPU shapes; numbers are meaningless)")
    if device.type != "cuda":
        # Triton reads it when first imported (nothing has imported it yet): without it the Triton rows are skipped
        os.environ.setdefault("TRITON_INTERPRET", "1")
    args.out = str(smoke.out_path(args, "kernels"))
    names, skipped = backends_to_run(args, device)
    gen = torch.Generator().manual_seed(args.seed)
    if device.type != "cuda":
        print("NOTE: CPU run (Triton through its interpreter if enabled): absolute numbers are meaningless; "
              "this only proves the benchmark runs.")
    print(f"\ndevice={device_name(device)} "
          f"dtype={args.dtype} B={args.batch} H={args.heads}/{args.kv_heads} Lq={args.seqlen_q}")
    print(f"{'case':<16}{'backend':<11}{'fwd ms':>10}{'fwd TF/s':>10}{'f+b ms':>10}{'f+b TF/s':>10}", flush=True)

    results = []
    for head_dim in args.head_dims:
        for mode in args.modes:
            case = build_case(args, head_dim, mode, device, gen)
            case_id = f"{mode}-D{head_dim}"
            entry = dict(case=case_id, mode=mode, head_dim=head_dim, batch=args.batch, heads=args.heads,
                         kv_heads=args.kv_heads, seqlen_q=args.seqlen_q, max_seqlen_k=case["len_k"],
                         kv_lens=case["kv_lens"].tolist(), tokens_per_image=case["tokens"],
                         visible_pairs=case["visible_pairs"], backends={})
            for name in names:
                if name == "sdpa_flash" and mode != "full":
                    res = dict(skipped="dense kernel: runs in the full case only")
                else:
                    try:
                        res = run_backend(name, case, device)
                    except Exception as e:  # recorded, and the other backends and cases still run; exit 1 at the end
                        res = dict(error=f"{type(e).__name__}: {e}"[:300])
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                entry["backends"][name] = res
                print_row(case_id, name, res)
            for name, why in skipped.items():
                entry["backends"][name] = dict(skipped=why)
                print_row(case_id, name, entry["backends"][name])
            results.append(entry)
            headline = write_results(args, device, results)

    print(f"wrote {args.out}")
    print(json.dumps(headline))
    if headline["failed"]:  # a crashed backend must fail the run (gpu_check.sh reads the exit status)
        print(f"FAILED: {len(headline['failed'])} backend run(s) raised: {', '.join(headline['failed'])} "
              f"(errors in {args.out})", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
