"""What the benchmarks record about the machine they ran on (CPU figures are quoted with the CPU's name)."""

from __future__ import annotations

import platform


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def native_bf16() -> bool:
    """AVX512-BF16 or AMX: without either, bf16 matmuls on a CPU run emulated (~36x slower than fp32)."""
    try:
        return any(f in open("/proc/cpuinfo").read() for f in ("avx512_bf16", "amx_bf16"))
    except OSError:
        return False
