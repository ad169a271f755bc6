"""Model side of mmscale: vision tower, Perceiver resampler, gated cross-attention, and their assembly.

Single-device PyTorch; distribution is applied from outside (mmscale/training/engine.py).
Names are imported lazily so that `mmscale.model.presets` (read by config.py) does not pull in transformers.
"""

import importlib

_EXPORTS = {
    "BuildOptions": "mmscale.model.multimodal",
    "MultimodalModel": "mmscale.model.multimodal",
    "MultimodalOutput": "mmscale.model.multimodal",
    "apply_freeze_policy": "mmscale.model.multimodal",
    "build_model": "mmscale.model.multimodal",
    "PRESETS": "mmscale.model.presets",
    "register_preset": "mmscale.model.presets",
    "build_vision_tower": "mmscale.model.vision",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mmscale.model' has no attribute {name!r}")
