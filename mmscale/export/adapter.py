"""LoRA (DoRA) and IA3 adapters in peft's own format (`adapter_config.json`, `adapter_model.safetensors`), named as
in the plain Hugging Face LM (mmscale's cross-attention wrappers taken out of the names), so that
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), OUT)` loads them: the `adapter` subcommand
(`export_adapter`), and the `adapter/` folder of `--adapters separate`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mmscale.export.inputs import open_run
from mmscale.export.layout import ExportError

WRAPPER_XATTN = ".xattn."
"""In a name inside the LM: a cross-attention block's (mmscale.model.xattn.XAttnDecoderLayer.xattn)."""


def adapter_settings(cfg: Any) -> Any:
    """The run's `lora` / `dora` / `qlora` / `ia3` callback (its settings, `peft_config()`), or an error saying there
    is none."""
    from mmscale.callbacks import build_callbacks
    from mmscale.callbacks.peft_methods import IA3, LoRA

    found = [cb for cb in build_callbacks(cfg.callbacks) if isinstance(cb, (LoRA, IA3))]
    if not found:
        raise ValueError(f"the run's callbacks ({[c.name for c in cfg.callbacks]}) hold no lora, dora, qlora or "
                         f"ia3: no adapter to export")
    if found[0].components != ["lm"]:
        raise ValueError(f"only adapters on the LM export in peft's format; this run adapts {found[0].components}")
    return found[0]


def not_lm_adapter(model: Any) -> Any:
    """A test of a LoRA layer's name in `model`: true where it is not the LM's own (the cross-attention blocks',
    which sit inside the LM's layers, or the resampler's: model.train_xattn / train_resampler = lora)."""
    inside = {id(m) for block in model.xattn_blocks() for m in block.modules()}
    own = {name for name, m in model.lm.named_modules(prefix="lm") if id(m) not in inside}
    return lambda name: name not in own


def write_adapter(model: Any, method: Any, out: Path, base: str | None, run: str | Path) -> int:
    """The LM adapters of `model` (injected into `model.lm` by `method`, the run's lora / dora / qlora / ia3
    callback: `adapter_settings`) in peft's format in `out`. Returns how many tensors were written."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from mmscale.training.weights import plain_lm_name

    state = get_peft_model_state_dict(model.lm)  # names relative to the LM, the adapter name taken out
    # the LM's own adapters only: the cross-attention blocks' (model.train_xattn = lora) have no place in it
    tensors = {"base_model.model." + plain_lm_name(k): v.detach().float().contiguous() for k, v in state.items()
               if f"{WRAPPER_XATTN}" not in k}
    out.mkdir(parents=True, exist_ok=True)
    method.peft_config(task_type="CAUSAL_LM", base_model_name_or_path=base or None).save_pretrained(out)
    save_file(tensors, out / "adapter_model.safetensors")
    (out / "mmscale_export.json").write_text(json.dumps({"run": str(run), "base": base, "tensors": len(tensors)},
                                                        indent=2))
    return len(tensors)


def export_adapter(run_dir: str | Path, out: str | Path, base_out: str | Path | None = None,
                   checkpoint_dir: str | Path | None = None) -> Path:
    """Write the run's LM adapters to `out` in peft's format; `base_out` also writes the plain base LM (for a run
    that fine-tuned another run). Returns `out`. Raises ExportError naming every problem with the run (a
    ValueError, as is a run without LM adapters)."""
    from mmscale.data import load_tokenizer
    from mmscale.job.runs import build_from_checkpoint
    from mmscale.training.weights import export_base_lm

    problems: list[str] = []
    cfg, ckpt = open_run(Path(run_dir), checkpoint_dir, problems)  # verified; the config recorded with it
    if problems:
        raise ExportError(problems)
    method = adapter_settings(cfg)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    # built as training built it (init_from, the callbacks), then the checkpoint, read tensor by tensor
    model = build_from_checkpoint(cfg, ckpt, tokenizer.vocab_size)
    out = Path(out)
    base = cfg.model.lm.path
    if base_out is not None:
        base = str(export_base_lm(cfg, tokenizer.vocab_size, Path(base_out)))
    write_adapter(model, method, out, base, run_dir)
    return out


def adapter_key(name: str) -> str:
    """The peft-format name (as `write_adapter` writes it) of a LoRA (DoRA, IA3) parameter of the multimodal model:
    `lm.model.layers.0.decoder_layer.self_attn.q_proj.lora_A.default.weight` ->
    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`; DoRA's `...lora_magnitude_vector.default.weight`
    -> `...lora_magnitude_vector`, IA3's `...ia3_l.default` -> `...ia3_l` (as peft names them)."""
    from mmscale.training.weights import plain_lm_name

    inside = re.sub(r"\.lora_magnitude_vector\.default\.weight$", ".lora_magnitude_vector", name.removeprefix("lm."))
    inside = re.sub(r"\.(lora_[A-Za-z_]+|ia3_l)\.default(?=\.|$)", r".\1", inside)
    return "base_model.model." + plain_lm_name(inside)


TASK_PARTS = "mmscale_parts.safetensors"
"""Beside a task's peft adapter (`adapters/<task>/`): what peft's format of the plain LM has no place for, the task's
LoRA on the cross-attention, resampler and vision tower and its heads, named as in the model with one task."""


def write_task_adapters(model: Any, cfg: Any, out: Path) -> int:
    """Every task of a task_adapters run (mmscale.callbacks.task_adapters) in `out/<task>/`: its LM adapter in peft's
    format (`PeftModel.from_pretrained` loads it onto the exported base LM) and the rest in TASK_PARTS
    (`load_exported(..., task=NAME)` puts both back). Returns how many tasks."""
    from safetensors.torch import save_file

    from mmscale.callbacks import CALLBACKS

    spec = next(c for c in cfg.callbacks if c.name == "task_adapters")
    lora = CALLBACKS["task_adapters"](**spec.args).lora  # the adapters' settings
    not_lm = not_lm_adapter(model)
    for i, task in enumerate(t.name for t in cfg.continual.tasks):
        folder = out / task
        folder.mkdir(parents=True, exist_ok=True)
        lm, parts = {}, {}
        for name, p in model.named_parameters():
            if f".task{i}." in name and not not_lm(name.split(".lora_", 1)[0]):
                lm[adapter_key(name.replace(f".task{i}.", ".default."))] = p.detach().float().contiguous()
            elif f".task{i}." in name:
                parts[name.replace(f".task{i}.", ".task0.")] = p.detach().float().contiguous()
            elif f".heads.{i}." in name:
                parts[name.replace(f".heads.{i}.", ".heads.0.")] = p.detach().float().contiguous()
        lora.peft_config(task_type="CAUSAL_LM").save_pretrained(folder)
        save_file(lm, folder / "adapter_model.safetensors")
        save_file(parts, folder / TASK_PARTS)
    return len(cfg.continual.tasks)


def apply_task_adapter(model: Any, cfg: Any, ad: dict[str, Any], folder: Path, task: str, dtype: Any) -> None:
    """One task's module of a separate task_adapters export onto its base `model`: the callback builds the module
    of a one-task sequence (adapter `task0`, one head), then the task's tensors go in; the task is selected."""
    import torch
    from safetensors.torch import load_file

    from mmscale.callbacks import CALLBACKS
    from mmscale.callbacks.task_adapters import select_task

    tasks = [t for t in cfg.continual.tasks if t.name == task]
    if not tasks or not (folder / task).is_dir():
        raise ValueError(f"task {task!r}: not one of this export's tasks ({', '.join(ad.get('tasks') or [])})")
    cb = CALLBACKS["task_adapters"](**(ad.get("args") or {}))
    cb.names, cb.classes, cb.ends = [task], [list(tasks[0].classes)], [1]
    cb.on_model_built(model)
    lm, parts = load_file(folder / task / "adapter_model.safetensors"), load_file(folder / task / TASK_PARTS)
    params = dict(model.named_parameters())
    wanted = {n for n in params if ".task0." in n or ".heads.0." in n}
    got = {}
    for n in wanted:
        key = adapter_key(n.replace(".task0.", ".default."))
        got[n] = parts[n] if n in parts else lm.get(key)
    missing = sorted(n for n, t in got.items() if t is None)
    if missing or len(lm) + len(parts) != len(wanted):
        raise ValueError(f"{folder / task}: its adapter does not fit the model: missing {missing[:5]}")
    with torch.no_grad():
        for n, t in got.items():
            params[n].data = t.to(dtype)
    select_task(model, 0)
