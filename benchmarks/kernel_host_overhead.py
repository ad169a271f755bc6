"""Host-side cost of one cross_attention call on the Triton path, with the GPU work taken out.

At Flamingo shapes the masked kernels run for tens of microseconds on an H100-class GPU, so what the host spends
per call (argument checks, autograd, index tensors, op dispatch) decides whether the GPU waits. This measures that
cost alone: the kernel launchers (`_forward`, `_backward` in mmscale.kernels.triton_xattn) are replaced by
functions that only allocate their outputs, and the rest of the path runs as in training. Triton's own launch
cost (about 4 launches per forward+backward) comes on top and is not measured here.

    python benchmarks/kernel_host_overhead.py          # CPU is fine: no kernel runs
    python benchmarks/kernel_host_overhead.py --smoke --out /tmp/kernel_host_overhead.json   # checks the script

Rows: the eager path (autograd.Function) and the custom-op path that torch.compile traces, for a forward under
no_grad and a forward+backward. Median of interleaved rounds, microseconds per call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors may enter the Triton path (nothing launches)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # also when imported from elsewhere

import smoke  # noqa: E402  (benchmarks/smoke.py)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=500, help="calls per round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=50, help="calls per path before the rounds")
    smoke.add_smoke_args(p, "kernel_host_overhead")
    args = p.parse_args(argv)
    smoke.check_smoke_paths(p, args)
    if args.smoke:
        args.calls, args.rounds, args.warmup = 20, 2, 5

    import torch  # here, not at the top: --help and a refused argument answer without importing it

    import mmscale.kernels as mk
    from mmscale.kernels import triton_xattn as tx

    def no_kernel_forward(q, k, v, *rest):
        return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)

    def no_kernel_backward(do, q, k, v, *rest):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    tx._forward, tx._backward = no_kernel_forward, no_kernel_backward

    B, Lq, Lk, H, D = 2, 16, 8, 2, 16  # tiny, so the CPU arithmetic left (gradient accumulation) is negligible
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, n, H, D, generator=gen) for n in (Lq, Lk, Lk))
    latest = torch.randint(-1, 2, (B, Lq), generator=gen).cummax(1).values
    key_range = mk.build_media_key_range(latest, 4, "previous")
    kv_lens = torch.full((B,), Lk, dtype=torch.int32)
    dout = torch.randn_like(q)
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))

    def eager_fwd():
        with torch.no_grad():
            mk.cross_attention(q, k, v, key_range, kv_lens, backend="triton")

    def eager_fwd_bwd():
        mk.cross_attention(qg, kg, vg, key_range, kv_lens, backend="triton").backward(dout)

    op_args = (key_range.reshape(-1, 2), None, None, None, kv_lens, Lq, Lk, D ** -0.5)

    def op_fwd():
        with torch.no_grad():
            tx._xattn_fwd_op(q.reshape(B * Lq, H, D), k.reshape(B * Lk, H, D), v.reshape(B * Lk, H, D), *op_args)

    def op_fwd_bwd():
        out, _ = tx._xattn_fwd_op(qg.reshape(B * Lq, H, D), kg.reshape(B * Lk, H, D), vg.reshape(B * Lk, H, D),
                                  *op_args)
        out.backward(dout.reshape(B * Lq, H, D))

    cases = {"eager fwd (no_grad)": eager_fwd, "eager fwd+bwd": eager_fwd_bwd,
             "custom op fwd (no_grad)": op_fwd, "custom op fwd+bwd": op_fwd_bwd}
    samples = {name: [] for name in cases}
    for fn in cases.values():  # warm-up
        for _ in range(args.warmup):
            fn()
    for _ in range(args.rounds):
        for name, fn in cases.items():
            start = time.perf_counter()
            for _ in range(args.calls):
                fn()
            samples[name].append((time.perf_counter() - start) / args.calls * 1e6)

    print(f"{'path':<26}{'us/call (median)':>18}{'min':>8}{'max':>8}")
    result = {}
    for name, xs in samples.items():
        med = statistics.median(xs)
        result[name] = dict(median_us=round(med, 1), min_us=round(min(xs), 1), max_us=round(max(xs), 1))
        print(f"{name:<26}{med:>18.1f}{min(xs):>8.1f}{max(xs):>8.1f}")
    headline = dict(benchmark="kernel_host_overhead", date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
                    device="cpu (host path only)", smoke=args.smoke, **{k: v["median_us"] for k, v in result.items()})
    out = smoke.out_path(args, "kernel_host_overhead")
    args.out = str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(headline=headline, config=vars(args), results=result), indent=2) + "\n")
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
