"""Take what a run trained out of mmscale, in formats other tools load.

    python launchers/export.py --run runs/demo --out exported/demo [--checkpoint DIR] [--adapters merged|separate]
                               [--max-shard-size 2GB] [--dtype fp32|bf16|fp16] [--overwrite]
    python -m mmscale.export model ...                    (the same)
    python -m mmscale.export adapter --run runs/demo-finetune --out exported/adapter [--base-out exported/base_lm]

`model`: one checkpoint of a run (its newest that passes its manifest, or `--checkpoint`, which must; any ZeRO stage,
any world size) as one Hugging Face-style folder that loads without DeepSpeed. The model is the one the config
recorded with those weights builds (the checkpoint's manifest, mmscale.job.runs), not the run's config.yaml:

    config.yaml                    that config, resolved and made self-contained: the model it builds is this one
                                   (model.init_from cleared, a model.lm.path / vision.path Llama / tower turned into
                                   its config, lora/qlora taken out of the callbacks, data.tokenizer -> the copy here)
    config.json                    format and version, vocabulary size, dtype, the weight files, what trained it
    model.safetensors              the weights; above --max-shard-size several `model-00001-of-0000N.safetensors`
                                   and `model.safetensors.index.json` ({"metadata": {"total_size"}, "weight_map"})
    tokenizer.model | tokenizer/   the run's data.tokenizer (a sentencepiece file, or a Hugging Face folder)
    adapter/                       --adapters separate only: the LoRA adapters in peft's format
    README.md                      what trained it (config, step, the checkpoint's metrics) and how to load it

    model, tokenizer, cfg = mmscale.export.load_exported("exported/demo")   # no DeepSpeed, no process group
    deepspeed ... launchers/train.py --config ... model.init_from=exported/demo  # fine-tune it

The weights stream: a checkpoint that holds every weight goes to the files tensor by tensor, read from DeepSpeed's
ZeRO files memory-mapped (`torch.load(mmap=True, weights_only=True)`) and written by a safetensors writer that needs
only the names and shapes up front; the model is never built and never held. A fine-tuning run whose checkpoints
hold only what trained (lora, qlora, adapters, prompt_tuning, bitfit) is rebuilt once, in this process, the frozen
weights streamed in from where training took them (model.init_from, model.lm.path, the seed) and checked against
the checkpoint's fingerprint; its LoRA adapters are merged into the base weights (`--adapters merged`, the default:
a plain model, peft not needed to load it; a qlora base dequantized from 4 bits first) or written beside the base
in peft's format (`--adapters separate`). Nothing but tensors is unpickled, and only safetensors is written.

`adapter`: the LoRA adapters of a `lora` / `qlora` run on the LM, in peft's own format (`adapter_config.json` and
`adapter_model.safetensors`), named as in the plain Hugging Face LM (mmscale's cross-attention wrappers taken out
of the names), so `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), OUT)` loads them. BASE is
the LM the run started from: its `model.lm.path`, or, for a run that fine-tuned another run (`model.init_from`),
the LM written out of that run (`--base-out` writes it). The cross-attention and resampler weights the run also
trained are not part of an LM adapter: the run's checkpoint keeps them.
"""

from __future__ import annotations

# One module per job; a name not re-exported here is imported from the module that defines it:
#   layout   the names and version of the format, ExportError      inputs   the run opened, --out checked
#   model    export_model: the orchestration                       shards   sizes, dtypes, the streamed safetensors
#   merge    LoRA merged / taken off, 4-bit dequantized            config   the run's config made self-contained
#   readme   provenance (config.json's trained_by), README.md      adapter  peft's format, the `adapter` subcommand
#   load     load_exported, separate adapters applied              cli      argparse, main (__main__: python -m)
from mmscale.export.adapter import export_adapter
from mmscale.export.cli import main
from mmscale.export.layout import ADAPTER_DIR, CONFIG_JSON, CONFIG_YAML, FORMAT, FORMAT_VERSION, ExportError
from mmscale.export.load import load_exported
from mmscale.export.model import export_model

__all__ = ["export_model", "export_adapter", "load_exported", "main", "ExportError", "FORMAT", "FORMAT_VERSION",
           "CONFIG_JSON", "CONFIG_YAML", "ADAPTER_DIR"]
