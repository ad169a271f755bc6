"""samples/s of the mmscale training step against a bare DeepSpeed loop: same model, same batches, ZeRO-3.

    deepspeed --num_gpus 2 benchmarks/train_step.py [--preset demo] [--steps 30] [--rounds 3]
    deepspeed --num_gpus 2 benchmarks/train_step.py --smoke --out /tmp/train_step.json   # checks the script

Both loops run in the same processes, interleaved in rounds (bare, mmscale, bare, mmscale, ...) so that machine
noise hits both alike; each round times `--steps` optimizer steps after a warm-up. The batches come from the real
data pipeline and are held in memory, so the ratio measures the step (token all-reduce, loss scaling, callbacks,
metrics) and not the loader. Prints a table, writes benchmarks/results/train_step.json (`--out`), and prints the
headline figures as one JSON object on its last line. `--smoke`: the tiny preset, 32 px, one round of 2 steps, in a
temporary folder (benchmarks/smoke.py).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when imported from elsewhere

import smoke  # noqa: E402  (benchmarks/smoke.py)
from machine import cpu_model, native_bf16  # noqa: E402  (benchmarks/machine.py)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="model preset (default demo; --smoke: tiny)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per round and loop")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--micro-batch", type=int, default=16)
    smoke.add_smoke_args(p, "train_step", work_dir="folder for the shards and tokenizer, made once and reused "
                         "(default $TMPDIR/mmscale_bench_train_step)")
    p.add_argument("--local_rank", type=int, default=None)
    args = p.parse_args(argv)
    smoke.check_smoke_paths(p, args)
    args.preset = args.preset or ("tiny" if args.smoke else "demo")
    image_size, samples = (32, 64) if args.smoke else (64, 512)
    if args.smoke:
        args.steps, args.warmup, args.rounds, args.micro_batch = 2, 1, 1, 4

    import deepspeed  # here, not at the top: --help and a refused argument answer without importing torch
    import torch

    from mmscale.job.preflight import config_from_dict
    from mmscale.data import TrainLoader, load_tokenizer, make_shapes_dataset, train_sentencepiece
    from mmscale.data.tokenizer import captions_from_shards
    from mmscale.job.build import model_recipe
    from mmscale.objectives.captioning import mean_loss
    from mmscale.job.build import seed_everything
    from mmscale.training.engine import barrier, broadcast_object, build_ds_config, build_engine, \
        build_optimizer, check_param_dtypes, init_distributed, lr_lambda, param_dtype
    from mmscale.training.trainer import MODEL_INPUTS, Trainer

    rank, world = init_distributed()
    # rank 0 picks the folder (a smoke run's is new) and tells the others
    tmp = Path(broadcast_object(
        str(smoke.work_dir(args, "train_step", Path(tempfile.gettempdir()) / "mmscale_bench_train_step"))
        if rank == 0 else None))
    cfg = config_from_dict({
        "output_dir": str(tmp / "run"),
        "data": {"train_shards": str(tmp / "data"), "tokenizer": "", "image_size": image_size, "max_text_len": 16,
                 "num_workers": 0},
        "model": {"preset": args.preset},
        "train": {"micro_batch_size": args.micro_batch, "global_batch_size": args.micro_batch * world,
                  "max_steps": 10**6, "checkpoint_every": 0},
        "deepspeed": {"zero_stage": 3},
        "logging": {"tensorboard": False, "progress_bar": False, "plot": False, "log_every": 10},
    }, world_size=world, check_paths=False)  # the shards are generated just below
    stamp, made = tmp / "data.json", {"samples": samples, "image_size": image_size}  # reused only if the same
    if rank == 0 and not (stamp.is_file() and json.loads(stamp.read_text()) == made):
        shutil.rmtree(tmp / "data", ignore_errors=True)
        make_shapes_dataset(tmp / "data", samples, samples_per_shard=samples // 4, image_size=image_size, seed=0)
        train_sentencepiece(captions_from_shards(str(tmp / "data")), tmp / "tok", vocab_size=64)
        stamp.write_text(json.dumps(made))  # last: an interrupted generation is redone
    barrier()
    tok = load_tokenizer(tmp / "tok.model")
    loader = TrainLoader(cfg.data, tok, args.micro_batch, rank, world, seed=0)
    batches = list(itertools.islice(iter(loader), 8))

    seed_everything(0)
    bare_model = None

    def make_model():
        nonlocal bare_model
        bare_model = model_recipe(cfg).build(tok.vocab_size)  # the model and its objectives, as training builds it
        return bare_model

    # the bare loop: deepspeed.initialize on the same model class, optimizer and schedule; mean loss per rank
    ds_config = build_ds_config(cfg, world)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        make_model()
    opt = build_optimizer(bare_model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    bare, _, _, _ = deepspeed.initialize(model=bare_model, optimizer=opt, lr_scheduler=sched, config=ds_config)

    def bare_steps(n: int) -> float:
        t0 = time.perf_counter()
        for i in range(n):
            b = batches[i % len(batches)]
            out = bare(**{k: b[k] for k in MODEL_INPUTS if k in b})
            bare.backward(mean_loss(out))
            bare.step()
        return time.perf_counter() - t0

    seed_everything(0)
    engine = build_engine(cfg, lambda: model_recipe(cfg).build(tok.vocab_size), world, rank)
    # Both loops must train in the same precision: a ratio between a bf16 and an fp32 loop measures the CPU's bf16
    # support, not the step (build_engine checks its own; the bare loop is checked the same way here).
    check_param_dtypes(bare.module, param_dtype(cfg))
    dtypes = {str(p.ds_tensor.dtype) for m in (bare.module, engine.module) for p in m.parameters()}
    trainer = Trainer(cfg, engine, train_data=None)
    trainer._data_iter = itertools.cycle(batches)
    engine.train(True)

    def mmscale_steps(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            trainer.train_step()
            if trainer.step % cfg.logging.log_every == 0:
                trainer._log(trainer._flush_window())
        return time.perf_counter() - t0

    bare_steps(args.warmup)
    mmscale_steps(args.warmup)
    rows = []
    for r in range(args.rounds):
        barrier()
        tb = bare_steps(args.steps)
        barrier()
        tm = mmscale_steps(args.steps)
        samples = args.steps * cfg.train.global_batch_size
        rows.append({"round": r, "bare_samples_per_s": samples / tb, "mmscale_samples_per_s": samples / tm})
    bare_sps = statistics.median(r["bare_samples_per_s"] for r in rows)  # absolute figures: CPU, for context only
    mm_sps = statistics.median(r["mmscale_samples_per_s"] for r in rows)
    ratio = statistics.median(r["mmscale_samples_per_s"] / r["bare_samples_per_s"] for r in rows)
    headline = {
        "benchmark": "train_step",
        "ratio_mmscale_over_bare": ratio,  # median over rounds of the side-by-side ratio
        "target": 0.97,
        "bare_samples_per_s": bare_sps,
        "mmscale_samples_per_s": mm_sps,
        "smoke": args.smoke,
    }
    if rank == 0:
        print(f"{'round':>5} {'bare samples/s':>15} {'mmscale samples/s':>18} {'ratio':>7}")
        for r in rows:
            print(f"{r['round']:>5} {r['bare_samples_per_s']:>15.2f} {r['mmscale_samples_per_s']:>18.2f} "
                  f"{r['mmscale_samples_per_s'] / r['bare_samples_per_s']:>7.3f}")
        out = smoke.out_path(args, "train_step", tmp if args.smoke and not args.work_dir else None)
        result = {
            **headline,
            "rounds": rows,
            "setup": {"preset": args.preset, "image_size": image_size, "world_size": world, "zero_stage": 3,
                      "micro_batch": args.micro_batch,
                      "steps_per_round": args.steps, "device": "cuda" if torch.cuda.is_available() else "cpu",
                      "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                      "deepspeed": deepspeed.__version__, "date": time.strftime("%Y-%m-%d"),
                      "param_dtypes": sorted(dtypes), "cpu_model": cpu_model(), "cpu_native_bf16": native_bf16()},
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(json.dumps(headline))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
