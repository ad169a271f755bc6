"""Build a whole job from a validated config: process group, data, tokenizer, model, engine, callbacks, trainer.

A model is built from a config in one way (`model_recipe`): the callbacks' build requests (`on_build`), the model,
`model.init_from`'s weights, then the callbacks' changes (`on_model_built`: adapters, freezing). Training builds it
under ZeRO-3 through the engine (`build_trainer`); evaluation, generation, export and the dry run build it in one
process (`build_as_trained`, mmscale.job.runs, mmscale.job.dry_run) with the same recipe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mmscale.callbacks import build_callbacks
from mmscale.config import JobConfig
# (imported here, not where used: `ModelRecipe.build` runs inside deepspeed.zero.Init, which patches tensor creation,
# and a module first imported there can fail to import)
from mmscale.media import MEDIA, attach_media, bind_media
from mmscale.model import BuildOptions, build_model
from mmscale.objectives import attach_objectives
from mmscale.training import checkpoint, run_paths
from mmscale.training.cluster import SharedDirError, shared_dir_problems
from mmscale.training.engine import build_engine, init_distributed, rank0_done, rank0_work
from mmscale.training.trainer import Trainer

log = logging.getLogger("mmscale.build")


@dataclass
class ModelRecipe:
    """How the model of a config is built, in every process that builds one: the callbacks (built from
    `cfg.callbacks`) and the build options their `on_build` filled."""

    cfg: JobConfig
    callbacks: list[Any]
    options: Any  # mmscale.model.BuildOptions

    def build(self, vocab_size: int | None, meta: bool = False) -> torch.nn.Module:
        """The model, its objectives' heads and its media encoders (under zero.Init when the engine builds it: all
        sharded)."""
        model = build_model(self.cfg.model, vocab_size=vocab_size, meta=meta, options=self.options)
        with torch.device("meta") if meta else contextlib.nullcontext():
            return attach_media(attach_objectives(model, self.cfg), self.cfg)

    def finish(self, model: torch.nn.Module) -> None:
        """The callbacks' changes to the built model (after `model.init_from`'s weights): adapters, freezing."""
        for cb in self.callbacks:
            cb.on_model_built(model)


def model_recipe(cfg: JobConfig) -> ModelRecipe:
    callbacks, options = build_callbacks(cfg.callbacks), BuildOptions()
    for cb in callbacks:
        cb.on_config(cfg)
        cb.on_build(options)
    return ModelRecipe(cfg, callbacks, options)


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
                    extra = [MEDIA[name].token for name in cfg.media if name in MEDIA]  # placeholders
                    train_sentencepiece(texts, str(root / "tokenizer"), d.tokenizer_vocab_size, extra_symbols=extra)
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
    from mmscale.data import EvalLoader, TrainLoader, load_tokenizer

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
    recipe = model_recipe(cfg)
    callbacks, options = recipe.callbacks, recipe.options
    cfg = base_lm_from_init(cfg, options, tokenizer.vocab_size, rank)
    recipe.cfg = cfg  # (a quantized LM loads from the base LM written above)
    engine = build_engine(cfg, lambda: recipe.build(tokenizer.vocab_size), world_size, rank,
                          on_model_built=recipe.finish, sharded_build=options.sharded_at_birth,
                          save_frozen=options.checkpoint_frozen)
    if rank == 0:
        counts = engine.module.param_counts()
        log.info("model: %s parameters, %s trainable; world size %d, gradient accumulation %d",
                 f"{counts['total']:,}", f"{counts['trainable']:,}", world_size, engine.grad_accum)
    tasks = None
    keep_raw = any(cb.needs_raw_samples for cb in callbacks)  # a replay buffer stores the samples' bytes
    pin = torch.cuda.is_available()  # page-locked batches: the copy to the GPU overlaps (non_blocking=True)
    ncls = cfg.model.num_classes  # the decoders skip a label outside [0, ncls) as bad_label (0: no head, no bound)
    media = bind_media(cfg, tokenizer)  # the other media the loaders decode and collate (video, audio)
    if cfg.continual.tasks and train_data is None:  # a task sequence: each task its loaders, one after the other
        from mmscale.continual.sequence import Tasks, TaskSequence

        specs, micro = cfg.continual.tasks, cfg.train.micro_batch_size
        steps = [t.max_steps for t in specs]
        train_data = TaskSequence([TrainLoader(cfg.data, tokenizer, micro, rank, world_size, seed=cfg.train.seed + i,
                                               shards=t.train_shards, keep_raw=keep_raw, pin_memory=pin, num_classes=ncls, media=media)
                                   for i, t in enumerate(specs)],
                                  steps, engine.grad_accum)
        tasks = Tasks([t.name for t in specs], steps,
                      [EvalLoader(cfg.data, tokenizer, micro, rank, world_size, shards=t.val_shards,
                                  max_batches=cfg.train.eval_batches, num_classes=ncls, media=media) for t in specs],
                      cfg.continual.metric, [list(t.classes) for t in specs], [t.train_shards for t in specs],
                      lambda shards, n: EvalLoader(cfg.data, tokenizer, micro, rank, world_size, shards=shards,
                                                   max_batches=n, num_classes=ncls, media=media))
    if train_data is None:
        train_data = TrainLoader(cfg.data, tokenizer, cfg.train.micro_batch_size, rank, world_size,
                                 seed=cfg.train.seed, shards=train_shards or None,  # None: data.sources
                                 keep_raw=keep_raw, pin_memory=pin, num_classes=ncls, media=media)
    if eval_data is None and val_shards:
        eval_data = EvalLoader(cfg.data, tokenizer, cfg.train.micro_batch_size, rank, world_size,
                               shards=val_shards, max_batches=cfg.train.eval_batches, pin_memory=pin,
                               num_classes=ncls, media=media)
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
    from mmscale.training.engine import broadcast_object
    from mmscale.training.weights import InitFromError
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


def build_as_trained(cfg: JobConfig, vocab_size: int | None, meta: bool = False) -> torch.nn.Module:
    """The model of a run in this process, without DeepSpeed, as training built it: the same seed, the callbacks'
    build requests, `model.init_from`'s weights (streamed, tensor by tensor), then the callbacks' changes (adapters,
    freezing). `meta=True`: on the meta device, no weights read (sizing, export planning)."""
    from mmscale.training.weights import load_initial_weights

    seed_everything(cfg.train.seed)  # weights no source gives (a frozen random tower) come out as in training
    recipe = model_recipe(cfg)
    model = recipe.build(vocab_size, meta=meta)
    if cfg.model.init_from and not meta:
        load_initial_weights(model, cfg.model.init_from, rank=0)
    recipe.finish(model)
    return model


def close() -> None:
    """The end of a job in this process: the process group, and transformers' global ZeRO-3 config (set while the
    engine was built, so that `from_pretrained` partitions under zero.Init): a model built after it in the same
    process (an evaluation, the next test) must not be built under zero.Init."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    if dist.is_initialized():
        dist.destroy_process_group()
