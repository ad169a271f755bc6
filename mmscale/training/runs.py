"""Opening a trained run: which checkpoint a tool loads, and which config builds its model.

    cfg, ckpt = open_run("runs/demo")                                 # its newest checkpoint that verifies
    cfg, ckpt = open_run("runs/demo/checkpoints/step_00000400")       # that one, verified
    cfg, ckpt = open_run("runs/demo", checkpoint="step_00000400")     # the same (a name, or a path)

Every tool that loads a run's weights opens it here: generate and evaluate (mmscale.evaluation.image_use.load_run),
export, `model.init_from` (mmscale.training.weights) and the probes built on them.

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
import re
from pathlib import Path
from typing import Any

from mmscale.training import checkpoint, run_paths

log = logging.getLogger("mmscale.runs")

CHECKPOINTS = "checkpoints"
_CHECKPOINT_NAME = re.compile(r"^step_\d{8}")


class RunOpenError(ValueError):
    """A run or checkpoint that cannot be opened: what is wrong and what to give instead. (A ValueError: every tool
    reports it as `error: ...`, exit 2.)"""


def is_run_dir(path: Path) -> bool:
    """A training run's output_dir: it holds config.yaml or checkpoints/."""
    return path.is_dir() and ((path / run_paths.RUN_CONFIG).is_file() or (path / CHECKPOINTS).is_dir())


def is_checkpoint_dir(path: Path) -> bool:
    """A checkpoint directory (verified or not): a manifest, DeepSpeed's model files, or `RUN/checkpoints/step_N`."""
    return path.is_dir() and ((path / checkpoint.MANIFEST).is_file() or any(path.glob("*model_states.pt"))
                              or (path.parent.name == CHECKPOINTS and bool(_CHECKPOINT_NAME.match(path.name))))


def _damage(ckpt: Path) -> list[str]:
    """What is wrong with `ckpt` against its manifest, all of it checked in this process; a file that cannot be read
    raises RunOpenError (not damage: it may read tomorrow)."""
    try:
        return checkpoint.verify(ckpt)
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise RunOpenError(f"cannot read checkpoint {ckpt}: {e.filename or ckpt}: {reason} (errno {e.errno}); "
                           f"check the storage and try again") from e


def verify_given(ckpt: Path, what: str = "checkpoint") -> Path:
    """`ckpt`, once it verifies against its manifest; RunOpenError naming what failed otherwise."""
    if not ckpt.is_dir():
        raise RunOpenError(f"{what} {str(ckpt)!r} is not a directory; give a checkpoint directory such as "
                           f"RUN/checkpoints/step_00000100, or the run directory for its newest that verifies")
    bad = _damage(ckpt)
    if bad:
        raise RunOpenError(f"{what} {ckpt} fails its manifest ({'; '.join(bad[:3])}); give another checkpoint, or "
                           f"the run directory for its newest that verifies")
    return ckpt


def newest_verified(run: Path, what: str = "run") -> Path:
    """The newest checkpoint of the run directory `run` that verifies; damaged ones skipped with a warning (and
    left where they are); RunOpenError when none verifies."""
    root = run / CHECKPOINTS
    found = checkpoint.candidates(root)
    if not found:
        raise RunOpenError(f"{what} {str(run)!r}: {root} holds no complete checkpoint. Train the run until it saves "
                           f"one (train.checkpoint_every, or the save at the end of training)")
    skipped = []
    for ckpt in found:
        bad = _damage(ckpt)
        if not bad:
            return ckpt
        log.warning("skipping checkpoint %s: it fails its manifest (%s); using the one before it", ckpt,
                    "; ".join(bad[:3]))
        skipped.append(f"{ckpt.name} ({bad[0]})")
    raise RunOpenError(f"{what} {str(run)!r}: no checkpoint under {root} verifies against its manifest: "
                       f"{'; '.join(skipped)}")


def find_checkpoint(path: str | os.PathLike, checkpoint_name: str | os.PathLike | None = None,
                    what: str = "run") -> Path:
    """The verified checkpoint that `path` (a run or a checkpoint directory) and `checkpoint_name` (a name under
    the run's checkpoints/, or a path) designate; see the module doc."""
    path = Path(path)
    if checkpoint_name is not None:
        given = Path(checkpoint_name)
        if not given.is_dir() and (path / CHECKPOINTS / given).is_dir():  # a name: step_00000100
            given = path / CHECKPOINTS / given
        return verify_given(given)
    if not path.exists():
        raise RunOpenError(f"{what} {str(path)!r} does not exist")
    if is_checkpoint_dir(path):
        return verify_given(path)
    if is_run_dir(path):
        return newest_verified(path, what)
    raise RunOpenError(f"{what} {str(path)!r} is neither a run directory (config.yaml and checkpoints/) nor a "
                       f"checkpoint directory (RUN/checkpoints/step_N)")


def checkpoint_config(ckpt: Path) -> Any:
    """The JobConfig recorded with the weights of `ckpt` (see the module doc), its paths where the run is now."""
    from mmscale.config import ConfigError, config_from_dict

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
        cfg = config_from_dict(raw, check_paths=False)
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
