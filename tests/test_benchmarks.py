"""The benchmark scripts run end to end (tiny shapes on CPU): a GPU session should not find them broken.

The figures they print here are meaningless; only the output contract is checked: a table, a JSON file, the
headline as one JSON object on the last stdout line, and an exit status that fails when a backend crashed (also
through gpu_check.sh, run here with a fake python and nvidia-smi).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_kernel_benchmark_smoke(tmp_path):
    out = tmp_path / "kernels.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "xattn_kernels.py"), "--smoke", "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    headline = json.loads(res.stdout.strip().splitlines()[-1])
    assert headline["meaningful"] is False and headline["cases_done"] == 3
    # Triton ran in every case and was compared with SDPA in each, with PyTorch's flash kernel on the dense one.
    assert set(headline["triton_tflops"]) == {"full-D32", "previous-D32", "all-D32"}
    assert "fwd_bwd:triton/sdpa" in headline["ratios"]["previous-D32"]
    assert "fwd:triton/sdpa_flash" in headline["ratios"]["full-D32"]
    payload = json.loads(out.read_text())
    assert payload["headline"] == headline and len(payload["cases"]) == 3
    cases = {c["case"]: c for c in payload["cases"]}
    assert cases["previous-D32"]["backends"]["flex"] == {"skipped": "CUDA only"}
    # Visible pairs: the dense case counts every (query, key) pair, the masked ones fewer.
    full = cases["full-D32"]
    assert full["visible_pairs"] == full["batch"] * full["heads"] * full["seqlen_q"] * full["max_seqlen_k"]
    assert cases["previous-D32"]["visible_pairs"] < cases["all-D32"]["visible_pairs"]


def test_kernel_benchmark_crashing_backend_fails_the_run(tmp_path):
    """A backend that raises is recorded in the JSON, the other backends and cases still run, and the exit status
    is 1 with the failures named: gpu_check.sh must not report success."""
    out = tmp_path / "kernels.json"
    code = textwrap.dedent("""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("bench_kernels", sys.argv[1])
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)

        def crash(case):
            raise RuntimeError("injected failure")

        bench.BACKEND_FACTORIES["sdpa"] = crash
        bench.main(sys.argv[2:])
    """)
    res = subprocess.run([sys.executable, "-c", code, str(REPO / "benchmarks" / "xattn_kernels.py"), "--smoke",
                          "--out", str(out), "--backends", "sdpa_flash", "sdpa", "flex", "--modes", "full", "previous"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert "FAILED" in res.stderr and "full-D32/sdpa, previous-D32/sdpa" in res.stderr, res.stderr[-3000:]
    headline = json.loads(res.stdout.strip().splitlines()[-1])
    assert headline["failed"] == ["full-D32/sdpa", "previous-D32/sdpa"] and headline["cases_done"] == 2
    payload = json.loads(out.read_text())
    full, previous = payload["cases"]
    assert full["backends"]["sdpa"] == {"error": "RuntimeError: injected failure"}
    assert "fwd_ms" in full["backends"]["sdpa_flash"]  # the healthy backend still ran
    # Skips are not failures: flex is CUDA only, sdpa_flash dense only.
    assert previous["backends"]["flex"] == {"skipped": "CUDA only"} and "skipped" in previous["backends"]["sdpa_flash"]


def test_data_throughput_benchmark_quick(tmp_path):
    """Both pipelines at 0, 1 and 2 workers and the three resume positions run on tiny shards (a few seconds); the
    headline (last stdout line) and the file agree, and the resumed batches are the uninterrupted pass's."""
    out = tmp_path / "data_throughput.json"
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "data_throughput.py"), "--quick",
                          "--data-dir", str(tmp_path / "shards"), "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    headline = json.loads(lines[-1])
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["workers", "plain", "samples/s"])
    assert [line.split()[0] for line in lines[header + 1: header + 4]] == ["0", "1", "2"]  # one row per worker count
    for w in (0, 1, 2):
        for key in (f"throughput_ratio_workers_{w}", f"cpu_ratio_workers_{w}", f"mmscale_samples_per_s_workers_{w}",
                    f"plain_samples_per_s_workers_{w}"):
            assert headline[key] > 0, key
    assert headline["resume_ratio_90_over_10"] > 0 and headline["resume_first_batch_s_90"] > 0
    assert headline["resume_exact"] is True
    assert headline["quick"] is True and headline["cpu_model"]
    assert set(headline["targets_met"]) == {"throughput_workers_0", "throughput_workers_1", "throughput_workers_2",
                                            "resume"}
    payload = json.loads(out.read_text())
    assert {k: payload[k] for k in headline} == headline
    assert len(payload["throughput_runs"]) == 3 and len(payload["resume"]["runs"]) == 3
    resume = payload["resume"]
    assert 0 < resume["batches"]["10"] < resume["batches"]["90"] < resume["steps_per_epoch"]
    assert payload["setup"]["cpu_model"] == headline["cpu_model"] and payload["setup"]["image_size"] == 32


FAKE_PYTHON = """#!/usr/bin/env bash
case "$*" in
    *cuda.is_available*) exit "$FAKE_CUDA_RC" ;;
    *test_kernels_gpu.py*) echo "fake GPU tests"; exit "$FAKE_TESTS_RC" ;;
    *benchmarks/xattn_kernels.py*) echo "fake benchmark"; exit "$FAKE_BENCH_RC" ;;
esac
"""


@pytest.mark.parametrize("cuda_rc,tests_rc,bench_rc,want_rc,want_last", [
    (0, 0, 0, 0, "gpu_check: OK"),
    (0, 0, 1, 1, "gpu_check: FAILED: benchmark (exit 1"),
    (0, 1, 124, 1, "gpu_check: FAILED: GPU tests (exit 1, see gpu_tests.log); benchmark (exit 124"),
    (1, 0, 0, 2, None),
], ids=["ok", "benchmark_fails", "both_fail", "no_gpu"])
def test_gpu_check_exit_status(tmp_path, cuda_rc, tests_rc, bench_rc, want_rc, want_last):
    """gpu_check.sh through `timeout ... | tee` with a fake python and nvidia-smi: a failing part's status survives
    the pipe, and the last line says OK or FAILED."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("python", FAKE_PYTHON), ("nvidia-smi", "#!/bin/sh\necho fake-gpu\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(bin_dir / "python"),
               TMPDIR=str(tmp_path), FAKE_CUDA_RC=str(cuda_rc), FAKE_TESTS_RC=str(tests_rc),
               FAKE_BENCH_RC=str(bench_rc))
    res = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == want_rc, res.stdout[-3000:] + res.stderr[-3000:]
    if want_last is None:
        assert "no CUDA device here" in res.stderr
    else:
        assert res.stdout.strip().splitlines()[-1].startswith(want_last), res.stdout[-3000:]


@pytest.mark.slow
def test_peft_memory_benchmark_smoke(tmp_path):
    """Full fine-tuning, LoRA and QLoRA through 2 ZeRO-3 ranks in one job (about 80 s): the headline and the file
    agree, and the byte counts say what the methods are for. Packed 4-bit weights are a quarter of their bf16
    partitions only if ZeRO-3 partitions them; the adapters have Adam state only if the steps ran."""
    import math

    from test_training import launch

    out = tmp_path / "peft_memory.json"
    res = launch(REPO / "benchmarks" / "peft_memory.py", ["--smoke", "--out", str(out)], nprocs=2)
    # the launcher prints its own lines after the ranks exit: the headline is the script's last line
    lines = [x for x in res.stdout.splitlines() if x.startswith('{"benchmark": "peft_memory"')]
    assert len(lines) == 1, res.stdout[-3000:]
    headline = json.loads(lines[0])
    for key in ("qlora_base_bytes_ratio", "trainable_state_ratio", "qlora_over_lora_loss", "cpu_model", "steps",
                "targets_met"):
        assert key in headline, key
    assert headline["steps"] == 3 and headline["smoke"] is True and headline["world_size"] == 2
    payload = json.loads(out.read_text())
    assert {k: payload[k] for k in headline} == headline
    v = payload["variants"]
    assert all(len(v[m]["per_rank"]) == 2 for m in ("full", "lora", "qlora"))
    for rank in range(2):
        full, lora, qlora = (v[m]["per_rank"][rank] for m in ("full", "lora", "qlora"))
        assert lora["trainable_state"] < full["trainable_state"]
        assert lora["params_frozen"] > full["params_frozen"]  # LoRA froze the LM full fine-tuning trains
        assert qlora["params_frozen"] < lora["params_frozen"]  # the same frozen LM, in 4 bits
        assert qlora["trainable_state"] == lora["trainable_state"]  # the same adapters, cross-attention, resampler
        for m in (full, lora, qlora):  # Adam's two fp32 moments exist for every fp32 master element
            assert m["optimizer_master"] > 0 and m["optimizer_moments"] >= 2 * m["optimizer_master"]
            assert m["grads"] == m["params_trainable"]  # bf16 gradient partitions for bf16 parameter partitions
    # per rank, the packed 4-bit weights are a quarter of the same weights' bf16 partitions (half the bytes per
    # weight would mean ZeRO-3 left them whole); the quantization state comes on top
    packed = max(r["quantized_bytes"] - r["quant_state"] for r in v["qlora"]["per_rank"])
    assert packed / payload["base_bf16_bytes_per_rank"] == pytest.approx(0.25, rel=0.01)
    assert 0.25 < headline["qlora_base_bytes_ratio"] < 0.5
    assert 0 < headline["trainable_state_ratio"] < 1
    assert 0.5 < headline["qlora_over_lora_loss"] < 2
    assert all(math.isfinite(x) for x in headline["val_loss"].values())
