"""Checkpoint directories that are complete, verified, or ignored.

Layout under `{output_dir}/checkpoints`::

    step_00000100/            complete: DeepSpeed shards, trainer_state_rank{r}.pt for every rank, manifest.json
    step_00000200.partial/    being written (or a crash mid-save): never loaded, removed by the next save
    step_00000300.corrupt/    failed its manifest on a resume: set aside, never loaded, never pruned
    step_00000400.replaced/   the earlier save of a step being saved again: a complete checkpoint until the new
                              one is published, then deleted (loaded only if a crash left no `step_00000400`)
    latest                    name of the newest complete checkpoint, replaced atomically

A save is: every rank writes into `step_N.partial`; every rank hashes a share of the files and fsyncs them; rank 0
writes `manifest.json` (every file's size and SHA-256, the step, the run's metrics at that step) last, fsyncs it and
the directory, renames the directory to `step_N`, fsyncs `checkpoints/`, points `latest` at it (a temporary file,
fsynced, renamed, the directory fsynced) and only then deletes anything older. A crash, a `kill -9` or a power loss
at any point of that leaves a complete checkpoint, the new one or the one before it (where `latest` names none,
the newest is used). On resume a checkpoint whose files do not match its manifest (a truncated or flipped
file, a missing file, no manifest, one that does not parse) is skipped with a warning and the one before it is used.
A file that cannot be read (EIO, ESTALE, EACCES, out of memory) proves nothing: the read is retried (`READ_TRIES`),
then `CheckpointReadError` stops the resume, naming the file and the errno. Files the manifest does not list (an NFS
`.nfsXXXX` file, zero_to_fp32.py's output) are not the checkpoint's and are ignored.

Pruning keeps the newest `keep` checkpoints and, when a metric is named, the best one by it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import stat
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NoReturn, TypeVar

log = logging.getLogger("mmscale.checkpoint")

PARTIAL = ".partial"
CORRUPT = ".corrupt"
REPLACED = ".replaced"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_REPLACED_DIR = re.compile(r"^step_(\d{8})\.replaced$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(ckpt: Path) -> int:
    return int((_STEP_DIR.match(ckpt.name) or _REPLACED_DIR.match(ckpt.name)).group(1))


def state_file(rank: int) -> str:
    return f"trainer_state_rank{rank}.pt"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete (renamed) checkpoints, oldest first. Their manifests are checked by `verify`, not here.

    A `step_N.replaced` counts only where no `step_N` exists: a crash in the middle of saving step N again."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir()]
    found = {step_of(p): p for p in dirs if _STEP_DIR.match(p.name)}
    for p in dirs:
        if _REPLACED_DIR.match(p.name):
            found.setdefault(step_of(p), p)
    return [found[step] for step in sorted(found)]


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


# ----------------------------------------------------------------------------------------------- durability
# A rename is atomic but not durable until its directory is fsynced, and a file's data until the file is: after a
# power loss a renamed checkpoint could come back empty or not at all. Nothing older is deleted before the new
# checkpoint's files, its directory, the rename and `latest` are on disk.


def fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` (files created, renamed or removed in it) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems (a few FUSE and network ones) cannot fsync a directory: nothing to do
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every directory under `path`, deepest first, then `path` itself (the files are fsynced elsewhere)."""
    for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        fsync_dir(sub)
    fsync_dir(path)


def write_durably(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically and durably: a temporary file, fsynced, renamed, the directory fsynced.
    After a crash `path` holds the old text or the new one, never an empty or partial one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # (a full disk, EIO): `path` is as it was; no temporary file is left beside it
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise_named(e, tmp)
        raise
    fsync_dir(path.parent)


def raise_named(e: OSError, path: str | os.PathLike) -> NoReturn:
    """Raise `e` naming `path`: the error of a buffered write, a flush or an fsync names no file (`[Errno 28] No
    space left on device`), and the operator needs to know which one (and so which disk) failed. An error that
    names a file already, or carries no errno, is raised as it is."""
    if e.filename is None and e.errno is not None:
        raise OSError(e.errno, e.strerror or os.strerror(e.errno), os.fspath(path)) from e
    raise e


@contextlib.contextmanager
def saves_keep_errno() -> Iterator[None]:
    """While a checkpoint is written: `torch.save(obj, path)` (the trainer's and DeepSpeed's checkpoint engine's)
    writes through a Python file, so that a failed write raises OSError with its errno (ENOSPC, EIO, EDQUOT) and the
    file's name. torch's own file writer turns it into `RuntimeError: [enforce fail at inline_container.cc:672] .
    unexpected pos 64 vs 0` (or "file write failed"), the errno lost. Restored on exit (main thread only)."""
    import torch

    real = torch.save

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if not isinstance(f, (str, os.PathLike)):
            return real(obj, f, *args, **kwargs)
        try:
            with open(f, "wb") as out:
                real(obj, out, *args, **kwargs)
        except OSError as e:
            raise_named(e, f)

    torch.save = save
    try:
        yield
    finally:
        torch.save = real


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
    """Size and SHA-256 of this rank's share of `names` (every world_size-th file): ranks hash in parallel. Each
    file is fsynced once hashed, so every file of the checkpoint is on disk before the manifest that lists it.

    The fsync is on the reader's descriptor, not the writer's: on a local filesystem the page cache is shared (any
    descriptor flushes it); NFS writes back and commits on the writer's close; on Lustre reading the file whole
    makes the writer's node flush it first, and the fsync then commits it on the servers."""
    out = {}
    for n in names[rank::world_size]:
        h = hashlib.sha256()
        with (ckpt / n).open("rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
            try:
                os.fsync(f.fileno())  # (EIO here: a write of this file that never reached the disk)
            except OSError as e:
                raise_named(e, ckpt / n)  # (fsync's error names no file)
            out[n] = {"size": os.fstat(f.fileno()).st_size, "sha256": h.hexdigest()}
    return out


def write_manifest(ckpt: Path, step: int, files: dict[str, dict[str, Any]], meta: dict[str, Any]) -> None:
    """Rank 0, last thing before the rename: the manifest is what makes a directory a checkpoint."""
    payload = {"step": step, "files": dict(sorted(files.items())), **meta}
    tmp = ckpt / (MANIFEST + ".tmp")
    try:
        with tmp.open("w") as f:
            json.dump(payload, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # (the directory stays `.partial`: never loaded, removed by the next save)
        raise_named(e, tmp)
    os.replace(tmp, ckpt / MANIFEST)


def read_manifest(ckpt: Path) -> dict[str, Any] | None:
    """The manifest, or None when it is missing or cannot be read or parsed: for reports (the best checkpoint, a
    recorded config). Deciding whether a checkpoint is damaged is `verify`'s, which tells those cases apart."""
    try:
        return json.loads((ckpt / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------- verify

READ_TRIES = 4
"""How many times verification tries a read that fails (not for a missing file) before it gives up."""
READ_BACKOFF_S = 0.5
"""The wait after the first failed read, doubled after each: 0.5 + 1 + 2 s over `READ_TRIES` = 4 reads."""

_T = TypeVar("_T")


class CheckpointReadError(OSError):
    """A checkpoint file that could not be read, after `READ_TRIES` tries (EIO, ESTALE, EACCES, out of memory):
    the storage failed, which proves nothing about the checkpoint; never a reason to set it aside. `errno` and
    `filename` name what failed."""


def read_retrying(path: Path, read: Callable[[], _T], tries: int | None = None,
                  backoff_s: float | None = None) -> _T:
    """`read()` (a read of `path`), tried again after a doubling wait when it raises an OSError or MemoryError.
    FileNotFoundError and NotADirectoryError are an answer (the file is not there), not a hiccup: raised at once.
    After the last try, CheckpointReadError with the errno (ENOMEM for a MemoryError) and `path`."""
    tries = max(1, READ_TRIES if tries is None else tries)
    wait = READ_BACKOFF_S if backoff_s is None else backoff_s
    for attempt in range(1, tries + 1):
        try:
            return read()
        except (FileNotFoundError, NotADirectoryError):
            raise
        except (OSError, MemoryError) as e:
            if attempt == tries:
                code = errno.ENOMEM if isinstance(e, MemoryError) else (e.errno or errno.EIO)
                name = errno.errorcode.get(code, str(code))
                raise CheckpointReadError(
                    code, f"{os.strerror(code)} ({name}) after {tries} tries "
                          f"({type(e).__name__}: {e or 'no message'})", str(path)) from e
            log.warning("reading %s failed (%s: %s); try %d of %d in %.1f s", path, type(e).__name__, e,
                        attempt + 1, tries, wait)
            time.sleep(wait)
            wait *= 2
    raise AssertionError("unreachable")


def load_manifest(ckpt: Path) -> dict[str, Any]:
    """The manifest of `ckpt`, read with retries: FileNotFoundError when there is none, ValueError when it does not
    parse (both proof of damage), CheckpointReadError when it cannot be read (proof of nothing)."""
    path = ckpt / MANIFEST
    manifest = read_retrying(path, lambda: json.loads(path.read_bytes()))
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
            for v in files.values()):
        raise ValueError(f"{path}: no list of files with their sizes and checksums")
    return manifest


def verify(ckpt: Path, rank: int = 0, world_size: int = 1) -> list[str]:
    """Proof that `ckpt` is damaged, from this rank's share against its manifest (sizes of every file, checksums of
    the share); empty when it is not. Raises CheckpointReadError (an OSError) for a file that cannot be read after
    retries: a storage failure, not damage.

    Every rank checks that no file is missing and no size differs (cheap), and hashes every world_size-th file, so
    the ranks together check every byte once. A file the manifest does not list is not the checkpoint's (an NFS
    `.nfsXXXX` file, zero_to_fp32.py's output): logged, not damage."""
    try:
        manifest = load_manifest(ckpt)
    except (FileNotFoundError, NotADirectoryError):
        return [f"{ckpt.name}: no {MANIFEST} (a save that did not finish, or a checkpoint from before manifests)"]
    except ValueError as e:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
        return [f"{ckpt.name}: {MANIFEST} does not parse ({type(e).__name__}: {e})"]
    problems = []
    listed = manifest["files"]
    try:  # only reported: what is not listed is not the checkpoint's
        unlisted = sorted(set(files_of(ckpt)) - set(listed))
    except (OSError, MemoryError):  # (a listed file that cannot be read is met below, and named)
        unlisted = []
    if unlisted and rank == 0:
        log.info("%s: %d file(s) the manifest does not list, not part of the checkpoint: %s", ckpt.name,
                 len(unlisted), ", ".join(unlisted[:5]))
    for i, name in enumerate(sorted(listed)):
        path, want = ckpt / name, listed[name]
        try:
            st = read_retrying(path, path.stat)
            if not stat.S_ISREG(st.st_mode):
                problems.append(f"{ckpt.name}/{name}: not a file")
            elif st.st_size != want["size"]:
                problems.append(f"{ckpt.name}/{name}: {st.st_size} bytes, the manifest says {want['size']}")
            elif i % world_size == rank and read_retrying(path, lambda p=path: sha256_file(p)) != want["sha256"]:
                problems.append(f"{ckpt.name}/{name}: checksum differs from the manifest (the file changed after "
                                "it was written)")
        except (FileNotFoundError, NotADirectoryError):
            problems.append(f"{ckpt.name}/{name}: missing")
    return problems


# ----------------------------------------------------------------------------------------------- save, prune


def begin(root: Path, step: int) -> str:
    """Rank 0, before a save: clear any stale partial directory of this step. Returns the tag to write under."""
    partial = root / (tag_for(step) + PARTIAL)
    if partial.exists():
        shutil.rmtree(partial)
    if not root.is_dir():
        root.mkdir(parents=True)
        fsync_dir(root.parent)
    return partial.name


def commit(root: Path, step: int, keep: int, best_metric: str = "", best_mode: str = "min") -> Path:
    """Rank 0, after every rank has written (and fsynced, see `hash_share`) and the manifest is in place: make the
    directory durable, publish it, point `latest` at it, and only then delete what it supersedes.

    Saving a step again (after a resume or a rollback): the old `step_N` is renamed `step_N.replaced` first, the
    new one published, then the old one deleted, so that a crash at any point leaves a complete step N."""
    partial, final = root / (tag_for(step) + PARTIAL), root / tag_for(step)
    replaced = root / (tag_for(step) + REPLACED)
    fsync_tree(partial)  # its entries (the files' data was fsynced as the ranks hashed them; the manifest's too)
    if final.exists():
        if replaced.exists():  # left by a crash after an earlier re-save had published `final`: stale
            shutil.rmtree(replaced)
        os.replace(final, replaced)
    os.replace(partial, final)
    fsync_dir(root)  # the rename: from here on, after a power loss too, `final` is the checkpoint of this step
    write_durably(root / "latest", final.name)
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
    # an earlier save of a step that was saved again (its new one is published): never a checkpoint to keep
    stale = [p for p in root.iterdir() if p.is_dir() and _REPLACED_DIR.match(p.name) and p not in ckpts]
    for old in [*stale, *ckpts]:
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
