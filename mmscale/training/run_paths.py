"""Self-contained run directories: how a run records the paths of its config, and how they are read back.

A run records its config in `{output_dir}/config.yaml` (resolved: the data, tokenizer and base LM it used) and in
every checkpoint's `manifest.json` (its folder: the run directory above `checkpoints/`); an export writes one into
its folder. All are written by `portable_config`:

    a path inside the folder     relative to it          data/tokenizer.model, data/train, base_lm
    a path outside it            absolute                /data/cc3m/train-{000000..000331}.tar
    output_dir                   "."                     (the folder itself)
    URLs, pipe: commands         as given                https://host/x-{0..9}.tar, pipe:aws s3 cp ...

and read back by `resolve_config` (`manifest_config`; mmscale.job.runs.config_for_run): relative paths are taken against the folder
where it is now, and output_dir becomes that folder. So a run works from any working directory, and after being
moved or copied. The path fields: output_dir; data.train_shards, val_shards, tokenizer, sources[*].shards;
model.init_from, model.lm.path, model.vision.path; continual.tasks[*].train_shards / val_shards; and callback
arguments named `directory`, `path`, `*_dir` or `*_path` (the replay buffer's `directory`). Shard specs are
rewritten as strings (a brace pattern's or glob's folder moves with it); paths inside a shard list file are the
list file's business (relative to its own folder).

Configs written before this (output_dir as given, every path relative to the directory training was launched
from): a path under the recorded output_dir is rebased onto the folder where the run is now; any other relative
path is kept, relative to the working directory, as it always was.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Iterator

import yaml

RUN_CONFIG = "config.yaml"
HERE = "."
"""output_dir as a portable config records it: the folder that holds the config."""

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+:")  # pipe:, http(s)://, s3://, gs://, file://: not a local path
_PATH_ARG = re.compile(r"^(directory|path|.*_dir|.*_path)$")


def is_local(spec: str) -> bool:
    """A filesystem path (or brace pattern, glob, list file), not a URL or a `pipe:` command."""
    return bool(spec) and not _SCHEME.match(spec)


def _slots(cfg: dict[str, Any]) -> Iterator[tuple[dict[str, Any], str]]:
    """(mapping, key) of every path field of a config dict that holds a non-empty string; output_dir excluded."""
    def at(holder: Any, key: str) -> Iterator[tuple[dict[str, Any], str]]:
        if isinstance(holder, dict) and isinstance(holder.get(key), str) and holder[key]:
            yield holder, key

    def each(items: Any) -> list[dict[str, Any]]:
        return [x for x in items if isinstance(x, dict)] if isinstance(items, list) else []

    data, model = cfg.get("data") or {}, cfg.get("model") or {}
    for key in ("train_shards", "val_shards", "tokenizer"):
        yield from at(data, key)
    for source in each(data.get("sources") if isinstance(data, dict) else None):
        yield from at(source, "shards")
    if isinstance(model, dict):
        yield from at(model, "init_from")
        for part in ("lm", "vision"):
            yield from at(model.get(part), "path")
    continual = cfg.get("continual") or {}
    for task in each(continual.get("tasks") if isinstance(continual, dict) else None):
        yield from at(task, "train_shards")
        yield from at(task, "val_shards")
    for callback in each(cfg.get("callbacks")):
        args = callback.get("args")
        if isinstance(args, dict):
            for key in list(args):
                if _PATH_ARG.match(str(key)):
                    yield from at(args, key)


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _inside(path: str, root: str) -> str | None:
    """`path` relative to `root` (both absolute) if it lies inside (HERE for root itself), else None."""
    rel = os.path.relpath(path, root)
    if rel == os.curdir:
        return HERE
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return None
    return rel


def portable_path(path: str, base: str | os.PathLike) -> str:
    """`path` (relative to the working directory, as a config gives it) as a portable config records it for the
    folder `base`: relative inside it, absolute outside it; URLs and `pipe:` commands as they are."""
    if not is_local(path):
        return path
    absolute = _absolute(path)
    return _inside(absolute, _absolute(os.fspath(base))) or absolute


def portable_config(cfg: dict[str, Any], base: str | os.PathLike) -> dict[str, Any]:
    """A copy of the config dict `cfg` (`JobConfig.to_dict()`, paths relative to the working directory) with every
    path field as the folder `base` records it (see the module doc); output_dir too: "." when it is `base`."""
    out = copy.deepcopy(cfg)
    for holder, key in _slots(out):
        holder[key] = portable_path(holder[key], base)
    if isinstance(out.get("output_dir"), str) and out["output_dir"]:
        out["output_dir"] = portable_path(out["output_dir"], base)
    return out


def portable_yaml(cfg: Any, base: str | os.PathLike) -> str:
    """`cfg` (a JobConfig) as the YAML a run or an export writes into the folder `base`."""
    return yaml.safe_dump(portable_config(cfg.to_dict(), base), sort_keys=False)


def resolve_config(cfg: dict[str, Any], base: str | os.PathLike, legacy: bool = True) -> dict[str, Any]:
    """A copy of the recorded config dict `cfg` found in the folder `base` (a run directory; an export) with every
    relative path taken against where `base` is now and output_dir set to it (absolute paths, URLs and `pipe:`
    commands as they are). A config written before runs were portable (output_dir not "."): with `legacy`, its
    paths under the recorded output_dir are rebased onto `base`, and its other relative paths kept as they were."""
    if not cfg:
        return copy.deepcopy(cfg)
    out = copy.deepcopy(cfg)
    root = _absolute(os.fspath(base))
    recorded = out.get("output_dir")
    old_root = None if recorded in (HERE, None, "") else _absolute(str(recorded))
    for holder, key in _slots(out):
        value = holder[key]
        if not is_local(value):
            continue
        if old_root is None:  # portable: relative to the folder
            if not os.path.isabs(os.path.expanduser(value)):
                holder[key] = os.path.normpath(os.path.join(root, value))
        elif legacy:  # as launched: under the old output_dir it moved with the run
            rel = _inside(_absolute(value), old_root)
            if rel is not None:
                holder[key] = os.path.normpath(os.path.join(root, rel))
    out["output_dir"] = root
    return out


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The config dict a run directory records (its config.yaml), resolved to where the run is now."""
    raw = yaml.safe_load((Path(run_dir) / RUN_CONFIG).read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{Path(run_dir) / RUN_CONFIG}: expected a mapping of sections, got {type(raw).__name__}")
    return resolve_config(raw, run_dir)


def data_paths(cfg: Any) -> tuple[str, str, str]:
    """(train_shards, val_shards, tokenizer) a run of the JobConfig `cfg` reads: the configured ones, or for the
    data mmscale generates (no shards named) the ones it makes under `{output_dir}/data`. Training makes them there
    (build.prepare_data); a tool opening a run from the config its manifest records (given, not resolved) finds them
    the same way (mmscale.job.runs)."""
    d = cfg.data
    train, val, tok = d.train_shards, d.val_shards, d.tokenizer
    if cfg.continual.tasks:  # a task sequence: every task names its own shards; nothing is generated
        return "", "", tok
    if not train and not d.sources:  # (a mixture names its own shards: nothing is generated)
        root = Path(cfg.output_dir) / "data"
        train = str(root / "train")
        if d.synthetic_val_samples > 0 and not val:
            val = str(root / "val")
        if not tok:
            tok = str(root / "tokenizer.model")
    return train, val, tok


def run_dir_of(ckpt: str | os.PathLike) -> Path:
    """The run directory of a checkpoint `RUN/checkpoints/step_N`."""
    return Path(ckpt).parent.parent


def manifest_config(ckpt: str | os.PathLike) -> dict[str, Any]:
    """The config dict recorded in a checkpoint's manifest (the run's config as given, not its config.yaml's
    resolved one), resolved to where the run is now; {} when it records none."""
    from mmscale.training.checkpoint import read_manifest

    saved = (read_manifest(Path(ckpt)) or {}).get("config") or {}
    return resolve_config(saved, run_dir_of(ckpt))


def comparable_config(cfg: dict[str, Any], run_dir: str | os.PathLike, recorded: bool) -> dict[str, Any]:
    """`cfg` in the one form two configs of a run are compared in (a resume's check): every local path absolute,
    where it is now. A `recorded` config (a manifest's) is resolved against `run_dir`; the current one is taken as
    given (relative to the working directory)."""
    if not cfg:
        return copy.deepcopy(cfg)
    if recorded:
        cfg = resolve_config(cfg, run_dir)
    return resolve_config(portable_config(cfg, run_dir), run_dir)
