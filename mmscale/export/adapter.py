"""LoRA adapters in peft's own format (`adapter_config.json`, `adapter_model.safetensors`), named as in the plain
Hugging Face LM (mmscale's cross-attention wrappers taken out of the names), so that
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), OUT)` loads them: the `adapter` subcommand
(`export_adapter`), and the `adapter/` folder of `--adapters separate`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mmscale.export.inputs import open_run
from mmscale.export.layout import ExportError


def lora_settings(cfg: Any) -> Any:
    """The run's `lora` / `qlora` callback (its r, alpha, dropout, targets), or an error saying there is none."""
    from mmscale.callbacks import build_callbacks
    from mmscale.callbacks.peft_methods import LoRA

    found = [cb for cb in build_callbacks(cfg.callbacks) if isinstance(cb, LoRA)]
    if not found:
        raise ValueError(f"the run's callbacks ({[c.name for c in cfg.callbacks]}) hold no lora or qlora: no LoRA "
                         f"adapter to export")
    if found[0].components != ["lm"]:
        raise ValueError(f"only adapters on the LM export in peft's format; this run adapts {found[0].components}")
    return found[0]


def write_adapter(model: Any, lora: Any, out: Path, base: str | None, run: str | Path) -> int:
    """The LM adapters of `model` (LoRA injected into `model.lm`) in peft's format in `out`. Returns how many
    tensors were written."""
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    from mmscale.training.weights import plain_lm_name

    state = get_peft_model_state_dict(model.lm)  # names relative to the LM, the adapter name taken out
    tensors = {"base_model.model." + plain_lm_name(k): v.detach().float().contiguous() for k, v in state.items()}
    out.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.targets,
               bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base or None).save_pretrained(out)
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
    lora = lora_settings(cfg)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    # built as training built it (init_from, the callbacks), then the checkpoint, read tensor by tensor
    model = build_from_checkpoint(cfg, ckpt, tokenizer.vocab_size)
    out = Path(out)
    base = cfg.model.lm.path
    if base_out is not None:
        base = str(export_base_lm(cfg, tokenizer.vocab_size, Path(base_out)))
    write_adapter(model, lora, out, base, run_dir)
    return out


def adapter_key(name: str) -> str:
    """The peft-format name (as `write_adapter` writes it) of a LoRA parameter of the multimodal model:
    `lm.model.layers.0.decoder_layer.self_attn.q_proj.lora_A.default.weight` ->
    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`."""
    from mmscale.training.weights import plain_lm_name

    inside = re.sub(r"\.(lora_[A-Za-z_]+)\.default(?=\.|$)", r".\1", name.removeprefix("lm."))
    return "base_model.model." + plain_lm_name(inside)
