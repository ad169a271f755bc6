"""The README's demo job, end to end: 2 ranks, ZeRO-3, embedded defaults, cut to its first 200 steps (the colours
are read from the image by then: 0.645 nats against 3.692 with shuffled images; colours and shapes 1.020 against
2.544). Loss falls, the model uses the image."""

from __future__ import annotations

import json
import math

import pytest

from mmscale.training.metrics import read_metrics
from test_training import ROOT, launch


@pytest.mark.slow
def test_demo_learns_to_use_the_image(tmp_path):
    out = tmp_path / "demo"
    launch(ROOT / "launchers/train.py", ["--config", "configs/demo.yaml", f"output_dir={out}", "train.max_steps=200",
                                         "logging.progress_bar=false"], nprocs=2, timeout=850)
    records = read_metrics(out / "metrics.jsonl")
    train = [r["loss"] for r in records if "loss" in r]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert train[-1] < 0.5 * train[0] and val[-1] < val[0]

    result = tmp_path / "image_use.json"
    launch(ROOT / "mmscale/evaluation/image_use.py", ["--run", str(out), "--out", str(result)], nprocs=1)
    r = json.loads(result.read_text())
    # A model blind to the image cannot beat chance (ln 6 nats for a colour); with its image it must, clearly.
    colours = r["colours"]
    assert colours["loss_true_images"] < 0.5 * math.log(6), colours
    assert colours["loss_shuffled_images"] > 3 * colours["loss_true_images"], colours
    both = r["colours_and_shapes"]
    assert both["loss_shuffled_images"] > 2 * both["loss_true_images"], both
