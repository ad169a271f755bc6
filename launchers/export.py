"""Export a trained run as one Hugging Face-style folder that loads without DeepSpeed.

    python launchers/export.py --run runs/demo --out exported/demo [--checkpoint DIR] [--adapters merged|separate]
                               [--max-shard-size 2GB] [--dtype fp32|bf16|fp16] [--overwrite]
    python launchers/export.py adapter --run runs/demo-finetune --out exported/adapter   # peft adapters only

Then `model, tokenizer, cfg = mmscale.export.load_exported("exported/demo")`, or `model.init_from=exported/demo` in a
new run. See mmscale/export/__init__.py for the folder's layout.
"""

from __future__ import annotations

import sys

from mmscale.export import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not argv or argv[0] not in ("model", "adapter"):
        argv = ["model", *argv]
    sys.exit(main(argv, prog="launchers/export.py"))
