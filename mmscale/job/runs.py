"""Opening a trained run: which checkpoint a tool loads, and which config builds its model.

    cfg, ckpt = open_run("runs/demo")                                 # its newest checkpoint that verifies
    cfg, ckpt = open_run("runs/demo/checkpoints/step_00000400")       # that one, verified
    cfg, ckpt = open_run("runs/demo", checkpoint="step_00000400")     # the same (a name, or a path)

Every tool that loads a run's weights opens it here: generate, evaluate and the probes (`load_run`), export, and
`model.init_from` (mmscale.training.weights, through mmscale.training.verified).

The checkpoint. One that is named must verify against its manifest (every file's size and SHA-256, all hashed in
this process), else RunOpenError names what failed. Otherwise the run's checkpoints are tried newest first (the one
`latest` names first), like `--resume` does: a damaged one (a flipped byte, a truncated or missing file, no
manifest) is skipped with a warning naming it, and left where it is: a tool that only reads sets nothing aside
(the next `--resume` does). None that verifies: RunOpenError. A file that cannot be read (EIO, EACCES, ...) is an
error naming it, not damage: the tool does not quietly fall back to older weights.

The config. The one recorded with those weights, in the checkpoint's manifest (`run_paths.manifest_config`), not
the run's config.yaml: config.yaml is the newest start's, and a later start may have changed it (a fine-tune in the
same output_dir, a resume that changed lr) while older checkpoints keep the weights of the config they were trained
under. The manifest holds the config as given; the data mmscale generated for the run (its shards and tokenizer
under `{output_dir}/data`) is filled in as training resolved it (`run_paths.data_paths`). A manifest from before
checkpoints recorded their config falls back to config.yaml, with a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmscale.training import checkpoint, run_paths
from mmscale.training.verified import RunOpenError, find_checkpoint

if TYPE_CHECKING:
    import torch

log = logging.getLogger("mmscale.runs")


def checkpoint_config(ckpt: Path) -> Any:
    """The JobConfig recorded with the weights of `ckpt` (see the module doc), its paths where the run is now."""
    from mmscale.config import ConfigError
    from mmscale.job.preflight import config_from_dict

    run = run_paths.run_dir_of(ckpt)
    raw = run_paths.manifest_config(ckpt)
    source = ckpt / checkpoint.MANIFEST
    if not raw:
        source = run / run_paths.RUN_CONFIG
        if not source.is_file():
            raise RunOpenError(f"checkpoint {ckpt}: its manifest records no config, and {source} does not exist")
        log.warning("checkpoint %s records no config (saved before checkpoints did): the model is built from %s",
                    ckpt, source)
        raw = run_paths.read_run_config(run)
    try:
        cfg = config_from_dict(raw, check_paths=False, recorded=True)
    except ConfigError as e:
        raise RunOpenError(f"the config in {source} does not load: {e}") from e
    train, val, tok = run_paths.data_paths(cfg)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_shards=train, val_shards=val,
                                                             tokenizer=tok))


def open_run(path: str | os.PathLike, checkpoint_name: str | os.PathLike | None = None,
             what: str = "run") -> tuple[Any, Path]:
    """(the config recorded with the weights, the verified checkpoint) of a run directory or a checkpoint directory
    (`checkpoint_name`: one of the run's, by name or path). `what` names the argument in errors (`--model`)."""
    ckpt = find_checkpoint(path, checkpoint_name, what)
    return checkpoint_config(ckpt), ckpt


def config_for_run(run_dir: str | os.PathLike, check_paths: bool = False) -> Any:
    """The JobConfig of a run directory's config.yaml (its newest start's), wherever the run is now. `check_paths`:
    also that its data and tokenizer exist (off by default: reading a run needs the model's part only)."""
    from mmscale.job.preflight import config_from_dict

    return config_from_dict(run_paths.read_run_config(run_dir), check_paths=check_paths, recorded=True)


class CheckpointFitError(ValueError, RuntimeError):
    """A checkpoint that does not fit the model its recorded config builds (names missing or unexpected, or frozen
    weights that are not the ones it was trained on)."""


def load_checkpoint_weights(model: torch.nn.Module, cfg: Any, ckpt: Path) -> torch.nn.Module:
    """The weights of `ckpt` into `model` (built from the config recorded with it, `build_as_trained`), read tensor
    by tensor (mmscale.training.readers): one model in memory, never two. A checkpoint that left the frozen weights
    out (the fine-tuning methods) gets them from the same sources the build read, checked against the fingerprint
    it recorded. The one check that a checkpoint fits: evaluation, generation and export all come here."""
    from mmscale.training.engine import frozen_fingerprint, param_dtype
    from mmscale.training.readers import CheckpointReader

    saved = (checkpoint.read_manifest(ckpt) or {}).get("frozen_fingerprint", "")  # (open_run verified it)
    reader = CheckpointReader(ckpt)
    state = model.state_dict(keep_vars=True)
    persistent = {f"{prefix}.{name}" if prefix else name for prefix, module in model.named_modules()
                  for name, b in module._buffers.items()
                  if b is not None and name not in module._non_persistent_buffers_set}
    expected = {n for n, _ in model.named_parameters()} | persistent
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    unexpected = [n for n in reader.names if n not in state]
    missing = sorted(n for n in expected if n not in reader)
    if unexpected or (set(missing) - frozen if saved else missing):
        raise CheckpointFitError(f"checkpoint {ckpt} does not fit the model built from its config: missing "
                                 f"{sorted(set(missing) - (frozen if saved else set()))[:5]}, unexpected "
                                 f"{unexpected[:5]}")
    import torch

    with torch.no_grad():
        for name in reader.names:
            state[name].copy_(reader.read(name))
    if saved and frozen_fingerprint(model, param_dtype(cfg)) != saved:
        raise CheckpointFitError(f"checkpoint {ckpt} holds only the trainable weights, and the frozen weights rebuilt "
                                 f"here (model.init_from={cfg.model.init_from!r}, model.lm.path="
                                 f"{cfg.model.lm.path!r}) are not the ones it was trained on")
    return model


def build_from_checkpoint(cfg: Any, ckpt: Path | None, vocab_size: int) -> torch.nn.Module:
    """The model of a run in this process, without DeepSpeed: built the way training built it
    (mmscale.job.build.build_as_trained), then the weights of `ckpt` (None: as built). `cfg` is the config recorded
    with `ckpt`, and `ckpt` verified: both as `open_run` gives them."""
    from mmscale.job.build import build_as_trained

    model = build_as_trained(cfg, vocab_size)
    return model if ckpt is None else load_checkpoint_weights(model, cfg, ckpt)


def load_run(path: str | os.PathLike, checkpoint_name: str | os.PathLike | None = None,
             what: str = "run") -> tuple[Any, torch.nn.Module, Any]:
    """(cfg, model, tokenizer) of a finished or running job, on CPU, in eval mode: `path` a run directory (its newest
    checkpoint that verifies against its manifest, damaged ones skipped with a warning) or a checkpoint directory
    in one; `checkpoint_name` picks one of the run's (it must verify). The model is built from the config recorded
    with those weights; the run may have moved (mmscale.training.run_paths)."""
    from mmscale.data import load_tokenizer

    cfg, ckpt = open_run(path, checkpoint_name, what)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    model = build_from_checkpoint(cfg, ckpt, tokenizer.vocab_size)
    return cfg, model.eval(), tokenizer
