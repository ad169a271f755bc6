"""benchmarks/media.py runs end to end at its smallest (`--quick`: 64 clips and 3 steps per task): every task's
data is made, trained on and scored, the headline is the last stdout line, and the results land at `--out`.
The figures mean nothing here (~1 min on 2 CPU cores; speech is skipped, and says so, without espeak-ng)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KEYS = ("video_direction_accuracy", "video_shuffled_over_ordered_loss", "audio_count_accuracy",
        "audio_pitch_accuracy", "speech_digit_accuracy_unseen_voices")


@pytest.mark.slow
def test_media_benchmark_quick(tmp_path):
    out = tmp_path / "media.json"
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "media.py"), "--quick", "--out", str(out),
                          "--work-dir", str(tmp_path / "work")], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    headline = json.loads(res.stdout.strip().splitlines()[-1])
    assert headline["benchmark"] == "media" and headline["smoke"] is True, headline
    assert set(KEYS) <= set(headline) and headline["cpu"], headline
    espeak = shutil.which("espeak-ng") is not None
    trained = {"video", "audio", *(["speech"] if espeak else [])}
    assert set(headline["train_seconds"]) == trained, headline
    for key in KEYS:
        value = headline[key]
        if key.startswith("speech") and not espeak:
            assert value is None and "espeak-ng" in headline["skipped"]["speech"], headline
        elif key.endswith("_loss"):
            assert value > 0, (key, value)
        else:
            assert 0.0 <= value <= 1.0, (key, value)
    assert "direction word accuracy" in res.stdout  # the table
    payload = json.loads(out.read_text())
    assert payload["headline"] == headline
    assert {"date", "machine", "config", "tasks"} <= set(payload), sorted(payload)
    assert payload["machine"]["cpu"] == headline["cpu"]
    for task in trained:
        scores = payload["tasks"][task]["scores"]
        assert scores["samples"] == payload["tasks"][task]["data"]["val_samples"], scores
    if espeak:  # the held-out voices are none of the training ones
        data = payload["tasks"]["speech"]["data"]
        assert data["val_voices"] and not set(data["val_voices"]) & set(data["train_voices"]), data
