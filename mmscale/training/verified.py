"""Which checkpoint a run gives, verified: a run directory's newest checkpoint that passes its manifest, or a named
one that must. (The config that builds its model, and the model itself: mmscale.job.runs.)

A damaged checkpoint (a flipped byte, a truncated or missing file, no manifest) is skipped with a warning naming it,
and left where it is: a tool that only reads sets nothing aside (the next `--resume` does). A file that cannot be
read (EIO, EACCES, ...) is an error naming it, not damage: the tool does not quietly fall back to older weights.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from mmscale.training import checkpoint, run_paths

log = logging.getLogger("mmscale.verified")

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
                    what: str = "run", checkpoint_what: str = "checkpoint") -> Path:
    """The verified checkpoint that `path` (a run or a checkpoint directory) and `checkpoint_name` (a name under
    the run's checkpoints/, or a path) designate; see the module doc. `what` and `checkpoint_what` name the two
    arguments in errors (e.g. `--run`, `--checkpoint`)."""
    path = Path(path)
    if checkpoint_name is not None:
        given = Path(checkpoint_name)
        if not given.is_dir() and (path / CHECKPOINTS / given).is_dir():  # a name: step_00000100
            given = path / CHECKPOINTS / given
        return verify_given(given, checkpoint_what)
    if not path.exists():
        raise RunOpenError(f"{what} {str(path)!r} does not exist")
    if is_checkpoint_dir(path):
        return verify_given(path)
    if is_run_dir(path):
        return newest_verified(path, what)
    raise RunOpenError(f"{what} {str(path)!r} is neither a run directory (config.yaml and checkpoints/) nor a "
                       f"checkpoint directory (RUN/checkpoints/step_N)")
