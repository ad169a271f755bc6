"""Train a multimodal model.

    deepspeed --num_gpus 2 launchers/train.py --config configs/demo.yaml [section.key=value ...]
    deepspeed --num_gpus 2 launchers/train.py --config configs/demo.yaml --resume        # continue (must exist)
    deepspeed --num_gpus 2 launchers/train.py --config configs/demo.yaml --resume auto   # continue, or start fresh
    python launchers/train.py --config configs/demo.yaml --print-config
    python launchers/train.py --config configs/flamingo-9b.yaml --dry-run --world-size 64
    sbatch --nodes 2 --gpus-per-node 8 launchers/slurm/train.sbatch --config configs/X.yaml   # see launchers/slurm/

`--resume --overwrite` together is refused (exit 2, nothing touched); `--resume auto --overwrite` (train.sbatch's
first start) starts over, and a requeued SLURM job ignores --overwrite.

Exit status: 0 done; 2 a config, resume, shared-filesystem or bad-input (data.max_bad_fraction) problem; 3 non-finite steps; 4 another rank died or rank 0 failed (its message)
(its number and the step in the message); 85 stopped by a preemption signal after a checkpoint: requeue (a
requeued SLURM job resumes by itself).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from mmscale.config import ConfigError
from mmscale.job.preflight import load_config
from mmscale.training.cluster import EXIT_PEER_FAILED, EXIT_REQUEUE, STOP_SIGNALS, SharedDirError
from mmscale.training.checkpoint import run_dir_problems


def _at_least_1(text: str) -> int:  # argparse reports the option's name with the message: exit 2
    if not text.lstrip("-").isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be an integer >= 1 (the number of ranks, e.g. 64)")
    return int(text)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number > 0")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML job config (see configs/)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=3e-4")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="same as a positional override")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--dry-run", action="store_true", help="size the model on the meta device and exit")
    p.add_argument("--world-size", type=_at_least_1, default=None, help="world size assumed by --dry-run")
    p.add_argument("--gpu-tflops", type=_positive, default=None,
                   help="--dry-run: achieved training TFLOP/s per GPU for the step-time estimate (default 400)")
    p.add_argument("--link-gbytes-per-s", type=_positive, default=None,
                   help="--dry-run: GB/s per GPU for ZeRO's collectives, the inter-node link (default 50)")
    p.add_argument("--resume", action="store_const", const="required", default=None,
                   help="continue from the newest good checkpoint in output_dir (an error if there is none); "
                        "`--resume auto`: start fresh when there is none (what a requeued job wants)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an output_dir that holds an earlier run (deletes its checkpoints and logs)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher adds it
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, a in enumerate(argv):  # `--resume auto` / `--resume=auto`: an optional value argparse cannot tell
        if a == "--resume=auto" or (a == "--resume" and i + 1 < len(argv) and argv[i + 1] == "auto"):
            argv[i:i + (1 if a == "--resume=auto" else 2)] = ["--resume-auto"]
            break
    p.add_argument("--resume-auto", action="store_const", const="auto", dest="resume", help=argparse.SUPPRESS)
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    STOP_SIGNALS.install()  # from the start: a preemption during the build stops the run after its first step
    if args.resume is None and int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0:
        args.resume = "auto"  # a requeued SLURM job continues where it stopped, with or without --resume
        logging.getLogger("mmscale").info("SLURM restart %s of job %s: resuming (--resume auto)",
                                          os.environ["SLURM_RESTART_COUNT"], os.environ.get("SLURM_JOB_ID"))
    if args.overwrite and int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0:
        args.overwrite = False  # a requeued job must not delete the checkpoint it was requeued to resume from
        logging.getLogger("mmscale").warning("SLURM restart: --overwrite ignored (it applied to the first start)")
    if args.overwrite and args.resume == "required":  # before anything is touched (a requeue dropped --overwrite)
        from mmscale.job.build import OVERWRITE_AND_RESUME

        print(f"error: {OVERWRITE_AND_RESUME}", file=sys.stderr)
        return 2
    try:  # every config problem is reported here, before any process group starts
        # the deepspeed launcher, torchrun and srun set the world size before this process starts
        world = os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS")
        cfg = load_config(args.config, args.overrides + args.set, world_size=int(world) if world else None,
                          check_paths=not (args.print_config or args.dry_run))
        if not (args.print_config or args.dry_run):
            problems = run_dir_problems(cfg.output_dir, resume=args.resume is not None, overwrite=args.overwrite)
            if problems:
                raise ConfigError(problems)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_yaml())
        return 0
    if args.dry_run:
        from mmscale.job.dry_run import dry_run_report

        machine = {k: v for k, v in (("gpu_tflops", args.gpu_tflops), ("link_gbytes_per_s", args.link_gbytes_per_s))
                   if v is not None}
        text, report = dry_run_report(cfg, args.world_size or 1, **machine)
        print(text)
        step = report["step"]
        print(json.dumps({"total_params": report["params"]["total"], "trainable_params": report["params"]["trainable"],
                          "device_total_gib": round(report["memory_per_rank"]["device_total_gib"], 3),
                          "step_s_no_overlap": round(step["step_s_no_overlap"], 3),
                          "step_s_full_overlap": round(step["step_s_full_overlap"], 3),
                          "comm_gbytes_per_step": round(step["comm_gbytes_per_step"], 2)}))
        return 0 if not report["problems"] else 2

    from mmscale.job.build import build_trainer, close
    from mmscale.training.weights import InitFromError
    from mmscale.data.reading import BadDataError
    from mmscale.training.trainer import NonFiniteError, PeerFailureError, ResumeError

    try:
        trainer = build_trainer(cfg, resume=args.resume, overwrite=args.overwrite)
        started, at_start = time.monotonic(), (trainer.samples_seen, trainer.step)
        trainer.train()
        if trainer.is_main and trainer.preempted is None:  # what the run did, and what to run next
            from mmscale.job.summary import write_summary

            write_summary(trainer, time.monotonic() - started, *at_start)
    except (ResumeError, NonFiniteError, InitFromError, SharedDirError, BadDataError) as e:  # on every rank alike
        from mmscale.training.engine import barrier

        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        barrier()  # every rank is here: none tears the process group down under another
        return 3 if isinstance(e, NonFiniteError) else 2
    except PeerFailureError as e:  # another rank is gone: no teardown can complete; leave at once
        print(f"error: {e}", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(EXIT_PEER_FAILED)
    finally:
        close()
    return EXIT_REQUEUE if trainer.preempted else 0


if __name__ == "__main__":
    code = main()
    # Leave without the interpreter's teardown, everything being closed and flushed: now and then a C++ thread
    # that torch.distributed leaves joinable aborts a finished run at exit ("terminate called without an active
    # exception", SIGABRT: exit 250 from the launcher, seen about once in a hundred 2-rank jobs).
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
