"""Checkpoint directories that are either complete or ignored.

Layout under `{output_dir}/checkpoints`::

    step_00000100/            complete: DeepSpeed shards + trainer_state_rank{r}.pt for every rank
    step_00000200.partial/    being written (or a crash mid-save): never loaded, removed by the next save
    latest                    name of the newest complete checkpoint, replaced atomically

A checkpoint becomes visible only by a rename after every rank has finished writing it, so a crash mid-save
leaves the previous checkpoint (and `latest`) intact.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

PARTIAL = ".partial"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def state_file(rank: int) -> str:
    return f"trainer_state_rank{rank}.pt"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint: the one `latest` names if it exists, else the highest step found."""
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if candidate.is_dir() and _STEP_DIR.match(candidate.name):
            return candidate
    found = complete_checkpoints(root)
    return found[-1] if found else None


def begin(root: Path, step: int) -> str:
    """Rank 0, before a save: clear any stale partial directory of this step. Returns the tag to write under."""
    partial = root / (tag_for(step) + PARTIAL)
    if partial.exists():
        shutil.rmtree(partial)
    root.mkdir(parents=True, exist_ok=True)
    return partial.name


def commit(root: Path, step: int, keep: int) -> Path:
    """Rank 0, after every rank has written: publish the checkpoint, point `latest` at it, prune old ones."""
    partial, final = root / (tag_for(step) + PARTIAL), root / tag_for(step)
    if final.exists():  # a re-save of the same step (e.g. after a resume): the new one wins
        shutil.rmtree(final)
    os.replace(partial, final)
    tmp = root / "latest.tmp"
    tmp.write_text(final.name)
    os.replace(tmp, root / "latest")
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def consolidated_state_dict(ckpt: Path) -> dict:
    """Full fp32 model weights from a checkpoint directory, in one process, whatever the ZeRO stage it was saved at."""
    import torch

    model_states = sorted(ckpt.glob("*model_states.pt"))
    if not model_states:
        raise FileNotFoundError(f"{ckpt} holds no DeepSpeed model states (*model_states.pt)")
    meta = torch.load(model_states[0], map_location="cpu", weights_only=False)
    stage = (meta.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0)
    if stage >= 2:  # weights live sharded in the optimizer states: DeepSpeed's own consolidation
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    return {k: v.float() for k, v in meta["module"].items()}
