"""Stage 4 of the data's trip: shard files (or URLs) -> raw samples, and the counting of what had to be skipped.

A raw sample is a dict of one tar key's members: {"__key__": str, "__url__": str, "jpg": bytes, "txt": bytes, ...}.
Nothing here decodes: mmscale.data.decode turns raw samples into pixels and tokens.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import webdataset as wds

log = logging.getLogger("mmscale.data.pipeline")



class SampleError(ValueError):
    """A sample that cannot be used (bad image, no caption); it is skipped and counted."""


class SkipCounter:
    """Skipped samples since the last `take()`, with a few of their reasons (for the warning)."""

    MAX_REASONS = 4

    def __init__(self):
        self.count = 0
        self.reasons: list[str] = []

    def skip(self, reason: str) -> None:
        self.count += 1
        if len(self.reasons) < self.MAX_REASONS:
            self.reasons.append(reason)

    def take(self) -> tuple[int, list[str]]:
        out = self.count, self.reasons
        self.count, self.reasons = 0, []
        return out


class SkipWarner:
    """Rate-limited warning in the consuming process: the first skip, then once per `warn_every` skips."""

    def __init__(self, warn_every: int, what: str):
        self.warn_every, self.what, self.total = max(1, warn_every), what, 0

    def add(self, count: int, reasons: list[str]) -> None:
        if count <= 0:
            return
        before, self.total = self.total, self.total + count
        if before == 0 or before // self.warn_every != self.total // self.warn_every:
            log.warning(
                "%s: skipped %d corrupt sample(s) so far (warning once per %d); latest: %s",
                self.what, self.total, self.warn_every, "; ".join(reasons) or "?",
            )


# ----------------------------------------------------------------------------------------------- tar -> samples


def _read_tar(url: str, counter: SkipCounter) -> Iterator[dict[str, Any]]:
    """Samples of one tar: members grouped by key (`dir/000042.jpg` + `dir/000042.txt` -> one dict).

    A tar that cannot be opened or breaks part-way counts as one skip: the samples before the break are kept, the
    one being read when it broke is dropped. (webdataset's own reader reports one break through its handler up to
    twice, so the stream is read here with its `gopen` and `base_plus_ext`.)
    """
    sample: dict[str, Any] | None = None
    try:
        with wds.gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                key, ext = wds.tariterators.base_plus_ext(member.name)
                if key is None or Path(key).name.startswith("__"):  # no extension, or webdataset metadata
                    continue
                if sample is not None and sample["__key__"] != key:  # complete: yield before reading on
                    yield sample
                    sample = None
                if sample is None:
                    sample = {"__key__": key, "__url__": url}
                sample[ext.lower()] = tar.extractfile(member).read()
    except Exception as e:  # tarfile.ReadError, OSError, EOFError, zlib errors...
        counter.skip(f"broken tar {url}: {e!r}"[:300])
        return
    if sample is not None:
        yield sample


def tar_samples(
    shards: Iterable[str], counter: SkipCounter, sample_split: tuple[int, int] | None = None
) -> Iterator[dict[str, Any]]:
    """Raw samples ({"__key__", "__url__", "jpg": bytes, "txt": bytes, ...}) of the shards in order.

    `sample_split=(slot, num_slots)` keeps only samples `slot::num_slots` of the whole stream.
    """
    samples = (s for url in shards for s in _read_tar(url, counter))
    if sample_split is None:
        yield from samples
        return
    slot, num_slots = sample_split
    for i, sample in enumerate(samples):
        if i % num_slots == slot:
            yield sample
