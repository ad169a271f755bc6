"""Shards on disk: resolving a shard spec to a list of tar files, counting their samples, writing them.

A shard is a WebDataset tar file: each sample is a group of members sharing a key (`000000042.jpg`,
`000000042.txt`). The shard writer also leaves a `sizes.json` (`{shard file name: sample count}`) beside the
shards; the loader reads it to know how many samples an epoch has without opening every tar.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import braceexpand
import webdataset as wds

log = logging.getLogger(__name__)

SIZES_FILE = "sizes.json"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
"""Member extensions read as the sample's image, in order of preference."""
_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://")


class ShardSpecError(ValueError):
    """A shard spec that resolves to no (or to missing) shard files."""


def _is_remote(url: str) -> bool:
    return url.startswith(_REMOTE_PREFIXES)


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


def resolve_shards(spec: str | os.PathLike | Iterable[str]) -> list[str]:
    """Turn a shard spec into a list of shard paths (or URLs).

    Accepted forms: a brace pattern (`data/train-{000000..000031}.tar`), a glob (`data/*.tar`), a directory (every
    `*.tar` in it, sorted), a text file listing one shard path or pattern per line (relative paths are taken
    against the list file's folder; blank lines and `#` comments are ignored), or a list of any of these.
    URLs (`pipe:`, `http://`, `s3://`, ...) are passed through unchecked. Raises ShardSpecError when nothing
    matches or when listed local shards do not exist.
    """
    if not isinstance(spec, (str, os.PathLike)):
        shards = [s for item in spec for s in resolve_shards(item)]
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
            raise ShardSpecError(f"shard spec {spec!r}: the directory holds no .tar files")
        return shards
    if not _is_remote(spec) and path.is_file() and path.suffix != ".tar":
        shards = []
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                shards.extend(_expand_one(line, base=path.parent))
        if not shards:
            raise ShardSpecError(f"shard spec {spec!r}: the list file names no shards")
        source = f"list file {spec!r}"
    else:
        shards = _expand_one(spec)
        source = f"shard spec {spec!r}"
    missing = [s for s in shards if not _is_remote(s) and not Path(s).is_file()]
    if missing and len(missing) == len(shards):
        raise ShardSpecError(
            f"{source}: no shard matches (first looked for {missing[0]!r}); expected a brace pattern like "
            f"data/train-{{000000..000009}}.tar, a directory of .tar files or a text file listing shards"
        )
    if missing:
        raise ShardSpecError(
            f"{source}: {len(missing)} of {len(shards)} shards do not exist, e.g. {', '.join(missing[:3])}"
        )
    return shards


def read_sizes(shards: list[str]) -> dict[str, int] | None:
    """Sample count of each shard from the `sizes.json` beside it; None if any shard has no recorded size."""
    cache: dict[Path, dict[str, int]] = {}
    sizes: dict[str, int] = {}
    for shard in shards:
        if _is_remote(shard):
            return None
        folder = Path(shard).parent
        if folder not in cache:
            f = folder / SIZES_FILE
            cache[folder] = json.loads(f.read_text()) if f.is_file() else {}
        name = Path(shard).name
        if name not in cache[folder]:
            return None
        sizes[shard] = int(cache[folder][name])
    return sizes


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


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
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    writer: wds.TarWriter | None = None
    name = ""
    for i, sample in enumerate(samples):
        if i % samples_per_shard == 0:
            if writer is not None:
                writer.close()
            name = shard_name(prefix, i // samples_per_shard)
            writer = wds.TarWriter(str(out / name), mtime=0)  # an int: a float mtime adds a pax header per member
            sizes[name] = 0
        key = str(sample["__key__"])
        if "." in key:
            raise ValueError(f"sample key {key!r} contains a dot; WebDataset splits member names at the first dot")
        writer.write(dict(sample))
        sizes[name] += 1
    if writer is not None:
        writer.close()
    sizes_file = out / SIZES_FILE
    all_sizes = json.loads(sizes_file.read_text()) if sizes_file.is_file() else {}
    all_sizes.update(sizes)
    sizes_file.write_text(json.dumps(dict(sorted(all_sizes.items())), indent=1) + "\n")
    log.info("wrote %d samples into %d shards under %s", sum(sizes.values()), len(sizes), out)
    return sizes
