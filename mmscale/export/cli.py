"""The command line: `python -m mmscale.export model|adapter ...`, `mmscale-export`, `launchers/export.py`. Exit 0
with a JSON summary on stdout; 2 with `error: ...` (every problem, each with its fix) on stderr."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from mmscale.export.adapter import export_adapter
from mmscale.export.layout import ExportError
from mmscale.export.model import export_model
from mmscale.export.shards import DEFAULT_MAX_SHARD_SIZE


def _model_parser(p: Any) -> None:
    p.add_argument("--run", required=True, help="output_dir of the training run")
    p.add_argument("--out", required=True, help="folder to write (must not exist or be empty; see --overwrite)")
    p.add_argument("--checkpoint", default=None,
                   help="a checkpoint directory of the run (default: its newest that passes its manifest)")
    p.add_argument("--adapters", choices=("merged", "separate"), default="merged",
                   help="lora/qlora/dora/ia3 runs: merge the adapters into the weights (default), or write the base without "
                        "them plus the adapters in peft's format")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                   help="above this, several model-0000i-of-0000N.safetensors and an index (default 2GB; 10^9 bytes "
                        "a GB, 2^30 a GiB)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: the run's train.precision)")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it holds an earlier export")
    p.add_argument("--task", default=None,
                   help="a task_adapters run: the task whose model to export (its adapter merged, its heads); "
                        "--adapters separate exports every task's instead")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    import argparse

    import mmscale.export

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog=prog, description=mmscale.export.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    _model_parser(sub.add_parser("model", help="the whole model, one folder, loads without DeepSpeed"))
    a = sub.add_parser("adapter", help="a lora/qlora run's LM adapters in peft's format")
    a.add_argument("--run", required=True, help="output_dir of the run")
    a.add_argument("--out", required=True, help="folder to write adapter_config.json and adapter_model.safetensors")
    a.add_argument("--base-out", default=None, help="also write the base LM the adapters go on (init_from runs)")
    a.add_argument("--checkpoint", default=None, help="a checkpoint directory (default: the run's newest)")
    args = p.parse_args(argv)
    if args.what == "adapter":
        try:
            out = export_adapter(args.run, args.out, args.base_out, args.checkpoint)
        except ValueError as e:  # ExportError (the run), or a run without LM adapters
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(json.dumps({"adapter": str(out), **json.loads((out / "mmscale_export.json").read_text())}))
        return 0
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = " ".join([prog, *argv[1:]] if prog else ["python -m mmscale.export", *argv])
    try:
        summary = export_model(args.run, args.out, args.checkpoint, args.adapters, args.max_shard_size, args.dtype,
                               args.overwrite, command=command, task=args.task)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0
