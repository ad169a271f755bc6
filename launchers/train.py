"""Train a multimodal model.

    deepspeed --num_gpus 2 launchers/train.py --config configs/demo.yaml [section.key=value ...]
    python launchers/train.py --config configs/demo.yaml --print-config
    python launchers/train.py --config configs/flamingo-9b.yaml --dry-run --world-size 64
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from mmscale.config import ConfigError, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML job config (see configs/)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=3e-4")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="same as a positional override")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--dry-run", action="store_true", help="size the model on the meta device and exit")
    p.add_argument("--world-size", type=int, default=None, help="world size assumed by --dry-run")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher adds it
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:  # every config problem is reported here, before any process group starts
        # the deepspeed launcher, torchrun and srun set the world size before this process starts
        world = os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS")
        cfg = load_config(args.config, args.overrides + args.set, world_size=int(world) if world else None)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_yaml())
        return 0
    if args.dry_run:
        from mmscale.training.build import dry_run_report

        text, report = dry_run_report(cfg, args.world_size or 1)
        print(text)
        print(json.dumps({"total_params": report["params"]["total"], "trainable_params": report["params"]["trainable"],
                          "device_total_gib": round(report["memory_per_rank"]["device_total_gib"], 3)}))
        return 0 if not report["problems"] else 2

    from mmscale.training.build import build_trainer, close

    trainer = build_trainer(cfg, resume=args.resume)
    try:
        trainer.train()
    finally:
        close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
