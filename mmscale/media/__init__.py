"""Media as registered parts: video and audio beside the images every model has (see mmscale.media.base).

    media:                          # none given = images alone
      video: {max_items: 1, frames: 8}
      audio: {max_items: 1, seconds: 1.0, sample_rate: 16000, encoder: conv}

Adding a medium is one file that subclasses `Medium` and registers it (`@register_medium`), imported below; the
trainer and the config schema do not change.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mmscale.media.base import (MEDIA, Medium, MediumSection, bind_media, media_input_keys,
                                media_problems, media_sections, placeholder_id, register_medium)
from mmscale.media import video as _video  # noqa: F401  (registers `video`)
from mmscale.media import audio as _audio  # noqa: F401  (registers `audio`)

__all__ = ["MEDIA", "Medium", "MediumSection", "attach_media", "bind_media", "media_input_keys",
           "media_problems", "media_sections", "placeholder_id", "register_medium"]


def attach_media(model: nn.Module, cfg: Any) -> nn.Module:
    """`model.media` built for the JobConfig `cfg`: each configured medium's encoder (none configured: empty, and
    the model is the images-only one); returns the model. The one way encoders are attached (mmscale.job.build's
    recipe calls it, under zero.Init when the engine builds)."""
    sections, problems = media_sections(cfg)
    if problems:
        raise ValueError("; ".join(problems))
    encoders = nn.ModuleDict()
    for name in MEDIA:  # registration order: the parameter order is the same in every process
        if name in sections:
            enc = MEDIA[name].build_encoder(sections[name], cfg.model, model.media_size)
            train = MEDIA[name].train_encoder(sections[name])
            for pname, p in enc.named_parameters():
                p.requires_grad_(train or pname.startswith("proj."))
            encoders[name] = enc
    model.media = encoders
    return model
