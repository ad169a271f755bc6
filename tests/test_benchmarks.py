"""The benchmark scripts run end to end (tiny shapes on CPU): a GPU session should not find them broken.

The figures they print here are meaningless; only the output contract is checked: a table, a JSON file, the
headline as one JSON object on the last stdout line, and an exit status that fails when a backend crashed (also
through gpu_check.sh, run here with a fake python and nvidia-smi).

Every script in benchmarks/ and launchers/ is found by globbing (a new one is covered without editing this file;
helper modules are listed in NOT_SCRIPTS): each answers --help, and each benchmark keeps the smoke contract of
benchmarks/smoke.py (--smoke, --out; a smoke run never writes into the repository). Fast tier: --help of all, the
refusal of a smoke --out inside benchmarks/results/, and the CPU-only benchmarks at --smoke. Slow tier: the
benchmarks that start DeepSpeed jobs, at --smoke (measured on the 2-core dev machine, shared: peft_memory ~50-80 s,
train_step ~30-45 s, continual_digits with two methods ~50-110 s, continual_captions ~25-35 s).
"""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Python files of benchmarks/ and launchers/ that are modules the scripts import, not scripts: no --help, no smoke.
NOT_SCRIPTS = {
    "benchmarks/machine.py": "what the benchmarks record about the machine (CPU model, native bf16)",
    "benchmarks/smoke.py": "the smoke contract's flags and where a benchmark writes",
}
BENCHMARKS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "benchmarks").glob("*.py")
                    if p.relative_to(REPO).as_posix() not in NOT_SCRIPTS)
LAUNCHERS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "launchers").glob("*.py")
                   if p.relative_to(REPO).as_posix() not in NOT_SCRIPTS)
SHELL_SCRIPTS = sorted(p.relative_to(REPO).as_posix() for folder in ("benchmarks", "launchers")
                       for p in (REPO / folder).rglob("*.sh"))


def _headline(stdout: str, name: str, last_line: bool = True) -> dict:
    """The headline of a smoke run: the last stdout line (under the deepspeed launcher, which prints after the ranks
    exit, the one line that starts with `{"benchmark": "<name>"`)."""
    lines = stdout.strip().splitlines()
    if last_line:
        headline = json.loads(lines[-1])
    else:
        mine = [x for x in lines if x.startswith(f'{{"benchmark": "{name}"')]
        assert len(mine) == 1, stdout[-3000:]
        headline = json.loads(mine[0])
    assert headline["benchmark"] == name and headline["smoke"] is True, headline
    return headline


def _check_payload(path: Path, headline: dict) -> dict:
    """The JSON file holds the headline: at its top level or as its "headline"."""
    assert path.is_file(), f"{path} was not written"
    payload = json.loads(path.read_text())
    doc = payload.get("headline", payload)
    assert {k: doc.get(k) for k in headline} == headline, (doc, headline)
    return payload


def test_not_scripts_are_modules_and_the_rest_scripts():
    """The exclusion list stays true: what it names exists and runs nothing as a script; every other file runs."""
    for path in NOT_SCRIPTS:
        text = (REPO / path).read_text()
        assert "__main__" not in text, f"{path} has a main block: a script, remove it from NOT_SCRIPTS"
    for path in BENCHMARKS + LAUNCHERS:
        assert 'if __name__ == "__main__":' in (REPO / path).read_text(), (
            f"{path} is no script: add it to NOT_SCRIPTS with what it is")
    assert "benchmarks/xattn_kernels.py" in BENCHMARKS and "launchers/train.py" in LAUNCHERS
    assert {"benchmarks/gpu_check.sh", "launchers/slurm/submit.sh"} <= set(SHELL_SCRIPTS)


@pytest.mark.parametrize("script", BENCHMARKS + LAUNCHERS + SHELL_SCRIPTS)
def test_help(script):
    """`--help` from the repository root, in a fresh process: exit 0 and a usage; a benchmark names its smoke
    contract's flags."""
    cmd = ["bash", script, "--help"] if script.endswith(".sh") else [sys.executable, script, "--help"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "usage:" in res.stdout.lower(), res.stdout[-3000:]
    if script in BENCHMARKS:
        assert "--smoke" in res.stdout and "--out" in res.stdout, res.stdout[-3000:]


@pytest.mark.parametrize("script", BENCHMARKS)
def test_smoke_refuses_to_write_into_the_committed_results(script, tmp_path):
    """A smoke run's figures mean nothing: an --out in benchmarks/results/ is refused before anything runs. Run from
    another folder, so every script is also shown to import its neighbours wherever it starts."""
    out = REPO / "benchmarks" / "results" / "smoke-refused.json"
    res = subprocess.run([sys.executable, str(REPO / script), "--smoke", "--out", str(out)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stdout[-3000:] + res.stderr[-3000:]
    assert "committed results" in res.stderr, res.stderr[-3000:]
    assert not out.exists()


def test_kernel_host_overhead_smoke_writes_outside_the_repository(tmp_path):
    """`--smoke` without --out, started from another folder: the JSON goes to a new temporary folder named on
    stderr (here under TMPDIR=tmp_path), benchmarks/results/ is untouched, and the contract holds."""
    results = REPO / "benchmarks" / "results"
    before = {p.name: p.stat().st_mtime_ns for p in results.iterdir()}
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernel_host_overhead.py"), "--smoke"],
                         cwd=tmp_path, env=dict(os.environ, TMPDIR=str(tmp_path)), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    headline = _headline(res.stdout, "kernel_host_overhead")
    written = list(tmp_path.glob("mmscale-smoke-kernel_host_overhead-*/kernel_host_overhead.json"))
    assert len(written) == 1 and str(written[0].parent) in res.stderr, res.stderr[-3000:]
    payload = _check_payload(written[0], headline)
    assert set(payload["results"]) == {"eager fwd (no_grad)", "eager fwd+bwd", "custom op fwd (no_grad)",
                                       "custom op fwd+bwd"}
    assert "us/call (median)" in res.stdout  # the table
    assert {p.name: p.stat().st_mtime_ns for p in results.iterdir()} == before


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
    """Full fine-tuning, LoRA (with the cross-attention and resampler in full, and through LoRA too) and QLoRA
    through 2 ZeRO-3 ranks in one job (about 80 s): the headline and the file
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
    for key in ("qlora_base_bytes_ratio", "trainable_state_ratio", "trainable_state_ratio_full_xattn",
                "qlora_over_lora_loss", "cpu_model", "steps",
                "targets_met"):
        assert key in headline, key
    assert headline["steps"] == 3 and headline["smoke"] is True and headline["world_size"] == 2
    payload = json.loads(out.read_text())
    assert {k: payload[k] for k in headline} == headline
    v = payload["variants"]
    assert all(len(v[m]["per_rank"]) == 2 for m in ("full", "lora_full_xattn", "lora", "qlora"))
    for rank in range(2):
        full, lora, qlora = (v[m]["per_rank"][rank] for m in ("full", "lora", "qlora"))
        # LoRA on the cross-attention and the resampler too: less trains than with them in full
        assert lora["trainable_state"] < v["lora_full_xattn"]["per_rank"][rank]["trainable_state"]
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


# (script, ranks, extra arguments): the benchmarks that start DeepSpeed jobs. The continual ones launch their own
# 2-rank jobs; continual_digits runs task_adapters (read from two places: R, and the gate's figures in the metrics)
# and joint (per-class accuracy from the metrics); continual_captions runs replay_distill.
DEEPSPEED_SMOKES = {
    "train_step": (2, []),
    "continual_digits": (1, ["--methods", "task_adapters", "joint"]),
    "continual_captions": (1, []),
    "contrastive": (1, []),
    "text_only": (1, []),
}


def test_every_benchmark_has_a_smoke_test():
    """A new benchmark needs a smoke run here (or in a test of its own above)."""
    covered = {*DEEPSPEED_SMOKES, "media", "peft_memory", "xattn_kernels", "data_throughput", "kernel_host_overhead"}
    assert {Path(p).stem for p in BENCHMARKS} == covered


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(DEEPSPEED_SMOKES))
def test_deepspeed_benchmark_smoke(name, tmp_path):
    """`--smoke --out --work-dir` in tmp_path: the table, the JSON and the headline agree, and the run's data and
    runs stay in the work dir."""
    from test_training import launch

    nprocs, extra = DEEPSPEED_SMOKES[name]
    out, work = tmp_path / f"{name}.json", tmp_path / "work"
    t0 = time.perf_counter()
    res = launch(REPO / "benchmarks" / f"{name}.py", ["--smoke", "--out", str(out), "--work-dir", str(work), *extra],
                 nprocs=nprocs, timeout=600)
    print(f"{name} --smoke: {time.perf_counter() - t0:.0f} s")
    headline = _headline(res.stdout, name, last_line=nprocs == 1)
    payload = _check_payload(out, headline)
    assert work.is_dir() and any(work.iterdir())
    if name == "train_step":
        assert "mmscale samples/s" in res.stdout and headline["ratio_mmscale_over_bare"] > 0
        assert payload["setup"]["world_size"] == 2 and payload["setup"]["preset"] == "tiny"
    elif name == "continual_digits":
        assert set(payload["summary"]) == {"task_adapters", "joint"} and out.with_suffix(".png").is_file()
        assert 0 <= headline["accuracy_joint"] <= 1 and 0 <= headline["accuracy_task_adapters"] <= 1
        assert len(payload["summary"]["task_adapters"]["runs"][0]["matrix"]) == 2  # the smoke's two tasks
        assert headline["forgetting_task_adapters"] == 0.0  # a finished task's module never changes
        assert 0 <= headline["gate_accuracy_task_adapters"] <= 1 and headline["params_per_task"] > 0
        assert "final avg accuracy" in res.stdout and "expert gate" in res.stdout
    elif name == "contrastive":
        assert headline["gathered_vs_single_max_rel_diff"] < 1e-5, headline
        assert payload["demo"]["num_pairs"] == 64 and payload["digits"]["distinct_captions"] == 10
        assert all(0 <= headline[k] <= 1 for k in ("i2t_recall_at_1", "t2i_recall_at_5", "digits_i2t_recall_at_1"))
        assert "image->text R@1" in res.stdout
    elif name == "text_only":
        assert set(payload["runs"]) == {"with", "without"} and headline["steps"] == 4
        assert headline["heldout_text_loss_with"] > 0 and headline["heldout_text_loss_without"] > 0
        assert "held-out text loss" in res.stdout
    else:
        assert set(payload["results"]) == {"replay_distill"}
        assert "shapes after counts" in res.stdout and headline["loss_shapes_after_counts_replay_distill"] > 0
