"""The benchmark scripts run end to end (tiny shapes on CPU): a GPU session should not find them broken.

The figures they print here are meaningless; only the output contract is checked: a table, a JSON file, and the
headline as one JSON object on the last stdout line.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_kernel_benchmark_smoke(tmp_path):
    out = tmp_path / "kernels.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernels.py"), "--smoke", "--out", str(out)],
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
