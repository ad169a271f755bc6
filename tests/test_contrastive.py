"""The contrastive objective on the real model: gathered negatives equal one process, the text side never sees the
image, the config is checked, a contrastive-only model skips the image-conditioned LM pass, and a short run
learns to retrieve. (The math alone, on toy encoders: tests/test_contrastive_math.py.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _model(objectives: str):
    from mmscale.job.build import model_recipe
    from mmscale.job.preflight import load_config

    cfg = load_config(ROOT / "configs/tiny.yaml", [f"objectives={objectives}", "model.xattn.backend=sdpa"],
                      check_paths=False)
    torch.manual_seed(0)
    return model_recipe(cfg).build(64)


def test_two_ranks_with_gathered_negatives_equal_one_process_on_the_real_model():
    """2 gloo ranks x 8 pairs (negatives all-gathered with their gradient, DeepSpeed's scaling and average) against
    one process x 16, the tiny model in float64: the loss and every parameter's gradient agree to 1e-5 relative;
    without the gather the loss is clearly another (the negatives are then only local)."""
    from contrastive import gather_check  # benchmarks/contrastive.py

    check = gather_check()
    assert check["parameters_compared"] > 20
    assert check["gathered_vs_single_max_rel_diff"] < 1e-5, check
    assert check["local_negatives_loss_rel_diff"] > 1e-2, check


def _batch(n: int = 4, length: int = 8) -> dict[str, torch.Tensor]:
    from contrastive import _global_batch

    return {k: (v.float() if v.is_floating_point() else v)[:n] for k, v in _global_batch(max(n, 16), length).items()}


@torch.no_grad()
def test_the_text_side_never_sees_the_image_and_contrastive_alone_skips_the_conditioned_pass():
    model = _model("{contrastive: {weight: 1}}").eval()
    batch = _batch()
    out = model(**batch)
    assert out.logits is None  # contrastive alone: no image-conditioned LM pass
    terms = out.terms["contrastive"]
    assert terms["image"].shape == terms["text"].shape == (4, 64)
    torch.testing.assert_close(terms["image"].norm(dim=-1), torch.ones(4))
    other = model(**{**batch, "pixel_values": torch.randn_like(batch["pixel_values"])}).terms["contrastive"]
    torch.testing.assert_close(other["text"], terms["text"])  # the text embedding ignores the images ...
    assert not torch.allclose(other["image"], terms["image"])  # ... which the image embedding reads
    both = _model("{captioning: {weight: 1}, contrastive: {weight: 0.5}}").eval()(**batch)
    assert both.logits is not None and set(both.terms) == {"captioning", "contrastive"}
    assert both.terms["captioning"]["loss_sum"] > 0 and both.terms["contrastive"]["loss_sum"] > 0


def test_the_config_is_checked_with_the_objective_and_its_metrics():
    from mmscale.config import ConfigError
    from mmscale.job.preflight import load_config

    tiny = ROOT / "configs/tiny.yaml"
    with pytest.raises(ConfigError) as e:
        load_config(tiny, ["objectives={contrastive: {embed_dim: 0, init_temperature: 5, temprature: 1}}"],
                    check_paths=False)
    text = str(e.value)
    for want in ("objectives.contrastive.temprature: unknown key", "objectives.contrastive: embed_dim: 0",
                 "objectives.contrastive: init_temperature: 5"):
        assert want in text, text
    with pytest.raises(ConfigError, match="'val_i2t_recall_at_1' is reported by the contrastive objective"):
        load_config(tiny, ["train.keep_best=val_i2t_recall_at_1"], check_paths=False)
    cfg = load_config(tiny, ["objectives={contrastive: {weight: 1}}", "train.keep_best=val_i2t_recall_at_1",
                             "train.keep_best_mode=max", "data.synthetic_val_samples=64"], check_paths=False)
    assert cfg.objectives == {"contrastive": {"weight": 1}}


def test_the_shipped_config_trains_contrastive_alone_under_zero3():
    from mmscale.job.preflight import load_config
    from mmscale.objectives import active_objectives

    cfg = load_config(ROOT / "configs/demo-contrastive.yaml", check_paths=False)
    assert list(active_objectives(cfg)) == ["contrastive"] and cfg.deepspeed.zero_stage == 3
    assert cfg.train.eval_batches * cfg.train.micro_batch_size * 2 == cfg.data.synthetic_val_samples == 512


@pytest.mark.slow
def test_a_short_two_rank_zero3_run_learns_to_retrieve(tmp_path):
    """60 steps of the demo-contrastive config on 2 ranks (ZeRO-3, gathered negatives): held-out recall far above
    chance, reported at validation and again by loading the run in one process."""
    from test_training import launch

    from contrastive import retrieval

    res = launch(ROOT / "launchers/train.py", ["--config", str(ROOT / "configs/demo-contrastive.yaml"),
                                               f"output_dir={tmp_path / 'run'}", "train.max_steps=60",
                                               "train.eval_every=0", "train.checkpoint_every=0",
                                               "data.synthetic_train_samples=2000", "data.synthetic_val_samples=128",
                                               "train.eval_batches=4", "data.num_workers=0"], nprocs=2, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_i2t_recall_at_5" in r][-1]
    assert val["val_num_pairs"] == 128 and val["val_i2t_recall_at_5"] > 5 * 5 * val["val_chance_recall_at_1"], val
    assert any("contrastive_loss" in r for r in records) and (tmp_path / "run" / "loss.png").is_file()
    again = retrieval(tmp_path / "run")
    assert again["num_pairs"] == 128
    # the same weights in one process: the same retrieval up to near-ties that rounding may flip
    assert again["i2t_recall_at_5"] == pytest.approx(val["val_i2t_recall_at_5"], abs=0.05)
