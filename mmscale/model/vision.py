"""Vision towers: any Hugging Face image encoder behind one `encode_images` call.

    tower = build_vision_tower(VisionConfig(type="clip", config={"hidden_size": 32, ...}))
    feats = tower.encode_images(pixel_values)  # (N, 3, H, W) -> (N, P, Dv)

The features are the tower's last hidden state, every token kept (CLIP and DINOv2 keep their CLS token;
SigLIP has none). Pooling heads are not built, since nothing reads them.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    PretrainedConfig,
    PreTrainedModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from mmscale.config import VisionConfig

# type -> (config class, model class, config overrides that drop modules whose output is never read)
_TOWERS: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel], dict]] = {
    "clip": (CLIPVisionConfig, CLIPVisionModel, {}),
    "siglip": (SiglipVisionConfig, SiglipVisionModel, {"vision_use_head": False}),
    "dinov2": (Dinov2Config, Dinov2Model, {}),
}


class VisionTower(nn.Module):
    """A Hugging Face vision model with a uniform interface (`encode_images`, `hidden_size`)."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) float -> (N, P, Dv) patch features (last hidden state)."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"encode_images expects (N, 3, H, W) pixels, got shape {tuple(pixel_values.shape)}")
        return self.model(pixel_values=pixel_values).last_hidden_state

    forward = encode_images


def build_vision_tower(cfg: VisionConfig, meta: bool = False) -> VisionTower:
    """Build the `cfg.type` tower from `cfg.config` (random weights) or load it from the local `cfg.path`.

    meta=True builds on the meta device from the config only (read from `cfg.path` if given): for sizing.
    """
    if cfg.type not in _TOWERS:
        raise ValueError(f"vision.type: {cfg.type!r} is not one of {', '.join(map(repr, _TOWERS))}")
    config_cls, model_cls, overrides = _TOWERS[cfg.type]
    if cfg.path and not meta:
        model = model_cls.from_pretrained(cfg.path, **overrides)
    else:
        if cfg.path:
            config = config_cls.from_pretrained(cfg.path, **overrides)
        else:
            config = config_cls(**{**overrides, **cfg.config})
        # `_from_config`, not `model_cls(config)`: under ZeRO-3 sharding at birth, transformers then initialises the
        # weights gathered (plain construction would run its init on empty partitions and keep torch's defaults).
        with torch.device("meta") if meta else contextlib.nullcontext():
            model = model_cls._from_config(config)
    return VisionTower(model)
