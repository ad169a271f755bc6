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


def lora_settings(cfg: Any) -> Any:
    """The run's `lora` / `dora` / `qlora` callback (its r, alpha, dropout, targets), or an error saying there is
    none."""
    from mmscale.callbacks import build_callbacks
    from mmscale.callbacks.peft_methods import LoRA

    found = [cb for cb in build_callbacks(cfg.callbacks) if isinstance(cb, LoRA)]
    if not found:
        raise ValueError(f"the run's callbacks ({[c.name for c in cfg.callbacks]}) hold no lora, dora or qlora: no "
                         f"LoRA adapter to export")
    if found[0].components != ["lm"]:
        raise ValueError(f"only adapters on the LM export in peft's format; this run adapts {found[0].components}")
    return found[0]


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
