"""Shards on disk: resolving a shard spec to a list of tar files, counting their samples, writing them.

A shard is a WebDataset tar file: each sample is a group of members sharing a key (`000000042.jpg`,
`000000042.txt`). The shard writer also leaves a `sizes.json` (`{shard file name: sample count}`) beside the
shards; the loader reads it to know how many samples an epoch has without opening every tar.

Nothing here imports torch (webdataset does, so it is imported where a shard is written): config validation calls
`check_shard_spec` before any process group or data-loader worker starts.
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import braceexpand

log = logging.getLogger(__name__)

SIZES_FILE = "sizes.json"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
"""Member extensions read as the sample's image, in order of preference (any format PIL opens is decoded; the
shard writer itself stores only jpg, png, webp and gif)."""
_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://")
PIPE_PREFIX = "pipe:"


class ShardSpecError(ValueError):
    """A shard spec that resolves to no (or to missing) shard files, or names `pipe:` shards not allowed."""


def _is_remote(url: str) -> bool:
    return url.startswith(_REMOTE_PREFIXES)


def is_pipe(url: str) -> bool:
    """A `pipe:COMMAND` shard: reading it runs COMMAND in a shell."""
    return url.startswith(PIPE_PREFIX)


def pipe_refused(url: str, where: str = "") -> str:
    """The message refusing the `pipe:` shard `url` found in `where` (a spec or a list file's line, if any)."""
    what = f"{where} names {url!r}, a pipe: shard," if where else f"{url!r} is a pipe: shard,"
    return (
        f"{what} which runs a shell command; refused unless data.allow_pipe=true (set it only if you trust every "
        f"command in the shard list), or give the shard's path or http(s) URL"
    )


def _expand_one(spec: str, base: Path | None = None) -> list[str]:
    """One pattern (brace and/or glob) to its paths, relative paths taken against `base`."""
    out: list[str] = []
    for item in braceexpand.braceexpand(spec):
        if _is_remote(item):
            out.append(item)
            continue
        path = Path(item).expanduser()
        if base is not None and not path.is_absolute():
            path = base / path
        if any(c in item for c in "*?["):
            out.extend(sorted(glob.glob(str(path))))
        else:
            out.append(str(path))
    return out


def resolve_shards(spec: str | os.PathLike | Iterable[str], allow_pipe: bool = False) -> list[str]:
    """Turn a shard spec into a list of shard paths (or URLs).

    Accepted forms: a brace pattern (`data/train-{000000..000031}.tar`), a glob (`data/*.tar`), a directory (every
    `*.tar` in it, sorted), a text file listing one shard path or pattern per line (relative paths are taken
    against the list file's folder; blank lines and `#` comments are ignored), or a list of any of these.
    URLs (`http://`, `s3://`, ...) are passed through unchecked; `pipe:` URLs (they run a shell command) only
    with `allow_pipe` (`data.allow_pipe`), checked after brace expansion (`{pipe:CMD,x.tar}` names one). Raises
    ShardSpecError when nothing matches, when listed local shards do not exist, or for a `pipe:` URL not allowed.
    """
    if not isinstance(spec, (str, os.PathLike)):
        shards = [s for item in spec for s in resolve_shards(item, allow_pipe)]
        if not shards:
            raise ShardSpecError(f"shard spec {spec!r}: empty list")
        return shards
    spec = os.fspath(spec).strip()
    if not spec:
        raise ShardSpecError("shard spec is empty; give a brace pattern, a directory or a list file")
    path = Path(spec).expanduser()
    if not _is_remote(spec) and path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
        if not shards:
            raise ShardSpecError(
                f"shard spec {spec!r}: the directory holds no .tar files; give the folder the shard writer "
                f"filled (python -m mmscale.data.write_shards --out DIR)"
            )
        return shards
    if not _is_remote(spec) and path.is_file() and path.suffix != ".tar":
        shards = []
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            expanded = _expand_one(line, base=path.parent)
            piped = [s for s in expanded if is_pipe(s)]  # after expansion: a line `{pipe:CMD,x.tar}` names one too
            if piped and not allow_pipe:
                raise ShardSpecError(pipe_refused(piped[0], f"list file {spec!r} line {lineno}"))
            shards.extend(expanded)
        if not shards:
            raise ShardSpecError(f"shard spec {spec!r}: the list file names no shards")
        source = f"list file {spec!r}"
    else:
        shards = _expand_one(spec)
        source = f"shard spec {spec!r}"
        piped = [s for s in shards if is_pipe(s)]
        if piped and not allow_pipe:
            raise ShardSpecError(pipe_refused(piped[0], f"shard spec {spec!r}" if spec != piped[0] else ""))
    missing = [s for s in shards if not _is_remote(s) and not Path(s).is_file()]
    if missing and len(missing) == len(shards):
        raise ShardSpecError(
            f"{source}: no shard matches (first looked for {missing[0]!r}); expected a brace pattern like "
            f"data/train-{{000000..000009}}.tar, a directory of .tar files or a text file listing shards"
        )
    if missing:
        raise ShardSpecError(
            f"{source}: {len(missing)} of {len(shards)} shards do not exist, e.g. {', '.join(missing[:3])}; "
            f"fix the pattern (or list) to name only existing shards, or write the missing ones"
        )
    return shards


def check_shard_spec(spec: str, field: str, need_sizes: bool = False, allow_pipe: bool = False) -> list[str]:
    """Problems with the shard spec `spec` of config field `field` (e.g. "data.train_shards"); empty when fine.

    Cheap, for config validation: resolves the names and checks the local files exist (reading a list file and,
    with `need_sizes`, the `sizes.json` beside the shards), never opens a tar. `need_sizes`: the loader needs every
    shard's sample count (no `data.num_samples` given). `allow_pipe`: `data.allow_pipe`.
    """
    try:
        shards = resolve_shards(spec, allow_pipe)
    except (ValueError, OSError) as e:  # ShardSpecError; an unreadable or undecodable list file
        return [f"{field}: {e}"]
    if not need_sizes:
        return []
    remote = [s for s in shards if _is_remote(s)]
    if remote:
        return [
            f"{field}: {spec!r} names remote shards (e.g. {remote[0]!r}), whose sample counts cannot be read "
            f"from a sizes.json; set data.num_samples (samples per epoch)"
        ]
    try:
        counted = _recorded_sizes(shards)
    except (ValueError, TypeError, OSError) as e:  # a sizes.json that is not JSON or not {name: count}
        return [
            f"{field}: {spec!r}: cannot read the sizes.json beside its shards ({e!r}); rewrite the shards with "
            f"`python -m mmscale.data.write_shards` or set data.num_samples (samples per epoch)"
        ]
    missing = [s for s in shards if s not in counted]
    if missing:
        return [
            f"{field}: {spec!r}: {len(missing)} of {len(shards)} shards have no sample count in a sizes.json beside "
            f"them (e.g. {missing[0]!r}); write the shards with `python -m mmscale.data.write_shards` or set "
            f"data.num_samples (samples per epoch)"
        ]
    return []


def _recorded_sizes(shards: list[str]) -> dict[str, int]:
    """{shard: sample count} for the local shards a `sizes.json` beside them records; the others are left out."""
    cache: dict[Path, dict[str, int]] = {}
    sizes: dict[str, int] = {}
    for shard in shards:
        if _is_remote(shard):
            continue
        folder = Path(shard).parent
        if folder not in cache:
            f = folder / SIZES_FILE
            cache[folder] = json.loads(f.read_text()) if f.is_file() else {}
        name = Path(shard).name
        if name in cache[folder]:
            sizes[shard] = int(cache[folder][name])
    return sizes


def read_sizes(shards: list[str]) -> dict[str, int] | None:
    """Sample count of each shard from the `sizes.json` beside it; None if any shard has no recorded size."""
    sizes = _recorded_sizes(shards)
    return sizes if all(s in sizes for s in shards) else None


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def _is_shard_of(name: str, prefix: str) -> bool:
    return re.fullmatch(rf"{re.escape(prefix)}-\d{{6,}}\.tar", name) is not None


def existing_shards(out_dir: str | os.PathLike, prefix: str) -> list[str]:
    """Names of the shards `{prefix}-NNNNNN.tar` that `out_dir` holds or its `sizes.json` records, sorted: what a
    new write with `prefix` into `out_dir` would mix with (it replaces only as many as it writes)."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    names = {p.name for p in out.iterdir() if _is_shard_of(p.name, prefix)}
    sizes_file = out / SIZES_FILE
    if sizes_file.is_file():
        try:
            recorded = json.loads(sizes_file.read_text())
        except ValueError:  # not JSON: whatever it recorded cannot be told apart
            recorded = {}
        if isinstance(recorded, dict):
            names.update(n for n in recorded if _is_shard_of(n, prefix))
    return sorted(names)


def remove_shards(out_dir: str | os.PathLike, prefix: str) -> list[str]:
    """Delete the shards `{prefix}-NNNNNN.tar` from `out_dir` (and any `.tmp` a killed write left) and their
    entries from its `sizes.json`; shards of other prefixes stay. Returns the names `existing_shards` gave."""
    out = Path(out_dir)
    names = existing_shards(out, prefix)
    sizes_file = out / SIZES_FILE
    if sizes_file.is_file():
        try:
            recorded = json.loads(sizes_file.read_text())
        except ValueError:
            recorded = None
        if isinstance(recorded, dict):  # rewritten first: sizes.json never names a shard that is gone
            kept = {n: c for n, c in recorded.items() if not _is_shard_of(n, prefix)}
            tmp = out / f"{SIZES_FILE}.tmp"
            tmp.write_text(json.dumps(dict(sorted(kept.items())), indent=1) + "\n")
            os.replace(tmp, sizes_file)
        else:
            sizes_file.unlink()
    for p in out.iterdir():
        if _is_shard_of(p.name, prefix) or (p.name.endswith(".tar.tmp") and _is_shard_of(p.name[:-4], prefix)):
            p.unlink()
    return names


def write_tar_shards(
    samples: Iterable[Mapping[str, object]],
    out_dir: str | os.PathLike,
    samples_per_shard: int,
    prefix: str = "train",
) -> dict[str, int]:
    """Write samples into `{out_dir}/{prefix}-000000.tar`, ... and `{out_dir}/sizes.json`.

    Each sample is a dict with `__key__` (unique, without dots) and one entry per member: bytes are stored as is,
    str as UTF-8. Tar members get mtime 0, so the same samples give byte-identical shards. An existing
    `sizes.json` in `out_dir` is updated, so train and validation splits (different prefixes) can share a folder.
    Returns {shard file name: sample count} of the shards written.

    A shard is written as `{name}.tmp` and renamed when complete, so a file under a shard's name is always whole.
    If a sample (or the iterable producing them) raises, the shard in progress is closed and deleted, the complete
    ones are recorded in `sizes.json`, and the error propagates.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples = iter(samples)
    sizes: dict[str, int] = {}  # complete shards only
    first = 0  # number of the next sample, for errors
    try:
        while True:
            name = shard_name(prefix, len(sizes))
            count = _write_shard(samples, out / name, samples_per_shard, first)
            if count == 0:
                break
            sizes[name] = count
            first += count
            if count < samples_per_shard:
                break
    except BaseException:
        if sizes:
            _update_sizes(out, sizes)
            log.error("writing shard %s failed; kept the %d complete shard(s) before it (recorded in %s)",
                      shard_name(prefix, len(sizes)), len(sizes), SIZES_FILE)
        raise
    _update_sizes(out, sizes)
    log.info("wrote %d samples into %d shards under %s", sum(sizes.values()), len(sizes), out)
    return sizes


def _write_shard(samples: Iterator[Mapping[str, object]], path: Path, max_samples: int, first: int) -> int:
    """Write up to `max_samples` of `samples` into the tar `path`; returns how many (0: no file is left).

    The tar is written as `{path}.tmp` and renamed when complete; on any error it is closed and deleted.
    `first` numbers the samples in errors.
    """
    import webdataset as wds  # it imports torch: only here, so that resolving and checking shard specs does not

    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            writer = wds.TarWriter(f, mtime=0)  # an int: a float mtime adds a pax header per member
            try:
                count = _write_samples(writer, itertools.islice(samples, max_samples), path.name, first)
            finally:  # the tar's end blocks; on error too, else the tar stream flushes into a closed file when freed
                writer.close()
        if count:
            os.replace(tmp, path)
        else:
            tmp.unlink()
    except BaseException:
        tmp.unlink(missing_ok=True)  # never a half-written shard, under its final name or any other
        raise
    return count


def _write_samples(writer, samples: Iterable[Mapping[str, object]], name: str, first: int) -> int:
    count = 0
    for sample in samples:
        key = str(sample.get("__key__", ""))
        if not key or "." in key:
            raise ValueError(
                f"sample {first + count} (key {key!r}): every sample needs a __key__ without dots "
                f"(WebDataset splits member names at the first dot)"
            )
        try:
            writer.write(dict(sample))
        except Exception as e:  # webdataset's encoder: AssertionError, ValueError, TypeError...
            raise ValueError(
                f"sample {first + count} (key {key!r}): cannot write it into {name}: {e!r}; give each member as "
                f"bytes or str"
            ) from e
        count += 1
    return count


def _update_sizes(out: Path, sizes: dict[str, int]) -> None:
    """Merge `sizes` into `out/sizes.json`, written whole or not at all (a temporary file, then a rename)."""
    sizes_file = out / SIZES_FILE
    all_sizes = json.loads(sizes_file.read_text()) if sizes_file.is_file() else {}
    all_sizes.update(sizes)
    tmp = out / f"{SIZES_FILE}.tmp"
    tmp.write_text(json.dumps(dict(sorted(all_sizes.items())), indent=1) + "\n")
    os.replace(tmp, sizes_file)
