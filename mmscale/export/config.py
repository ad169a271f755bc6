"""The exported config: the run's config rewritten to describe the exported model and nothing outside it
(model.init_from cleared, a model.lm.path Llama / model.vision.path tower turned into its architecture, lora / dora /
qlora / ia3 taken out of the callbacks and `lora` train modes made `full`, data.tokenizer the copy in the folder), with
every change listed."""

from __future__ import annotations

import dataclasses
from typing import Any

from mmscale.export.layout import TASK_METHOD, ADAPTER_DIR, ADAPTER_METHODS

_HF_CONFIG_NOISE = ("architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype",
                    "quantization_config", "model_type", "_attn_implementation_autoset")


def _config_dict(config: Any) -> dict[str, Any]:
    return {k: v for k, v in config.to_diff_dict().items() if k not in _HF_CONFIG_NOISE}


def export_config(cfg: Any, tokenizer_name: str, vocab_size: int) -> tuple[Any, list[str]]:
    """The run's config made to describe the exported model and nothing outside it. Returns (config, changes)."""
    from mmscale.config import CallbackSpec

    m, changes = cfg.model, []
    model = dataclasses.replace(m, init_from="")
    if m.init_from:
        changes.append(f"model.init_from: {m.init_from!r} -> '' (the weights it gave are in this folder)")
    if m.lm.path:
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(m.lm.path)
        if hf.model_type == "llama":
            config = {**_config_dict(hf), "vocab_size": vocab_size}
            model = dataclasses.replace(model, lm=dataclasses.replace(m.lm, path="", config=config))
            changes.append(f"model.lm.path: {m.lm.path!r} -> '' (its architecture in model.lm.config; its weights "
                           f"in this folder)")
        else:
            changes.append(f"model.lm.path: {m.lm.path!r} kept: a {hf.model_type} LM is rebuilt from it (its "
                           f"weights are then replaced by this folder's)")
    if m.vision.path:
        from mmscale.model.vision import _TOWERS

        config_cls, _, overrides = _TOWERS[m.vision.type]
        config = _config_dict(config_cls.from_pretrained(m.vision.path, **overrides))
        model = dataclasses.replace(model, vision=dataclasses.replace(m.vision, path="", config=config))
        changes.append(f"model.vision.path: {m.vision.path!r} -> '' (its architecture in model.vision.config; its "
                       f"weights in this folder)")
    callbacks = [CallbackSpec(**dataclasses.asdict(c)) for c in cfg.callbacks
                 if c.name not in (*ADAPTER_METHODS, TASK_METHOD)]
    for c in cfg.callbacks:
        if c.name in ADAPTER_METHODS:
            changes.append(f"callbacks: {c.name} taken out (the adapters are merged into the weights, or in "
                           f"{ADAPTER_DIR}/)")
        elif c.name == TASK_METHOD:
            changes.append(f"callbacks: {c.name} taken out (one task's adapter is merged into the weights, its heads "
                           f"are the model's: config.json's adapters.task)")
    for name in ("train_xattn", "train_resampler"):
        if getattr(m, name) == "lora":  # its adapters are merged now: a plain component, trained in full
            model = dataclasses.replace(model, **{name: "full"})
            changes.append(f"model.{name}: 'lora' -> 'full' (its adapters are merged into the weights)")
    data = dataclasses.replace(cfg.data, tokenizer=tokenizer_name)
    changes.append(f"data.tokenizer: {cfg.data.tokenizer!r} -> {tokenizer_name!r} (the copy in this folder)")
    return dataclasses.replace(cfg, model=model, callbacks=callbacks, data=data), changes
