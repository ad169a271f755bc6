"""The convolutional vision towers (`resnet`, `convnext`): feature map -> tokens, save/load, the model and its
dry run built around them, training under ZeRO-3. The ViT towers are tested in test_model.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mmscale.objectives import attach_objectives
from mmscale.objectives.captioning import mean_loss
from mmscale.config import VISION_TYPES, ModelConfig, VisionConfig
from mmscale.job.preflight import config_from_dict
from mmscale.model import PRESETS, build_model, build_vision_tower
from mmscale.model.vision import _TOWERS, CONV_TOWERS

# 3 stages: a 4x stem then 1x, 2x, 2x, so a 32 px image gives a 2x2 map (4 tokens) of the last stage's width, 24
CONV_KW = {
    "resnet": dict(embedding_size=8, hidden_sizes=[8, 16, 24], depths=[1, 1, 1], layer_type="basic"),
    "convnext": dict(num_stages=3, hidden_sizes=[8, 16, 24], depths=[1, 1, 1], patch_size=4),
}
WIDTH = 24


def conv_tower(kind: str, **kw):
    torch.manual_seed(0)
    return build_vision_tower(VisionConfig(type=kind, config={**CONV_KW[kind], **kw})).eval()


def test_config_accepts_every_tower_in_the_table():
    assert set(VISION_TYPES) == set(_TOWERS)
    assert CONV_TOWERS <= set(_TOWERS)


@pytest.mark.parametrize("kind", sorted(CONV_TOWERS))
@pytest.mark.parametrize("size", [32, 48])
def test_conv_tower_flattens_its_feature_map_into_tokens(kind, size):
    tower = conv_tower(kind)
    assert tower.conv and tower.hidden_size == WIDTH
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        fmap = tower.model(pixel_values=x).last_hidden_state
        feats = tower.encode_images(x)
    side = size // 16
    assert fmap.shape == (3, WIDTH, side, side)
    assert feats.shape == (3, side * side, WIDTH)
    # token k is cell (k // w, k % w) of the map, row after row
    torch.testing.assert_close(feats[:, 1], fmap[:, :, 0, 1])
    torch.testing.assert_close(feats[:, side], fmap[:, :, 1, 0])


@pytest.mark.parametrize("kind", sorted(CONV_TOWERS))
def test_conv_tower_round_trips_through_save_pretrained(kind, tmp_path):
    tower = conv_tower(kind)
    x = torch.randn(2, 3, 32, 32)
    tower.model.save_pretrained(tmp_path)
    loaded = build_vision_tower(VisionConfig(type=kind, path=str(tmp_path))).eval()
    assert loaded.conv and loaded.hidden_size == WIDTH
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_images(x), tower.encode_images(x))

    meta = build_vision_tower(VisionConfig(type=kind, path=str(tmp_path)), meta=True)
    assert meta.hidden_size == WIDTH and all(p.is_meta for p in meta.parameters())
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in tower.parameters())


def conv_model_cfg(kind: str) -> ModelConfig:
    cfg = PRESETS["tiny"]()
    # gates open: at Flamingo's 0 (tiny's) no gradient reaches the visual side yet
    return dataclasses.replace(cfg, vision=VisionConfig(type=kind, config=CONV_KW[kind]), train_vision=True,
                               xattn=dataclasses.replace(cfg.xattn, gate_init=1.0))


@pytest.mark.parametrize("kind", sorted(CONV_TOWERS))
def test_model_with_conv_tower_trains(kind):
    """The tower's width sizes the resampler and the cross-attention, and the caption loss reaches every weight."""
    torch.manual_seed(0)
    model = attach_objectives(build_model(conv_model_cfg(kind), vocab_size=50)).train()
    assert model.resampler.latents.shape[-1] == WIDTH
    B, L = 2, 8
    batch = dict(
        pixel_values=torch.randn(B, 1, 3, 32, 32),
        image_mask=torch.ones(B, 1, dtype=torch.bool),
        input_ids=torch.randint(0, 50, (B, L)),
        attention_mask=torch.ones(B, L, dtype=torch.int64),
        media_index=torch.zeros(B, L, dtype=torch.int64),
        labels=torch.randint(0, 50, (B, L)),
    )
    mean_loss(model(**batch)).backward()
    # (ConvNeXt's LayerNorm on its pooled output is computed but read by nothing: no gradient)
    unused = {"model.layernorm.weight", "model.layernorm.bias"} if kind == "convnext" else set()
    for name, p in model.vision.named_parameters():
        if name not in unused:
            assert p.grad is not None and p.grad.abs().max() > 0, name
    # a different image changes the logits: the features reach the LM
    with torch.no_grad():
        out = model(**{**batch, "labels": None}).logits
        other = model(**{**batch, "labels": None, "pixel_values": batch["pixel_values"].roll(1, 0)}).logits
    assert not torch.allclose(out, other)


def test_a_frozen_resnet_keeps_its_batchnorm_statistics():
    """Frozen (model.train_vision=false, e.g. a fine-tune on a pretrained tower), the tower stays in eval mode while
    the model trains: BatchNorm neither normalises with batch statistics nor updates its stored ones."""
    cfg = conv_model_cfg("resnet")
    frozen = build_model(dataclasses.replace(cfg, train_vision=False), vocab_size=50).train()
    assert frozen.training and frozen.resampler.training and not frozen.vision.model.training
    stats = {k: v.clone() for k, v in frozen.vision.state_dict().items() if "running" in k}
    x = torch.randn(4, 1, 3, 32, 32) * 3 + 1
    frozen.encode_media(x)
    assert all(torch.equal(v, frozen.vision.state_dict()[k]) for k, v in stats.items())
    with torch.no_grad():  # as in eval: one image's features do not depend on the others in its batch
        torch.testing.assert_close(frozen.vision.encode_images(x[:1, 0]), frozen.vision.encode_images(x[:, 0])[:1])

    trained = build_model(cfg, vocab_size=50).train()
    assert trained.vision.model.training
    trained.encode_media(x)
    assert not all(torch.equal(v, trained.vision.state_dict()[k]) for k, v in stats.items())
    trained.eval()
    assert not trained.vision.model.training


@pytest.mark.parametrize("training", [True, False])
def test_resnet_runs_with_bf16_weights(training):
    """The engine casts parameters to bf16 (train.precision=bf16), not buffers: BatchNorm's fp32 statistics follow."""
    tower = conv_tower("resnet").train(training)
    x = torch.randn(2, 3, 32, 32)
    ref = tower.encode_images(x).detach()
    for p in tower.parameters():
        p.data = p.data.to(torch.bfloat16)
    out = tower.encode_images(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    if not training:  # (training: the statistics moved with the first call)
        torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("kind", sorted(CONV_TOWERS))
def test_dry_run_sizes_a_conv_tower_job(kind):
    from mmscale.job.dry_run import dry_run

    # (ConvNeXt takes the tiny ViT's num_hidden_layers, merged in, for its stage count: see test_conv_stages_must_agree)
    kw = {**CONV_KW[kind], **({"num_hidden_layers": 3} if kind == "convnext" else {})}
    cfg = config_from_dict({"output_dir": "unused", "model": {"preset": "tiny", "vision": {"type": kind, "config": kw},
                                                              "train_vision": True},
                            "data": {"image_size": 48, "synthetic_train_samples": 64}}, check_paths=False)
    # the preset's ViT keys (image_size 32, ...) merge into the tower config: a conv tower ignores image_size
    assert cfg.model.vision.config["image_size"] == 32
    report = dry_run(cfg, world_size=2, vocab_size=50)
    assert report["problems"] == []
    torch.manual_seed(0)
    real = build_model(cfg.model, vocab_size=50)
    assert report["params"] == real.param_counts()
    assert report["params"]["by_component"]["vision"] == sum(p.numel() for p in real.vision.parameters())


def test_vit_towers_still_need_their_image_size():
    from mmscale.config import ConfigError

    with pytest.raises(ConfigError, match="data.image_size"):
        config_from_dict({"output_dir": "x", "model": {"preset": "tiny"},
                          "data": {"image_size": 48, "synthetic_train_samples": 64}}, check_paths=False)
    with pytest.raises(ConfigError, match="model.vision.type"):
        config_from_dict({"output_dir": "x", "model": {"preset": "tiny", "vision": {"type": "vgg"}}},
                         check_paths=False)


@pytest.mark.slow
def test_two_rank_zero3_job_with_a_resnet_tower(tmp_path):
    """The real build: 2 ranks, ZeRO-3 (the tower partitioned at birth), a few steps, a checkpoint; then the run
    loads into one process (consolidated weights) and captions."""
    import json

    from test_training import ROOT, launch

    out = tmp_path / "run"
    vision = ("{type: resnet, config: {embedding_size: 8, hidden_sizes: [8, 16, 24], depths: [1, 1, 1], "
              "layer_type: basic}}")
    launch(ROOT / "launchers/train.py", ["--config", "configs/tiny.yaml", f"output_dir={out}",
                                         f"model.vision={vision}", "model.train_vision=true", "train.max_steps=4",
                                         "train.checkpoint_every=4"], nprocs=2, timeout=600)
    from mmscale.training.metrics import read_metrics

    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 4 and all(map(lambda v: v == v, losses))
    r = launch(ROOT / "launchers/generate.py", ["--model", str(out), "--shards", str(out / "data/val"),
                                                "--limit", "2", "--max-new-tokens", "4"], nprocs=1, timeout=300)
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(lines) == 2 and all("caption" in rec for rec in lines), r.stderr[-2000:]


def test_conv_stages_must_agree():
    """ConvNeXt reads `num_hidden_layers` as its stage count: over the `tiny` preset, whose ViT config has
    num_hidden_layers 2, a 3-stage ConvNeXt would be built with 2 stages; the config says so first."""
    from mmscale.config import ConfigError

    def load(vision: dict) -> None:
        config_from_dict({"output_dir": "x", "model": {"preset": "tiny", "vision": vision},
                          "data": {"synthetic_train_samples": 64}}, check_paths=False)

    with pytest.raises(ConfigError, match=r"model.vision.config.num_hidden_layers: 2 stages, but 3 .*"
                                          r"num_hidden_layers=3"):
        load({"type": "convnext", "config": CONV_KW["convnext"]})
    load({"type": "convnext", "config": {**CONV_KW["convnext"], "num_hidden_layers": 3}})
    with pytest.raises(ConfigError, match=r"hidden_sizes \[8, 16, 24\] and depths \[1, 1\]"):
        load({"type": "resnet", "config": {**CONV_KW["resnet"], "depths": [1, 1]}})
    load({"type": "resnet", "config": CONV_KW["resnet"]})  # the ViT keys merged in are ignored
