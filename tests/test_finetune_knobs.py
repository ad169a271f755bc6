"""The fine-tuning knobs: train only the top N layers of the LM or the vision tower, and dropout in the LM, the
resampler and the cross-attention (on in training, off at evaluation)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmscale.config import ConfigError
from mmscale.job.build import model_recipe
from mmscale.job.preflight import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def _model(*overrides: str):
    cfg = load_config(TINY, ["model.xattn.backend=sdpa", *overrides], check_paths=False)
    torch.manual_seed(0)
    return model_recipe(cfg).build(64)


def _trainable(model, component: str) -> set[str]:
    return {n for n, p in model.component_params()[component] if p.requires_grad}


def test_lm_top_layers_train_the_top_layers_and_what_sits_above_them():
    full = _model("model.train_lm=true")
    layers = full.lm.config.num_hidden_layers
    top = _model("model.train_lm=true", "model.lm.train_top_layers=1")
    want = {n for n, _ in full.component_params()["lm"]
            if n.startswith(f"lm.model.layers.{layers - 1}.") or n in ("lm.model.norm.weight", "lm.lm_head.weight")}
    assert _trainable(top, "lm") == want and want
    assert _trainable(full, "lm") == {n for n, _ in full.component_params()["lm"]}  # 0 = every layer
    # the cross-attention inside the wrapped layers follows model.train_xattn, whatever the LM's top layers
    assert _trainable(top, "xattn") == {n for n, _ in top.component_params()["xattn"]}
    assert not _trainable(_model("model.train_lm=true", "model.lm.train_top_layers=1", "model.train_xattn=false"),
                          "xattn")


def test_vision_top_layers_train_the_top_encoder_layers_and_the_final_norm():
    top = _model("model.train_vision=true", "model.vision.train_top_layers=1")
    layers = top.vision.model.config.num_hidden_layers
    want = {n for n, _ in top.component_params()["vision"]
            if f".encoder.layers.{layers - 1}." in n or ".post_layernorm." in n}
    assert _trainable(top, "vision") == want and want
    assert not any("embeddings" in n or ".encoder.layers.0." in n for n in _trainable(top, "vision"))


def test_top_layers_are_checked_with_the_config():
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["model.lm.train_top_layers=1", "model.vision.train_top_layers=5",
                           "model.train_vision=true", "model.lm.dropout=1.0"], check_paths=False)
    text = str(e.value)
    assert "model.lm.train_top_layers: 1 trains the top layers of a component model.train_lm=false freezes" in text
    assert "model.vision.train_top_layers: 5, but the configured model has 2 layers there" in text
    assert "model.lm.dropout: 1.0 must be in [0, 1)" in text


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 64, (2, 8), generator=g)
    return {"pixel_values": torch.randn(2, 1, 3, 32, 32, generator=g), "image_mask": torch.ones(2, 1, dtype=torch.bool),
            "input_ids": ids, "attention_mask": torch.ones_like(ids), "media_index": torch.zeros_like(ids),
            "labels": ids}


@pytest.mark.parametrize("where", ["model.lm.dropout", "model.resampler.dropout", "model.xattn.dropout"])
def test_dropout_is_on_in_training_and_off_at_evaluation(where):
    model = _model(f"{where}=0.3", "model.xattn.gate_init=1.0")
    batch = _batch()
    with torch.no_grad():
        model.train()
        a, b = model(**batch).logits, model(**batch).logits
        assert not torch.equal(a, b), f"{where}: two training passes agree, dropout is not on"
        model.eval()
        c, d = model(**batch).logits, model(**batch).logits
    torch.testing.assert_close(c, d, rtol=0, atol=0)
    plain = _model("model.xattn.gate_init=1.0").train()  # the same weights (same seed), no dropout anywhere
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, c)  # dropout off = the model without dropout
        torch.testing.assert_close(plain(**batch).logits, plain(**batch).logits, rtol=0, atol=0)


def test_lm_dropout_reaches_the_hugging_face_config():
    model = _model("model.lm.dropout=0.2")
    assert model.lm.config.attention_dropout == 0.2
    assert _model().lm.config.attention_dropout == 0.0


def test_dry_run_shows_what_trains_per_component():
    from mmscale.job.dry_run import dry_run, format_dry_run

    cfg = load_config(TINY, ["model.train_lm=true", "model.lm.train_top_layers=1"], check_paths=False)
    report = dry_run(cfg, 2, vocab_size=64)
    c = report["params"]
    assert 0 < c["trainable_by_component"]["lm"] < c["by_component"]["lm"]
    assert c["trainable"] == sum(c["trainable_by_component"].values())
    assert f"trainable {c['trainable_by_component']['lm']:>14,}" in format_dry_run(report)
