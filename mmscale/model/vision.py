"""Vision towers: any Hugging Face image encoder behind one `encode_images` call.

    tower = build_vision_tower(VisionConfig(type="clip", config={"hidden_size": 32, ...}))
    feats = tower.encode_images(pixel_values)  # (N, 3, H, W) -> (N, P, Dv)

The features are the tower's last hidden state, every token kept (CLIP and DINOv2 keep their CLS token;
SigLIP has none). Pooling heads are not built, since nothing reads them.

Convolutional towers (`resnet`: ResNetModel, `convnext`: ConvNextModel) end in a feature map (N, C, h, w), with
their default 4x stem at 1/32 of the image per side after 4 stages (1/16 after 3, ...): each of its h*w cells
becomes a token, (N, h*w, C), row after row. Their width (`hidden_size`) is the last stage's, `hidden_sizes[-1]`,
and they take any image size. Their pooled outputs (ResNet's average pool, ConvNeXt's pooled LayerNorm) are
computed by the Hugging Face forward but never read. A frozen conv tower stays in eval mode when the model trains:
ResNet's BatchNorm then normalises with its stored statistics and never updates them. A trained one updates them
per rank (buffers are not reduced across ranks; a checkpoint keeps rank 0's), in bf16 when the weights are.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    ConvNextConfig,
    ConvNextModel,
    Dinov2Config,
    Dinov2Model,
    PretrainedConfig,
    PreTrainedModel,
    ResNetConfig,
    ResNetModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from mmscale.config import VisionConfig

# type -> (config class, model class, config overrides that drop modules whose output is never read)
_TOWERS: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel], dict]] = {
    "clip": (CLIPVisionConfig, CLIPVisionModel, {}),
    "siglip": (SiglipVisionConfig, SiglipVisionModel, {"vision_use_head": False}),
    "dinov2": (Dinov2Config, Dinov2Model, {}),
    "resnet": (ResNetConfig, ResNetModel, {}),
    "convnext": (ConvNextConfig, ConvNextModel, {}),
}
CONV_TOWERS: frozenset[str] = frozenset({"resnet", "convnext"})
"""Tower types whose last hidden state is a feature map (N, C, h, w), flattened to tokens; their width is
`config.hidden_sizes[-1]` and their input size is free."""


class VisionTower(nn.Module):
    """A Hugging Face vision model with a uniform interface (`encode_images`, `hidden_size`)."""

    def __init__(self, model: PreTrainedModel, conv: bool | None = None):
        super().__init__()
        self.model = model
        self.conv = isinstance(model, (ResNetModel, ConvNextModel)) if conv is None else conv
        """Whether the last hidden state is a feature map (N, C, h, w) (flattened to (N, h*w, C) tokens)."""
        self._batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def _match_norm_statistics(self) -> None:
        """BatchNorm's running statistics in its weights' dtype. The engine casts parameters, not buffers, to bf16
        (mmscale.training.engine), and torch's batch_norm refuses bf16 weights with fp32 statistics."""
        for bn in self._batch_norms:
            dtype = bn.weight.dtype if bn.weight is not None else None
            if dtype is not None and bn.running_mean is not None and bn.running_mean.dtype != dtype:
                bn.running_mean = bn.running_mean.to(dtype)
                bn.running_var = bn.running_var.to(dtype)

    def train(self, mode: bool = True) -> VisionTower:
        super().train(mode)
        if mode and self.conv and not any(p.requires_grad for p in self.parameters()):
            self.model.eval()  # frozen: BatchNorm keeps (and uses) the statistics it came with
        return self

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_sizes[-1] if self.conv else self.model.config.hidden_size

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) float -> (N, P, Dv) patch features (last hidden state; a conv tower's map, cell by cell)."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"encode_images expects (N, 3, H, W) pixels, got shape {tuple(pixel_values.shape)}")
        if self._batch_norms:
            self._match_norm_statistics()
        feats = self.model(pixel_values=pixel_values).last_hidden_state
        if self.conv:  # (N, C, h, w) -> (N, h*w, C)
            feats = feats.flatten(2).transpose(1, 2)
        return feats

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
    return VisionTower(model, conv=cfg.type in CONV_TOWERS)
