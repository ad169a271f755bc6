"""`launchers/evaluate.py`: a run's metrics on test shards and a before/after report against a base."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from mmscale.evaluation.evaluate import markdown, split_checkpoint
from test_training import ROOT, launch


def test_checkpoint_argument_is_a_run_or_a_checkpoint_in_one(tmp_path):
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_00000010"
    ckpt.mkdir(parents=True)
    (run / "config.yaml").write_text("output_dir: x\n")
    (ckpt / "manifest.json").write_text("{}")
    assert split_checkpoint(run) == (run, None)
    assert split_checkpoint(ckpt) == (run, ckpt)
    with pytest.raises(FileNotFoundError, match="neither a run directory .* give the run's output_dir"):
        split_checkpoint(tmp_path)


def test_markdown_has_a_column_per_model():
    metrics = {"loss": 1.0, "perplexity": math.e, "token_accuracy": 0.5, "tokens": 10,
               "image_use": {"loss_true_images": 1.0, "loss_shuffled_images": 2.0},
               "words": {"colour": {"loss": 0.1, "accuracy": 0.9, "accuracy_shuffled_images": 0.2, "tokens": 4,
                                    "loss_shuffled_images": 3.0}}}
    result = {"shards": "s", "samples": 8, "batches": 2,
              "models": {"base": {"checkpoint": "a", **metrics, "loss": 2.0}, "model": {"checkpoint": "b", **metrics}}}
    text = markdown(result)
    assert "| metric | base (a) | model (b) |" in text
    assert "| loss (nats/token) | 2.0000 | 1.0000 |" in text
    assert "| colour words: accuracy | 0.9000 | 0.9000 |" in text


@pytest.mark.slow
def test_evaluate_compares_a_run_with_its_earlier_checkpoint(tmp_path):
    """A tiny run on the synthetic shapes data (one process, 30 steps, checkpoints at 5 and 30): the report of the
    final model against step 5 has both columns, perplexity = exp(loss), colour and shape word classes, and the
    trained model beats its earlier self on the same batches."""
    out = tmp_path / "run"
    launch(ROOT / "launchers/train.py", ["--config", "configs/tiny.yaml", f"output_dir={out}", "train.max_steps=30",
                                         "train.checkpoint_every=5", "train.keep_checkpoints=10", "train.lr=3e-3"],
           nprocs=1)
    early = out / "checkpoints" / "step_00000005"
    r = subprocess.run([sys.executable, str(ROOT / "launchers/evaluate.py"), "--checkpoint", str(out), "--compare",
                        str(early), "--batches", "4", "--out", str(tmp_path / "eval")], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert json.loads(r.stdout.strip().splitlines()[-1]) == result
    base, model = result["models"]["base"], result["models"]["model"]
    assert base["checkpoint"] == str(early) and model["checkpoint"] == str(out)
    for m in (base, model):
        assert m["perplexity"] == pytest.approx(math.exp(m["loss"]), rel=1e-9)
        assert set(m["words"]) == {"colour", "shape"} and 0 <= m["token_accuracy"] <= 1
    assert model["loss"] < base["loss"] - 0.1, (model["loss"], base["loss"])
    assert model["token_accuracy"] > base["token_accuracy"]
    md = (tmp_path / "eval" / "report.md").read_text()
    assert f"| metric | base ({early}) | model ({out}) |" in md
    bad = subprocess.run([sys.executable, str(ROOT / "launchers/evaluate.py"), "--checkpoint", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "neither a run directory" in bad.stderr
