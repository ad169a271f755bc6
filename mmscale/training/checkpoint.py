"""Checkpoint directories that are complete, verified, or ignored.

Layout under `{output_dir}/checkpoints`::

    step_00000100/            complete: DeepSpeed shards, trainer_state_rank{r}.pt for every rank, manifest.json
    step_00000200.partial/    being written (or a crash mid-save): never loaded, removed by the next save
    step_00000300.corrupt/    failed its manifest on a resume: set aside, never loaded, never pruned
    latest                    name of the newest complete checkpoint, replaced atomically

A save is: every rank writes into `step_N.partial`; every rank hashes a share of the files; rank 0 writes
`manifest.json` (every file's size and SHA-256, the step, the run's metrics at that step) last, then renames the
directory to `step_N` and points `latest` at it. A crash or `kill -9` at any point of that leaves the previous
checkpoint and `latest` as they were. On resume a checkpoint whose files do not match its manifest (a truncated or
flipped file, a missing file, no manifest) is skipped with a warning and the one before it is used.

Pruning keeps the newest `keep` checkpoints and, when a metric is named, the best one by it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger("mmscale.checkpoint")

PARTIAL = ".partial"
CORRUPT = ".corrupt"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(ckpt: Path) -> int:
    return int(_STEP_DIR.match(ckpt.name).group(1))


def state_file(rank: int) -> str:
    return f"trainer_state_rank{rank}.pt"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete (renamed) checkpoints, oldest first. Their manifests are checked by `verify`, not here."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=step_of)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint: the one `latest` names if it exists, else the highest step found."""
    found = candidates(root)
    return found[0] if found else None


def candidates(root: Path) -> list[Path]:
    """Checkpoints to try on resume, best first: the one `latest` names, then the others newest first."""
    found = complete_checkpoints(root)[::-1]
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named in found:
            found.remove(named)
            found.insert(0, named)
    return found


# ----------------------------------------------------------------------------------------------- manifest


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def files_of(ckpt: Path) -> list[str]:
    """Every file under `ckpt` except the manifest, as sorted relative paths."""
    return sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)


def hash_share(ckpt: Path, names: list[str], rank: int, world_size: int) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of this rank's share of `names` (every world_size-th file): ranks hash in parallel."""
    return {n: {"size": (ckpt / n).stat().st_size, "sha256": sha256_file(ckpt / n)}
            for n in names[rank::world_size]}


def write_manifest(ckpt: Path, step: int, files: dict[str, dict[str, Any]], meta: dict[str, Any]) -> None:
    """Rank 0, last thing before the rename: the manifest is what makes a directory a checkpoint."""
    payload = {"step": step, "files": dict(sorted(files.items())), **meta}
    tmp = ckpt / (MANIFEST + ".tmp")
    with tmp.open("w") as f:
        json.dump(payload, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt / MANIFEST)


def read_manifest(ckpt: Path) -> dict[str, Any] | None:
    try:
        return json.loads((ckpt / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def verify(ckpt: Path, rank: int = 0, world_size: int = 1) -> list[str]:
    """Problems with this rank's share of `ckpt` against its manifest (sizes of every file, checksums of the share).

    Every rank checks that no file is missing and no size differs (cheap), and hashes every world_size-th file, so
    the ranks together check every byte once."""
    manifest = read_manifest(ckpt)
    if manifest is None:
        return [f"{ckpt.name}: no readable {MANIFEST} (a save that did not finish, or a checkpoint from before "
                "manifests)"]
    problems = []
    listed = manifest.get("files", {})
    for name in sorted(set(files_of(ckpt)) - set(listed)):
        problems.append(f"{ckpt.name}/{name}: not in the manifest")
    names = sorted(listed)
    for i, name in enumerate(names):
        path, want = ckpt / name, listed[name]
        if not path.is_file():
            problems.append(f"{ckpt.name}/{name}: missing")
        elif path.stat().st_size != want["size"]:
            problems.append(f"{ckpt.name}/{name}: {path.stat().st_size} bytes, the manifest says {want['size']}")
        elif i % world_size == rank and sha256_file(path) != want["sha256"]:
            problems.append(f"{ckpt.name}/{name}: checksum differs from the manifest (the file changed after "
                            "it was written)")
    return problems


# ----------------------------------------------------------------------------------------------- save, prune


def begin(root: Path, step: int) -> str:
    """Rank 0, before a save: clear any stale partial directory of this step. Returns the tag to write under."""
    partial = root / (tag_for(step) + PARTIAL)
    if partial.exists():
        shutil.rmtree(partial)
    root.mkdir(parents=True, exist_ok=True)
    return partial.name


def commit(root: Path, step: int, keep: int, best_metric: str = "", best_mode: str = "min") -> Path:
    """Rank 0, after every rank has written and the manifest is in place: publish the checkpoint, point `latest`
    at it, prune old ones."""
    partial, final = root / (tag_for(step) + PARTIAL), root / tag_for(step)
    if final.exists():  # a re-save of the same step (e.g. after a resume): the new one wins
        shutil.rmtree(final)
    os.replace(partial, final)
    tmp = root / "latest.tmp"
    tmp.write_text(final.name)
    os.replace(tmp, root / "latest")
    prune(root, keep, best_metric, best_mode, protect=final)
    return final


def best_checkpoint(ckpts: Iterable[Path], metric: str, mode: str = "min") -> Path | None:
    """The checkpoint whose manifest records the best value of `metric` (ties: the newest)."""
    best, best_value = None, None
    for ckpt in ckpts:
        value = ((read_manifest(ckpt) or {}).get("metrics") or {}).get(metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        if best_value is None or (value <= best_value if mode == "min" else value >= best_value):
            best, best_value = ckpt, value
    return best


def prune(root: Path, keep: int, best_metric: str = "", best_mode: str = "min", protect: Path | None = None) -> None:
    """Delete complete checkpoints beyond the newest `keep`, except the best by `best_metric` and `protect`.

    A checkpoint that cannot be deleted is reported (and left), never silently ignored."""
    ckpts = complete_checkpoints(root)
    kept = set(ckpts[-keep:])
    if best_metric:
        best = best_checkpoint(ckpts, best_metric, best_mode)
        if best is not None:
            kept.add(best)
    if protect is not None:
        kept.add(protect)
    for old in ckpts:
        if old not in kept:
            try:
                shutil.rmtree(old)
            except OSError as e:
                log.warning("could not delete old checkpoint %s (%s: %s); it stays, delete it by hand to free "
                            "the space", old, type(e).__name__, e)


def set_aside(ckpt: Path) -> Path:
    """Rank 0: rename a checkpoint that failed verification (or belongs to an abandoned future) so that it is
    never tried, listed or pruned again; it stays on disk for inspection."""
    target = ckpt.with_name(ckpt.name + CORRUPT)
    n = 1
    while target.exists():
        target, n = ckpt.with_name(f"{ckpt.name}{CORRUPT}{n}"), n + 1
    os.replace(ckpt, target)
    pointer = ckpt.parent / "latest"
    if pointer.is_file() and pointer.read_text().strip() == ckpt.name:
        pointer.unlink()
    return target


# ----------------------------------------------------------------------------------------------- the run directory

# What a run writes into output_dir besides generated data (data/ is deterministic and checked on reuse, so kept).
RUN_FILES = ("checkpoints", "metrics.jsonl", "tensorboard", "loss.png", "config.yaml", "replay", "continual.json",
             "continual.png")


def run_dir_problems(output_dir: str | Path, resume: bool, overwrite: bool) -> list[str]:
    """A fresh run must not land in a directory that holds another run: its pruning, `latest`, a later --resume
    and metrics.jsonl would mix the two. Checked before any process group starts."""
    out = Path(output_dir)
    if resume or overwrite or not out.is_dir():
        return []
    root = out / "checkpoints"
    ckpts = sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) if root.is_dir() else []
    found = ([f"{len(ckpts)} checkpoint(s), the last {ckpts[-1]}"] if ckpts else []) + \
        [name for name in ("metrics.jsonl", "tensorboard") if (out / name).exists()]
    if not found:
        return []
    return [f"output_dir: {str(out)!r} already holds a run ({', '.join(found)}). Continue it with --resume, start "
            f"over with --overwrite (deletes its checkpoints, metrics, TensorBoard logs and plot; keeps generated "
            f"data), or choose another output_dir=..."]


def clear_run(output_dir: str | Path) -> list[str]:
    """`--overwrite`, rank 0: remove what an earlier run wrote (not generated data). Returns what was removed."""
    removed = []
    for name in RUN_FILES:
        path = Path(output_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


# ----------------------------------------------------------------------------------------------- reading


def consolidated_state_dict(ckpt: Path) -> dict:
    """Full fp32 model weights from a checkpoint directory, in one process, whatever the ZeRO stage it was saved at.

    Only tensors and plain containers are unpickled (`weights_only=True`), from our files and DeepSpeed's alike."""
    from mmscale.training.zero_checkpoint import fp32_state_dict

    return fp32_state_dict(ckpt)
