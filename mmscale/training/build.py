"""Build a whole job from a validated config: process group, data, tokenizer, model, engine, callbacks, trainer."""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from mmscale.config import JobConfig
from mmscale.training import checkpoint, run_paths
from mmscale.training.cluster import SharedDirError, shared_dir_problems
from mmscale.training.engine import build_engine, init_distributed, rank0_done, rank0_work
from mmscale.training.trainer import Trainer

log = logging.getLogger("mmscale.build")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _val_samples_per_shard(d) -> int:
    """The generated validation split goes into up to 16 shards, not `samples_per_shard`-sized ones: with 512
    samples in shards of 500, one of two ranks would get a 12-sample shard and evaluate it ten times over. With a
    split divisible by 16, every rank and worker of a world dividing 16 reads the same samples count."""
    return max(1, min(d.samples_per_shard, math.ceil(d.synthetic_val_samples / 16)))


def prepare_data(cfg: JobConfig, rank: int) -> tuple[str, str, str]:
    """Resolve (train_shards, val_shards, tokenizer_path); for the synthetic dataset (`data.synthetic_task`), rank 0
    makes it while the others wait at a barrier. A restart reuses what is there (a split made with other arguments
    or another task is remade). A tokenizer mmscale trains here spells every synthetic task's words (a fine-tune on
    another task reuses it)."""
    from mmscale.data import ensure_synthetic_dataset, synthetic_words, train_sentencepiece
    from mmscale.data.tokenizer import captions_from_shards

    d = cfg.data
    train, val, tok = run_paths.data_paths(cfg)  # a given tokenizer must spell the task's words (config check)
    if cfg.continual.tasks:  # a task sequence: every task names its own shards; nothing to generate
        return train, val, tok
    if not d.train_shards and not d.sources:  # generated here (a mixture names its own shards)
        root = Path(cfg.output_dir) / "data"
        what = f"preparing the data under {root}"
        if rank == 0:
            with rank0_work(what):
                ensure_synthetic_dataset(train, d.synthetic_train_samples, d.samples_per_shard, d.image_size,
                                         seed=cfg.train.seed, prefix="train", task=d.synthetic_task)
                if d.synthetic_val_samples > 0:
                    ensure_synthetic_dataset(val, d.synthetic_val_samples, _val_samples_per_shard(d), d.image_size,
                                             seed=cfg.train.seed + 1, prefix="val", task=d.synthetic_task)
                stamp = Path(train) / f"train.{d.synthetic_task}.json"
                # the split the tokenizer was trained on, by content rather than mtime: a copied run (cp -r) keeps it
                trained_on, split = root / "tokenizer.trained_on.json", f"{stamp.name} {stamp.read_text()}"
                if d.tokenizer:
                    fresh = True
                elif trained_on.is_file():
                    fresh = Path(tok).exists() and trained_on.read_text() == split
                else:  # made before that record was kept
                    fresh = Path(tok).exists() and Path(tok).stat().st_mtime >= stamp.stat().st_mtime
                if not fresh:
                    # + one line of every task's words: a word model then holds each as one piece
                    texts = [*captions_from_shards(train), " ".join(synthetic_words())]
                    train_sentencepiece(texts, str(root / "tokenizer"), d.tokenizer_vocab_size)
                    trained_on.write_text(split)
        rank0_done(what)
    return train, val, tok


OVERWRITE_AND_RESUME = ("--resume and --overwrite together: --overwrite would delete the checkpoints --resume "
                        "continues from, then find none. Continue the run with --resume alone, or start it over with "
                        "--overwrite alone; nothing was changed")


def build_trainer(cfg: JobConfig, resume: str | None = None, overwrite: bool = False, train_data: Any = None,
                  eval_data: Any = None) -> Trainer:
    """Everything a run needs. `resume`: None (a fresh run), "required" (`--resume`) or "auto" (`--resume auto`);
    `overwrite` clears an earlier run from output_dir first (never with `resume="required"`: refused, nothing
    touched). `train_data`/`eval_data` replace the configured shards (tests, benchmarks). config.yaml is written once
    the run is accepted: fresh, or resumed (a refused resume leaves the one that describes the weights)."""
    from mmscale.callbacks import build_callbacks
    from mmscale.data import EvalLoader, TrainLoader, load_tokenizer
    from mmscale.model import BuildOptions, build_model

    if overwrite and resume == "required":
        raise ValueError(OVERWRITE_AND_RESUME)
    rank, world_size = init_distributed(cfg.deepspeed.collective_timeout_s)
    if world_size > 1:  # before anything rank 0 writes for all: the data, the tokenizer, the checkpoints
        problems = shared_dir_problems(cfg.output_dir)
        if problems:
            raise SharedDirError("\n".join(problems))
    seed_everything(cfg.train.seed)
    what = f"clearing the earlier run from {cfg.output_dir} (--overwrite)"
    if overwrite and rank == 0:
        with rank0_work(what):
            removed = checkpoint.clear_run(cfg.output_dir)
        if removed:
            log.warning("--overwrite: removed %s from %s", ", ".join(removed), cfg.output_dir)
    rank0_done(what)
    train_shards, val_shards, tok_path = prepare_data(cfg, rank)
    tokenizer = load_tokenizer(tok_path)
    callbacks = build_callbacks(cfg.callbacks)

    def on_model_built(model: torch.nn.Module) -> None:
        for cb in callbacks:
            cb.on_model_built(model)

    options = BuildOptions()
    for cb in callbacks:
        cb.on_build(options)
    cfg = base_lm_from_init(cfg, options, tokenizer.vocab_size, rank)
    engine = build_engine(cfg, lambda: build_model(cfg.model, vocab_size=tokenizer.vocab_size, options=options),
                          world_size, rank, on_model_built=on_model_built, sharded_build=options.sharded_at_birth,
                          save_frozen=options.checkpoint_frozen)
    if rank == 0:
        counts = engine.module.param_counts()
        log.info("model: %s parameters, %s trainable; world size %d, gradient accumulation %d",
                 f"{counts['total']:,}", f"{counts['trainable']:,}", world_size, engine.grad_accum)
    tasks = None
    keep_raw = any(cb.needs_raw_samples for cb in callbacks)  # a replay buffer stores the samples' bytes
    pin = torch.cuda.is_available()  # page-locked batches: the copy to the GPU overlaps (non_blocking=True)
    ncls = cfg.model.num_classes  # the decoders skip a label outside [0, ncls) as bad_label (0: no head, no bound)
    if cfg.continual.tasks and train_data is None:  # a task sequence: each task its loaders, one after the other
        from mmscale.continual.sequence import Tasks, TaskSequence

        specs, micro = cfg.continual.tasks, cfg.train.micro_batch_size
        steps = [t.max_steps for t in specs]
        train_data = TaskSequence([TrainLoader(cfg.data, tokenizer, micro, rank, world_size, seed=cfg.train.seed + i,
                                               shards=t.train_shards, keep_raw=keep_raw, pin_memory=pin, num_classes=ncls)
                                   for i, t in enumerate(specs)],
                                  steps, engine.grad_accum)
        tasks = Tasks([t.name for t in specs], steps,
                      [EvalLoader(cfg.data, tokenizer, micro, rank, world_size, shards=t.val_shards,
                                  max_batches=cfg.train.eval_batches, num_classes=ncls) for t in specs],
                      cfg.continual.metric, [list(t.classes) for t in specs], [t.train_shards for t in specs],
                      lambda shards, n: EvalLoader(cfg.data, tokenizer, micro, rank, world_size, shards=shards,
                                                   max_batches=n, num_classes=ncls))
    if train_data is None:
        train_data = TrainLoader(cfg.data, tokenizer, cfg.train.micro_batch_size, rank, world_size,
                                 seed=cfg.train.seed, shards=train_shards or None,  # None: data.sources
                                 keep_raw=keep_raw, pin_memory=pin, num_classes=ncls)
    if eval_data is None and val_shards:
        eval_data = EvalLoader(cfg.data, tokenizer, cfg.train.micro_batch_size, rank, world_size,
                               shards=val_shards, max_batches=cfg.train.eval_batches, pin_memory=pin,
                               num_classes=ncls)
    trainer = Trainer(cfg, engine, train_data, eval_data=eval_data, callbacks=callbacks, tokenizer=tokenizer,
                      tasks=tasks)
    if resume:
        trainer.resume(required=resume != "auto")  # a refused resume raises on every rank: config.yaml stays as it was
    what = f"writing {Path(cfg.output_dir) / run_paths.RUN_CONFIG}"
    if rank == 0:  # the resolved config beside the run, with the data, tokenizer and base LM it actually used
        resolved = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_shards=train_shards,
                                                                     val_shards=val_shards, tokenizer=tok_path))
        with rank0_work(what):
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            # paths inside the run relative to it, the others absolute: the run works from anywhere, moved or copied
            (Path(cfg.output_dir) / run_paths.RUN_CONFIG).write_text(run_paths.portable_yaml(resolved,
                                                                                               cfg.output_dir))
    rank0_done(what)  # the others wait: a failure here reaches them now, not at the first step's collective
    return trainer


BASE_LM_DIR = "base_lm"


def base_lm_from_init(cfg: JobConfig, options: Any, vocab_size: int, rank: int) -> JobConfig:
    """A quantized LM (qlora) loads from `model.lm.path`. Fine-tuning another run (`model.init_from`) without one:
    rank 0 writes that run's LM, as a plain Hugging Face model, to `{output_dir}/base_lm` (once; a restart reuses
    it), and the job loads and quantizes that. Returns the config with `model.lm.path` set to it."""
    m = cfg.model
    if options.lm_quantization is None or m.lm.path or not m.init_from:
        return cfg
    from mmscale.training.engine import InitFromError, broadcast_object
    from mmscale.training.weights import export_base_lm

    out = Path(cfg.output_dir) / BASE_LM_DIR
    error = None
    if rank == 0:
        try:
            export_base_lm(cfg, vocab_size, out)
        except Exception as e:  # noqa: BLE001  (reported on every rank alike)
            error = f"model.init_from {m.init_from!r}: cannot make the base LM to quantize ({type(e).__name__}: {e})"
    error = broadcast_object(error)
    if error:
        raise InitFromError(error)
    return dataclasses.replace(cfg, model=dataclasses.replace(m, lm=dataclasses.replace(m.lm, path=str(out))))


def build_as_trained(cfg: JobConfig, vocab_size: int,
                     load_init: Callable[[torch.nn.Module, str], Any] | None = None) -> torch.nn.Module:
    """The model of a run in this process, without DeepSpeed, as training built it: the same seed, the callbacks'
    build requests, `model.init_from`'s weights (`load_init(model, source)`; by default the training loader), then
    the callbacks' changes (adapters, freezing)."""
    from mmscale.callbacks import build_callbacks
    from mmscale.model import BuildOptions, build_model
    from mmscale.training.engine import load_initial_weights

    seed_everything(cfg.train.seed)  # weights no source gives (a frozen random tower) come out as in training
    callbacks = build_callbacks(cfg.callbacks)
    options = BuildOptions()
    for cb in callbacks:
        cb.on_build(options)
    model = build_model(cfg.model, vocab_size=vocab_size, options=options)
    if cfg.model.init_from:
        if load_init is None:
            load_initial_weights(model, cfg.model.init_from, rank=0)
        else:
            load_init(model, cfg.model.init_from)
    for cb in callbacks:
        cb.on_model_built(model)
    return model


def build_from_checkpoint(cfg: JobConfig, ckpt: Path | None, vocab_size: int) -> torch.nn.Module:
    """The model of a run in this process, without DeepSpeed: built the way training built it (the callbacks' build
    requests and changes, `model.init_from`), then the weights of `ckpt` (None: as built). `cfg` is the config
    recorded with `ckpt`, and `ckpt` verified: both as `mmscale.training.runs.open_run` gives them. A checkpoint that
    left the frozen weights out gets them from the same sources, checked against the fingerprint it recorded."""
    from mmscale.training.engine import frozen_fingerprint, param_dtype

    model = build_as_trained(cfg, vocab_size)
    if ckpt is None:
        return model
    saved = (checkpoint.read_manifest(ckpt) or {}).get("frozen_fingerprint", "")  # (open_run verified it)
    missing, unexpected = model.load_state_dict(checkpoint.consolidated_state_dict(ckpt), strict=False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    if unexpected or (set(missing) - frozen if saved else missing):
        raise RuntimeError(f"checkpoint {ckpt} does not fit the model built from its config: missing "
                           f"{sorted(set(missing) - (frozen if saved else set()))[:5]}, unexpected {unexpected[:5]}")
    if saved and frozen_fingerprint(model, param_dtype(cfg)) != saved:
        raise RuntimeError(f"checkpoint {ckpt} holds only the trainable weights, and the frozen weights rebuilt here "
                           f"(model.init_from={cfg.model.init_from!r}, model.lm.path={cfg.model.lm.path!r}) are not "
                           f"the ones it was trained on")
    return model


def close() -> None:
    """The end of a job in this process: the process group, and transformers' global ZeRO-3 config (set while the
    engine was built, so that `from_pretrained` partitions under zero.Init): a model built after it in the same
    process (an evaluation, the next test) must not be built under zero.Init."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    if dist.is_initialized():
        dist.destroy_process_group()


def dry_run_vocab_size(cfg: JobConfig) -> int | None:
    """The vocabulary training would size the model with: the tokenizer's (the configured one, or the one mmscale
    already trained for the demo data), else the upper bound mmscale would train it with; None = the LM's own."""
    from mmscale.data import load_tokenizer

    d = cfg.data
    if d.tokenizer:
        return load_tokenizer(d.tokenizer).vocab_size
    if not d.train_shards and d.synthetic_train_samples > 0:
        made = Path(cfg.output_dir) / "data" / "tokenizer.model"
        return load_tokenizer(made).vocab_size if made.is_file() else d.tokenizer_vocab_size
    return None


def dry_run_report(cfg: JobConfig, world_size: int, **machine: float) -> tuple[str, dict[str, Any]]:
    """The --dry-run table and its figures; `machine`: gpu_tflops, link_gbytes_per_s (mmscale.training.dry_run)."""
    from mmscale.training.dry_run import dry_run, format_dry_run

    report = dry_run(cfg, world_size, vocab_size=dry_run_vocab_size(cfg), **machine)
    return format_dry_run(report), report
