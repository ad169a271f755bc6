"""Everything checked before any process group starts: the config against the schema (mmscale.config), against what
is registered (presets, synthetic tasks, callbacks and their arguments), and against the files it names (shards,
the tokenizer, `model.init_from`). Every problem is reported at once, in one ConfigError.

    cfg = load_config("configs/demo.yaml", ["train.lr=3e-4"], world_size=2)     # raises ConfigError
    problems = problems_of(cfg, world_size=64, check_paths=False)              # --dry-run: a list

The schema imports nothing of the packages it describes; the checks that need them live here, in the job layer above
data, model, training and callbacks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmscale.config import (ConfigError, DataConfig, JobConfig, build_config, migrate_recorded, moved_key_problems,
                            read_config, refused_fields, schema_problems)


def _tokenizer_spells_task(d: DataConfig) -> list[str]:
    from mmscale.data import load_tokenizer, synthetic_words

    unknown = load_tokenizer(d.tokenizer).unknown_words(synthetic_words(d.synthetic_task))
    if not unknown:
        return []
    return [f"data.tokenizer: {d.tokenizer!r} cannot spell the {d.synthetic_task} task's words {unknown} (they encode "
            f"to the unknown token); give one that can. The tokenizers mmscale makes for synthetic data spell every "
            f"task's words, except those made before the counts task existed: pretrain that run again"]


def _data_problems(d: DataConfig) -> list[str]:
    """The shard specs resolve to files and the tokenizer exists (or mmscale will make both): checked here, so a
    wrong path is one line of the config report instead of a traceback inside every rank."""
    from mmscale.data.shards import check_shard_spec
    from mmscale.data.tokenizer import check_tokenizer_path

    p: list[str] = []
    if d.train_shards:
        p += check_shard_spec(d.train_shards, "data.train_shards", need_sizes=d.num_samples == 0,
                              allow_pipe=d.allow_pipe)
    if d.val_shards:
        p += check_shard_spec(d.val_shards, "data.val_shards", allow_pipe=d.allow_pipe)
    for i, s in enumerate(d.sources):
        if s.shards:
            p += check_shard_spec(s.shards, f"data.sources[{i}].shards", need_sizes=d.num_samples == 0,
                                  allow_pipe=d.allow_pipe)
    if d.sources and not d.tokenizer:
        p.append("data.tokenizer: empty, but data.sources names your own shards, for which no tokenizer is made; "
                 "give a sentencepiece .model or a Hugging Face tokenizer folder (python -m mmscale.data.tokenizer "
                 "makes one)")
    if d.tokenizer:
        p += check_tokenizer_path(d.tokenizer, "data.tokenizer")
        if not p and not d.train_shards and not d.sources and d.synthetic_train_samples > 0:  # generated data
            p += _tokenizer_spells_task(d)
    elif d.train_shards:  # mmscale trains a tokenizer only for the synthetic dataset it generates itself
        p.append(
            f"data.tokenizer: empty, but data.train_shards ({d.train_shards!r}) names your own shards, for which no "
            f"tokenizer is made; give a sentencepiece .model or a Hugging Face tokenizer folder, or train one with "
            f"`python -m mmscale.data.tokenizer --shards '{d.train_shards}' --out tok --vocab-size 8000` and set "
            f"data.tokenizer=tok.model"
        )
    return p


def registry_problems(cfg: JobConfig) -> list[str]:
    """What the config names that must be registered: the objectives (and the validation metrics that rank
    checkpoints, stop early or fill the continual-learning matrix, which they report), the synthetic task, the
    callbacks (each built once: its constructor checks its arguments and does no work, see the Callback protocol)."""
    from mmscale.callbacks import CALLBACKS, callback_problems
    from mmscale.data.synthetic import SYNTHETIC_TASKS
    from mmscale.media import media_problems
    from mmscale.objectives import metric_problems, objective_problems

    p: list[str] = objective_problems(cfg) + media_problems(cfg)
    if cfg.train.keep_best:
        p += metric_problems("train.keep_best", cfg.train.keep_best, cfg, "keep_best=val_loss")
    if cfg.continual.tasks:
        p += metric_problems("continual.metric", cfg.continual.metric, cfg, "continual.metric=val_loss")
    if cfg.data.synthetic_task not in SYNTHETIC_TASKS:
        p.append(f"data.synthetic_task: {cfg.data.synthetic_task!r} is not one of "
                 f"{', '.join(map(repr, SYNTHETIC_TASKS))}")
    for i, cb in enumerate(cfg.callbacks):
        if cb.name not in CALLBACKS:
            p.append(f"callbacks[{i}].name: unknown callback {cb.name!r}. Registered: {', '.join(sorted(CALLBACKS))}")
        else:
            p += callback_problems(i, cb.name, cb.args, cfg)
    lora_modes = [f"model.{f}" for f in ("train_xattn", "train_resampler") if getattr(cfg.model, f) == "lora"]
    if lora_modes and not any(getattr(CALLBACKS.get(cb.name), "adapts_lora_modes", False) for cb in cfg.callbacks):
        p.append(f"{' and '.join(lora_modes)}: 'lora' puts the adapters of a lora or qlora callback there, and "
                 f"callbacks has none; add callbacks=[{{name: lora}}], or set {lora_modes[0]}=full or frozen")
    return p


def file_problems(cfg: JobConfig) -> list[str]:
    """The files the config names: shards, the tokenizer, `model.init_from`."""
    from mmscale.training.weights import source_problems

    p = _data_problems(cfg.data)
    if not p and cfg.data.tokenizer and cfg.media:
        p += _placeholder_problems(cfg)
    if cfg.model.init_from:
        p += source_problems(cfg.model.init_from)
    return p


def _placeholder_problems(cfg: JobConfig) -> list[str]:
    """The tokenizer has each configured medium's placeholder token (`<video>`, `<audio>`)."""
    from mmscale.data import load_tokenizer
    from mmscale.media import MEDIA, placeholder_id

    tok, p = load_tokenizer(cfg.data.tokenizer), []
    for name in cfg.media:
        if name in MEDIA:
            try:
                placeholder_id(tok, MEDIA[name].token, "data.tokenizer")
            except ValueError as e:
                p.append(str(e))
    return p


def problems_of(cfg: JobConfig, world_size: int | None = None, check_paths: bool = True) -> list[str]:
    """Every problem of `cfg` (empty when it is valid): the schema's, the registries', and with `check_paths` the
    files'. `world_size` adds the batch arithmetic."""
    return schema_problems(cfg, world_size) + registry_problems(cfg) + (file_problems(cfg) if check_paths else [])


def config_from_dict(raw: dict[str, Any], world_size: int | None = None, check_paths: bool = True,
                     recorded: bool = False) -> JobConfig:
    """The validated JobConfig of a raw dict (a YAML file's, or with `recorded` a run's recorded one, which may be
    in an earlier version's form: mmscale.config.migrate_recorded): the model preset it names
    (mmscale.model.presets), then its values over it. Raises ConfigError listing every problem."""
    from mmscale.model.presets import PRESETS

    problems: list[str] = []
    if recorded:
        raw = migrate_recorded(raw)
    else:
        problems += moved_key_problems(raw)
        raw = migrate_recorded(raw)  # (so that the report goes on with the rest, not with "unknown key")
    preset = (raw.get("model") or {}).get("preset", "") if isinstance(raw.get("model"), dict) else ""
    model = None
    if preset and isinstance(preset, str):  # (another type is reported with the other fields' types)
        if preset not in PRESETS:
            problems.append(f"model.preset: unknown preset {preset!r}. Choose one of: {', '.join(sorted(PRESETS))}")
        else:
            model = PRESETS[preset]()
    cfg, built = build_config(raw, model)
    problems += built
    refused = refused_fields(problems)
    problems += [p for p in problems_of(cfg, world_size, check_paths) if not any(r.search(p) for r in refused)]
    if problems:
        raise ConfigError(problems)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                world_size: int | None = None, check_paths: bool = True) -> JobConfig:
    """Load a YAML job config, apply `section.key=value` overrides, resolve the model preset and validate (with
    `world_size`, also the batch arithmetic across ranks; with `check_paths`, also that the data shards, the
    tokenizer and `model.init_from` exist, which training needs and `--dry-run` / `--print-config` do not).

    Precedence (lowest to highest): dataclass defaults < model preset < YAML file < command-line overrides.
    Raises ConfigError listing every problem found.
    """
    raw, problems = read_config(path, overrides)
    try:
        cfg = config_from_dict(raw, world_size, check_paths)
    except ConfigError as e:
        raise ConfigError(problems + e.problems) from None
    if problems:
        raise ConfigError(problems)
    return cfg
