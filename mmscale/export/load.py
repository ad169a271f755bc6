"""Loading an export back: the model its config.yaml builds (no DeepSpeed, no process group), its weights read
tensor by tensor from the safetensors, and, for `--adapters separate`, the adapters in `adapter/` put back on it
as the run's lora callback put them (peft)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from mmscale.export.adapter import adapter_key
from mmscale.export.layout import ADAPTER_DIR, CONFIG_JSON, CONFIG_YAML, FORMAT, FORMAT_VERSION
from mmscale.export.shards import as_dtype, tied_groups
from mmscale.training import run_paths
from mmscale.training.readers import SafetensorsReader

if TYPE_CHECKING:
    import torch


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_exported(directory: str | Path, dtype: Any = None, adapters: bool = True,
                  task: str | None = None) -> tuple[Any, Any, Any]:
    """(model, tokenizer, cfg) of an exported folder: the model built from its config.yaml (no DeepSpeed, no process
    group) in `dtype` (default: the export's), its weights loaded tensor by tensor from the safetensors (one file or
    shards), in eval mode. An export with separate adapters gets them applied (peft needed) unless
    `adapters=False`. `cfg` is the exported config with data.tokenizer pointing into the folder."""
    import torch
    import yaml

    from mmscale.data import load_tokenizer
    from mmscale.job.build import build_as_trained
    from mmscale.job.preflight import config_from_dict

    d = Path(directory)
    try:
        info = json.loads((d / CONFIG_JSON).read_text())
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{d} is not an mmscale export: no readable {CONFIG_JSON} ({e}); make one with "
                                f"launchers/export.py --run RUN --out {d}") from e
    if info.get("format") != FORMAT or int(info.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{d / CONFIG_JSON}: format {info.get('format')!r} v{info.get('format_version')}; this "
                         f"mmscale reads {FORMAT!r} up to v{FORMAT_VERSION}")
    # relative paths against this folder where it is now (an export from before: as they were)
    cfg = config_from_dict(run_paths.resolve_config(yaml.safe_load((d / CONFIG_YAML).read_text()), d, legacy=False),
                           check_paths=False, recorded=True)
    tok_path = d / info["tokenizer"]
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(tok_path)))
    tokenizer = load_tokenizer(tok_path)
    dt = as_dtype(dtype or info["dtype"])
    with _default_dtype(dt):
        model = build_as_trained(cfg, int(info["vocab_size"]))
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dt:
            p.data = p.data.to(dt)
    reader = SafetensorsReader(d)
    state = model.state_dict(keep_vars=True)
    tied = {**tied_groups(state), **info.get("tied_weights", {})}
    missing = [n for n in state if n not in reader and n not in tied]
    unexpected = [n for n in reader.names if n not in state]
    if missing or unexpected:
        raise ValueError(f"{d}: its weights do not fit the model its config.yaml builds: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name in reader.names:
            state[name].copy_(reader.read(name))
    del reader
    ad = info.get("adapters") or {}
    if adapters and ad.get("mode") == "separate" and ad.get("method") == "task_adapters":
        if task is None:
            raise ValueError(f"{d} holds one adapter per task ({', '.join(ad.get('tasks') or [])}): give the task "
                             f"(--task NAME, load_exported(..., task=NAME))")
        from mmscale.export.adapter import apply_task_adapter

        apply_task_adapter(model, cfg, ad, d / ad.get("path", ADAPTER_DIR), task, dt)
    elif task is not None:
        raise ValueError(f"--task {task}: {d} has no per-task adapters (a task_adapters run exported with "
                         f"--adapters separate has)")
    elif adapters and ad.get("mode") == "separate":
        _apply_adapters(model, d / ad.get("path", ADAPTER_DIR), ad, dt)
    return model.eval(), tokenizer, cfg


def _apply_adapters(model: Any, path: Path, ad: dict[str, Any], dtype: torch.dtype) -> None:
    """The adapters of a separate export onto its base model, as the run's lora callback put them (peft)."""
    import torch
    from safetensors.torch import load_file

    from mmscale.callbacks import CALLBACKS

    method = ad.get("method", "lora")
    method = "lora" if method == "qlora" else method  # (the base is plain now: dequantized)
    args = {k: v for k, v in (ad.get("args") or {}).items()
            if k in ("r", "alpha", "dropout", "target_modules", "feedforward_modules", "components")}
    CALLBACKS[method](**args).on_model_built(model)
    saved = load_file(path / "adapter_model.safetensors")
    params = {n: p for n, p in model.named_parameters() if "lora_" in n or "ia3_l" in n}
    keys = {n: adapter_key(n) for n in params}
    missing = [k for k in keys.values() if k not in saved]
    if missing or len(saved) != len(keys):
        raise ValueError(f"{path}: its adapters do not fit the model: missing {missing[:5]}, "
                         f"unexpected {sorted(set(saved) - set(keys.values()))[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            p.data = saved[keys[name]].to(dtype)
