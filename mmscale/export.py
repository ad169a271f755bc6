"""Take what a run trained out of mmscale, in formats other tools load.

    python -m mmscale.export adapter --run runs/demo-finetune --out exported/adapter [--base-out exported/base_lm]

`adapter`: the LoRA adapters of a `lora` / `qlora` run on the LM, in peft's own format (`adapter_config.json` and
`adapter_model.safetensors`), named as in the plain Hugging Face LM (mmscale's cross-attention wrappers taken out
of the names), so `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), OUT)` loads them. BASE is
the LM the run started from: its `model.lm.path`, or, for a run that fine-tuned another run (`model.init_from`),
the LM written out of that run (`--base-out` writes it). The cross-attention and resampler weights the run also
trained are not part of an LM adapter: the run's checkpoint keeps them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

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


def export_adapter(run_dir: str | Path, out: str | Path, base_out: str | Path | None = None,
                   checkpoint_dir: str | Path | None = None) -> Path:
    """Write the run's LM adapters to `out` in peft's format; `base_out` also writes the plain base LM (for a run
    that fine-tuned another run). Returns `out`."""
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    from mmscale.evaluation.image_use import load_run
    from mmscale.training.weights import export_base_lm, plain_lm_name

    cfg, model, tokenizer = load_run(run_dir, checkpoint_dir)
    lora = lora_settings(cfg)
    state = get_peft_model_state_dict(model.lm)  # names relative to the LM, the adapter name taken out
    tensors = {"base_model.model." + plain_lm_name(k): v.detach().float().contiguous() for k, v in state.items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = cfg.model.lm.path
    if base_out is not None:
        base = str(export_base_lm(cfg, tokenizer.vocab_size, Path(base_out)))
    LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.targets,
               bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base or None).save_pretrained(out)
    save_file(tensors, out / "adapter_model.safetensors")
    (out / "mmscale_export.json").write_text(json.dumps({"run": str(run_dir), "base": base,
                                                         "tensors": len(tensors)}, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("adapter", help="a lora/qlora run's LM adapters in peft's format")
    a.add_argument("--run", required=True, help="output_dir of the run")
    a.add_argument("--out", required=True, help="folder to write adapter_config.json and adapter_model.safetensors")
    a.add_argument("--base-out", default=None, help="also write the base LM the adapters go on (init_from runs)")
    a.add_argument("--checkpoint", default=None, help="a checkpoint directory (default: the run's newest)")
    args = p.parse_args(argv)
    try:
        out = export_adapter(args.run, args.out, args.base_out, args.checkpoint)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"adapter": str(out), **json.loads((out / "mmscale_export.json").read_text())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
