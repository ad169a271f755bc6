"""What an export says about itself: the provenance recorded in its config.json (`trained_by`: the run, the
checkpoint, its step and metrics, how it was trained) and the README.md written from it."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from mmscale.export.layout import ADAPTER_DIR
from mmscale.training.readers import SAFETENSORS_INDEX

_MERGE = {"lora": "W + B A * alpha / r", "dora": "m / ||W + B A * alpha / r|| per row, times W + B A * alpha / r",
          "ia3": "W scaled by the learned vector, per output row or per input column"}
"""What a merged export folds in, by method (qlora: as lora)."""


def mmscale_version() -> str:
    try:
        from importlib.metadata import version

        return version("mmscale")
    except Exception:  # noqa: BLE001  (not installed as a package)
        return "unknown"


def provenance(cfg: Any, run: Path, ckpt: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """config.json's `trained_by`: the run and checkpoint, the step, how it was trained, the checkpoint's metrics
    and the training loss logged at that step."""
    m, t, d = cfg.model, cfg.train, cfg.data
    last_train = None
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            with contextlib.suppress(ValueError):
                r = json.loads(line)
                if r.get("step") == manifest.get("step") and "loss" in r:
                    last_train = r["loss"]
    return {
        "run": str(run.resolve()),
        "checkpoint": str(ckpt.resolve()),
        "step": manifest.get("step"),
        "max_steps": t.max_steps,
        "world_size": manifest.get("world_size"),
        "zero_stage": cfg.deepspeed.zero_stage,
        "precision": t.precision,
        "preset": m.preset,
        "init_from": m.init_from,
        "lm_path": m.lm.path,
        "vision_path": m.vision.path,
        "callbacks": [{"name": c.name, "args": dict(c.args)} for c in cfg.callbacks],
        "train_shards": d.train_shards,
        "val_shards": d.val_shards,
        "global_batch_size": t.global_batch_size,
        "lr": t.lr,
        "seed": t.seed,
        "metrics": manifest.get("metrics") or {},
        "train_loss_at_step": last_train,
    }


def readme(info: dict[str, Any], out: Path) -> str:
    """The README.md of the export `out` whose config.json is `info`."""
    tb = info["trained_by"]
    metrics = tb["metrics"]
    if metrics:
        rows = "\n".join(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |"
                         for k, v in metrics.items())
        metric_text = (f"Recorded in the checkpoint's manifest at step {tb['step']}:\n\n| metric | value |\n"
                       f"|---|---|\n{rows}\n")
    else:
        metric_text = f"The checkpoint's manifest records no evaluation at step {tb['step']}.\n"
    if tb["train_loss_at_step"] is not None:
        metric_text += f"\nTraining loss logged at step {tb['step']}: {tb['train_loss_at_step']:.6g}.\n"
    callbacks = ", ".join(c["name"] + (f" {c['args']}" if c["args"] else "") for c in tb["callbacks"]) or "none"
    ad = info["adapters"]
    if ad is None:
        adapters = "No LoRA adapters: the weights are the checkpoint's."
    elif ad["mode"] == "merged":
        adapters = (f"The {ad['method']} adapters are merged into the base weights ({_MERGE.get(ad['method'], _MERGE['lora'])}, in fp32"
                    f"{', the 4-bit base dequantized first' if ad['method'] == 'qlora' else ''}): a plain model, peft "
                    f"is not needed to load it.")
    else:
        adapters = (f"The {ad['method']} adapters are in `{ADAPTER_DIR}/` in peft's format (names as in the plain "
                    f"Hugging Face LM); the weights here are the base without them"
                    f"{' (dequantized from 4 bits)' if ad['method'] == 'qlora' else ''}. `load_exported` applies "
                    f"them (peft needed); `load_exported(..., adapters=False)` gives the base alone.")
    files = "\n".join(f"- `{f}`" for f in info["files"])
    if info["weights"] == SAFETENSORS_INDEX:
        files += f"\n- `{SAFETENSORS_INDEX}` (which tensor is in which shard)"
    size = info["total_size"]
    start = f"`{tb['init_from']}`" if tb["init_from"] else "its own initialisation"
    if tb["lm_path"]:
        start += f"; LM from `{tb['lm_path']}`"
    adapter_files = f"- `{ADAPTER_DIR}/`: adapter_config.json, adapter_model.safetensors (peft)" \
        if ad and ad["mode"] == "separate" else ""
    return f"""# {out.name}: an mmscale model

A Flamingo-style multimodal model (vision tower, Perceiver resampler, language model with gated cross-attention)
exported by mmscale from a training run: {info['num_parameters']:,} parameters, {info['dtype']}, {size:,} bytes
of weights in safetensors.

## What trained it

- run: `{tb['run']}`, checkpoint `{Path(tb['checkpoint']).name}` (step {tb['step']} of {tb['max_steps']})
- {tb['world_size']} rank(s), ZeRO stage {tb['zero_stage']}, precision {tb['precision']}, global batch size
  {tb['global_batch_size']}, lr {tb['lr']}, seed {tb['seed']}
- model: preset `{tb['preset'] or '-'}`; started from {start}
- callbacks: {callbacks}
- data: `{tb['train_shards']}` (validation `{tb['val_shards'] or '-'}`), tokenizer `{info['tokenizer']}`
  ({info['tokenizer_vocab_size']} tokens; the model's vocabulary: {info['vocab_size']})

{metric_text}
{adapters}

## Files

- `config.yaml`: the run's config, self-contained (what changed: see `config_changes` in `config.json`)
- `config.json`: format {info['format']} v{info['format_version']}, dtype, vocabulary, provenance
{files}
- `{info['tokenizer']}`: the tokenizer
{adapter_files}

## Load it

```python
from mmscale.export import load_exported

model, tokenizer, cfg = load_exported("{out}")          # no DeepSpeed; dtype={info['dtype']} unless dtype=...
```

Fine-tune it: `deepspeed --num_gpus N launchers/train.py --config ... model.init_from={out}`.

Exported with: `{info['exported']['command'] or 'mmscale.export.export_model'}`
"""
