"""Stage 4 of the data's trip: shard files (or URLs) -> raw samples, and the counting of what had to be skipped.

A raw sample is a dict of one tar key's members: {"__key__": str, "__url__": str, "jpg": bytes, "txt": bytes, ...}.
Nothing here decodes: mmscale.data.decode turns raw samples into pixels and tokens.

Bad input never kills a run and never passes silently: each unusable sample (or shard) is skipped and counted by its
kind (the constants below; `SkipCounter`), and `BadInputMonitor` stops the run only when bad input is more than a
set fraction of the recent samples (`data.max_bad_fraction` of the last `data.bad_window`).

Where shards come from:
- local files: opened directly. One that cannot be opened (deleted after the run started, no read permission) is
  skipped and counted as `unreadable_shard`; one that breaks part-way as `broken_tar` (its samples before the break
  are kept).
- http(s) URLs: streamed with urllib. A network failure (refused, reset or dropped connection, timeout, an HTTP
  error status such as 403 or 404) is not bad input: it is logged, counted as `network_retry`, and the shard is
  reopened after `backoff * 2**k` seconds (at most a minute) and read on after the samples already yielded
  (downloading those again: the server need not support ranges). After `data.http_retries` retries in a row
  without progress, a `RemoteShardError` names the URL, the attempts and the last error, and stops the run: a
  server that keeps failing is an outage to fix, and skipping every shard it serves would quietly train on a
  fraction of the data.
- `pipe:COMMAND`: runs COMMAND in a shell, so it is refused unless `data.allow_pipe` is set.
- other URLs (`gs://`, ...): webdataset's `gopen`.

Every tar is read as a stream, member by member. A member over `data.max_member_bytes` (its size from the tar
header) is never read into memory: its bytes are passed over in small blocks, and its sample comes out marked
(`OVERSIZED`) so that decoding skips and counts it as `member_too_large` (the sample keeps its place in the shard,
so positions and per-slot sample splits still count the shard's samples as sizes.json does).
"""

from __future__ import annotations

import collections
import http.client
import io
import logging
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import webdataset as wds

from mmscale.config import DataConfig
from mmscale.data.shards import ShardSpecError, is_pipe, pipe_refused

log = logging.getLogger("mmscale.data.pipeline")

# ----------------------------------------------------------------------------------------------- kinds of bad input

BROKEN_TAR = "broken_tar"
"""A tar that breaks part-way (truncated, corrupt header or compression): the rest of the shard is lost."""
UNREADABLE_SHARD = "unreadable_shard"
"""A local shard that cannot be opened: deleted after the run started, no read permission, a directory..."""
UNDECODABLE_IMAGE = "undecodable_image"
"""Image bytes PIL cannot open or decode (corrupt, truncated, not an image)."""
IMAGE_TOO_LARGE = "image_too_large"
"""An image over `data.max_image_pixels` (a decompression bomb), refused from its header, before decoding."""
MISSING_IMAGE = "missing_image"
"""A sample with no image member (no media member of any kind, where other media are configured), unless
`data.text_only` accepts it as a text-only sample."""
UNDECODABLE_MEDIA = "undecodable_media"
"""A video or audio member that cannot be decoded, or is unusable as decoded (a clip with too few frames)."""
MISSING_CAPTION = "missing_caption"
"""A sample with neither a caption (`.txt`) nor a class label (`.cls`)."""
EMPTY_CAPTION = "empty_caption"
"""A caption that is empty or only whitespace."""
BAD_ENCODING = "bad_encoding"
"""A caption or label that is not valid UTF-8."""
BAD_LABEL = "bad_label"
"""A class label (`.cls`) that is not an integer in [0, model.num_classes) (no upper bound without a head)."""
MEMBER_TOO_LARGE = "member_too_large"
"""A sample with a tar member over `data.max_member_bytes`, passed over unread (one huge member would otherwise
exhaust a worker's memory)."""
OTHER = "other"
"""A skip whose reporter named no kind."""
BAD_KINDS = (
    BROKEN_TAR, UNREADABLE_SHARD, UNDECODABLE_IMAGE, IMAGE_TOO_LARGE, MISSING_IMAGE, MISSING_CAPTION, EMPTY_CAPTION,
    BAD_ENCODING, UNDECODABLE_MEDIA, BAD_LABEL, MEMBER_TOO_LARGE, OTHER,
)
"""The kinds of bad input mmscale's reader and decoder report (each one sample, or one shard, skipped)."""

NETWORK_RETRY = "network_retry"
"""Not bad input: a network failure on an http(s) shard, retried. Counted beside the kinds, never as a skip."""


class SampleError(ValueError):
    """A sample that cannot be used (bad image, no caption); it is skipped and counted under `kind`."""

    def __init__(self, message: str, kind: str = OTHER):
        super().__init__(message)
        self.kind = kind


OVERSIZED = "__oversized__"
"""The raw-sample entry that lists (as text) the members over `data.max_member_bytes` that the reader passed over
unread; `refuse_oversized` turns it into a SampleError."""


def refuse_oversized(raw: Mapping[str, Any], where: str) -> None:
    """Raise SampleError(MEMBER_TOO_LARGE) for a raw sample the reader marked `OVERSIZED` (`where`: the sample,
    for the message); every decoder calls this first."""
    if raw.get(OVERSIZED):
        raise SampleError(f"{where}: {raw[OVERSIZED]}", MEMBER_TOO_LARGE)


class RemoteShardError(RuntimeError):
    """An http(s) shard still failing after `data.http_retries` retries: it stops the run (see the module doc)."""


class BadDataError(RuntimeError):
    """More than `data.max_bad_fraction` of the recent samples were bad: the run stops (BadInputMonitor)."""


class SkipCounter:
    """Skipped samples since the last `take()`, with a few of their reasons (for the warning), and per-kind counts
    (skips and network retries) since the last `take_kinds()`."""

    MAX_REASONS = 4

    def __init__(self):
        self.count = 0
        self.reasons: list[str] = []
        self.kinds: dict[str, int] = {}

    def skip(self, reason: str | SampleError, kind: str | None = None) -> None:
        """Count one skipped sample (or shard) of `kind` (one of BAD_KINDS; default: a SampleError's own kind)."""
        if kind is None:
            kind = getattr(reason, "kind", OTHER)
        self.count += 1
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        if len(self.reasons) < self.MAX_REASONS:
            self.reasons.append(str(reason))

    def retried(self) -> None:
        """Count one retried network failure (kind NETWORK_RETRY): not a skipped sample."""
        self.kinds[NETWORK_RETRY] = self.kinds.get(NETWORK_RETRY, 0) + 1

    def take(self) -> tuple[int, list[str]]:
        out = self.count, self.reasons
        self.count, self.reasons = 0, []
        return out

    def take_kinds(self) -> dict[str, int]:
        """{kind: count} since the previous call (skips by kind, and NETWORK_RETRY), and reset."""
        out, self.kinds = self.kinds, {}
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


class BadInputMonitor:
    """Stops a run whose input is mostly bad, in the process that consumes the batches.

        monitor = BadInputMonitor(cfg.data.max_bad_fraction, cfg.data.bad_window)
        for batch in loader:  # a batch carrying its worker's `SkipCounter.take_kinds()` since its previous batch
            monitor.update(len(batch["__key__"]), batch["skipped_by_kind"])  # BadDataError past the threshold

    `update(samples_used, skipped_by_kind)`: the samples a batch used and the skips by kind behind it (what
    `SkipCounter.take_kinds()` returns; NETWORK_RETRY is ignored, every other kind is bad input). It raises
    BadDataError when more than `max_fraction` of the last `window` samples (used + skipped) were bad: over the most
    recent batches that cover `window` samples, or earlier, as soon as the bad ones alone exceed
    `max_fraction * window`. `max_fraction=1` never raises. It sees one process's batches: under several ranks, make
    them stop together (e.g. all-reduce whether any raised), or the others wait in their next collective.
    """

    def __init__(self, max_fraction: float, window: int):
        if not 0 <= max_fraction <= 1:
            raise ValueError(f"max_fraction ({max_fraction}) must be in [0, 1] (data.max_bad_fraction)")
        if window < 1:
            raise ValueError(f"window ({window}) must be >= 1 (data.bad_window)")
        self.max_fraction, self.window = max_fraction, window
        self._batches: collections.deque[tuple[int, dict[str, int]]] = collections.deque()  # (samples, bad by kind)
        self.seen = 0
        """Samples (used + bad) in the batches the window holds now."""
        self.bad_by_kind: dict[str, int] = {}
        """Bad samples by kind in the window."""

    @property
    def bad(self) -> int:
        return sum(self.bad_by_kind.values())

    @property
    def fraction(self) -> float:
        """Bad samples / samples in the window (0 before any sample)."""
        return self.bad / self.seen if self.seen else 0.0

    def update(self, samples_used: int, skipped_by_kind: Mapping[str, int]) -> None:
        bad = {k: int(n) for k, n in skipped_by_kind.items() if k != NETWORK_RETRY and n > 0}
        total = samples_used + sum(bad.values())
        if total <= 0:
            return
        self._batches.append((total, bad))
        self.seen += total
        for k, n in bad.items():
            self.bad_by_kind[k] = self.bad_by_kind.get(k, 0) + n
        while self.seen - self._batches[0][0] >= self.window:  # the newer batches still cover the window
            old_total, old_bad = self._batches.popleft()
            self.seen -= old_total
            for k, n in old_bad.items():
                self.bad_by_kind[k] -= n
                if not self.bad_by_kind[k]:
                    del self.bad_by_kind[k]
        if self.bad > self.max_fraction * max(self.seen, self.window):
            kinds = ", ".join(f"{k}={n}" for k, n in sorted(self.bad_by_kind.items(), key=lambda kv: -kv[1]))
            raise BadDataError(
                f"bad input: {self.bad} of the last {self.seen} samples ({self.fraction:.1%}) were skipped, more "
                f"than data.max_bad_fraction={self.max_fraction} of data.bad_window={self.window} samples allows "
                f"({kinds}); clean the data (the skip warnings name samples and shards) or raise "
                f"data.max_bad_fraction (1 = never stop for bad input)"
            )


# ----------------------------------------------------------------------------------------------- tar -> samples


def _tar_to_samples(stream: IO[bytes], url: str, max_member_bytes: int) -> Iterator[dict[str, Any]]:
    """Samples of one tar stream: members grouped by key (`dir/000042.jpg` + `dir/000042.txt` -> one dict).

    A member over `max_member_bytes` (by its header) is not read: tarfile's stream passes over its bytes in blocks
    of 10 kB when the next member is asked for, and the sample gets `OVERSIZED` (see the module doc).
    Raises whatever the stream or tarfile raise; a sample is yielded only once its last member has been read.
    (webdataset's own reader reports one break through its handler up to twice, so the stream is read here with
    tarfile and webdataset's `base_plus_ext`.)
    """
    sample: dict[str, Any] | None = None
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
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
            if member.size > max_member_bytes:
                sample[OVERSIZED] = "; ".join(filter(None, [sample.get(OVERSIZED), (
                    f"member {Path(member.name).name} is {member.size} bytes, over data.max_member_bytes "
                    f"({max_member_bytes}); passed over unread"
                )]))
                continue
            sample[ext.lower()] = tar.extractfile(member).read()
    if sample is not None:
        yield sample


def _read_stream_tar(
    url: str, counter: SkipCounter, opener: Callable[[], IO[bytes]], max_member_bytes: int
) -> Iterator[dict[str, Any]]:
    """A local file, pipe or gopen URL: one that cannot be opened counts as an unreadable shard, a tar that breaks
    part-way as a broken one (the samples before the break are kept, the one being read is dropped)."""
    try:
        stream = opener()
    except OSError as e:  # FileNotFoundError, PermissionError, IsADirectoryError...
        counter.skip(f"unreadable shard {url}: {e!r}"[:300], UNREADABLE_SHARD)
        return
    try:
        with stream:
            yield from _tar_to_samples(stream, url, max_member_bytes)
    except Exception as e:  # tarfile.ReadError, OSError, EOFError, zlib errors, a pipe's exit status...
        counter.skip(f"broken tar {url}: {e!r}"[:300], BROKEN_TAR)


class _ConnectionBroken(Exception):
    """The http body stream failed part-way: a network failure, not a broken tar."""


class _HttpBody(io.RawIOBase):
    """An http response body that raises _ConnectionBroken when the connection fails or closes early.

    (http.client returns a silent end of data when a connection with a Content-Length closes early; tarfile would
    then report a truncated tar, and a dropped connection would pass for a corrupt shard.)
    """

    def __init__(self, response: http.client.HTTPResponse):
        self.response = response
        length = response.getheader("Content-Length")
        self.expected = int(length) if length and length.isdigit() else None
        self.received = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        try:
            n = self.response.readinto(b)
        except (OSError, http.client.HTTPException) as e:  # reset, timeout, IncompleteRead of a chunked body
            raise _ConnectionBroken(f"connection broke after {self.received} bytes: {e!r}") from e
        if n == 0 and len(b) and self.expected is not None and self.received < self.expected:
            raise _ConnectionBroken(f"connection closed after {self.received} of {self.expected} bytes")
        self.received += n
        return n


def _read_http_tar(
    url: str, counter: SkipCounter, retries: int, backoff_s: float, timeout_s: float, max_member_bytes: int
) -> Iterator[dict[str, Any]]:
    """An http(s) shard with retries (see the module doc); a tar that breaks part-way counts as a broken one."""
    done = 0  # samples of this shard yielded so far: a reopened stream skips them
    last_key: str | None = None
    failures = 0  # failed attempts in a row, since the last one that yielded a new sample
    while True:
        progressed = False
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "mmscale"})
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                body = io.BufferedReader(_HttpBody(response), 1 << 20)
                for i, sample in enumerate(_tar_to_samples(body, url, max_member_bytes)):
                    if i < done:
                        if i == done - 1 and sample["__key__"] != last_key:
                            raise RemoteShardError(
                                f"{url}: changed while it was read: sample {i} was {last_key!r}, is "
                                f"{sample['__key__']!r} after reopening; do not rewrite shards during a run"
                            )
                        continue
                    yield sample
                    done, last_key, progressed = done + 1, sample["__key__"], True
            return
        except RemoteShardError:
            raise
        except (_ConnectionBroken, OSError, http.client.HTTPException) as e:  # URLError, HTTPError, timeouts...
            error = e
            if isinstance(e, urllib.error.HTTPError):
                e.close()
        except Exception as e:  # the bytes arrived whole but are no tar (tarfile.ReadError, zlib errors...)
            counter.skip(f"broken tar {url}: {e!r}"[:300], BROKEN_TAR)
            return
        failures = 1 if progressed else failures + 1
        if failures > retries:
            raise RemoteShardError(
                f"{url}: failed {failures} time(s) in a row (data.http_retries={retries}), after {done} sample(s) "
                f"read; last error: {error}. Check the URL and the server (an HTTP 403/404 is the server refusing "
                f"or lacking the shard), or raise data.http_retries / data.http_backoff_s for a flaky network"
            ) from error
        delay = min(backoff_s * 2 ** (failures - 1), MAX_BACKOFF_S)
        log.warning("%s: network failure (%s), retry %d of %d in %.1f s%s", url, error, failures, retries, delay,
                    f", reading on after its {done} sample(s) already used" if done else "")
        counter.retried()
        time.sleep(delay)


_DEFAULTS = DataConfig()
HTTP_TIMEOUT_S = 60.0
"""Seconds an http(s) connection may stay silent (connecting or reading) before it counts as failed."""
MAX_BACKOFF_S = 60.0
"""The longest wait between two attempts at an http(s) shard, however many retries are allowed."""


def _read_tar(
    url: str,
    counter: SkipCounter,
    allow_pipe: bool = _DEFAULTS.allow_pipe,
    http_retries: int = _DEFAULTS.http_retries,
    http_backoff_s: float = _DEFAULTS.http_backoff_s,
    http_timeout_s: float = HTTP_TIMEOUT_S,
    max_member_bytes: int = _DEFAULTS.max_member_bytes,
) -> Iterator[dict[str, Any]]:
    """Samples of one shard, wherever it is (see the module doc)."""
    if url.startswith(("http://", "https://")):
        return _read_http_tar(url, counter, http_retries, http_backoff_s, http_timeout_s, max_member_bytes)
    if is_pipe(url) and not allow_pipe:
        raise ShardSpecError(pipe_refused(url))  # config validation refuses it first: reaching here is a bug
    if is_pipe(url) or "://" in url:
        return _read_stream_tar(url, counter, lambda: wds.gopen(url, "rb"), max_member_bytes)
    return _read_stream_tar(url, counter, lambda: open(url, "rb"), max_member_bytes)


def tar_samples(
    shards: Iterable[str],
    counter: SkipCounter,
    sample_split: tuple[int, int] | None = None,
    *,
    allow_pipe: bool = _DEFAULTS.allow_pipe,
    http_retries: int = _DEFAULTS.http_retries,
    http_backoff_s: float = _DEFAULTS.http_backoff_s,
    http_timeout_s: float = HTTP_TIMEOUT_S,
    max_member_bytes: int = _DEFAULTS.max_member_bytes,
) -> Iterator[dict[str, Any]]:
    """Raw samples ({"__key__", "__url__", "jpg": bytes, "txt": bytes, ...}) of the shards in order.

    `sample_split=(slot, num_slots)` keeps only samples `slot::num_slots` of the whole stream. `allow_pipe`,
    `http_retries`, `http_backoff_s`, `max_member_bytes`: the `data.` fields of those names (a sample with a member
    over `max_member_bytes` comes without it, marked `OVERSIZED`: decoding skips it). Unreadable and broken shards
    are counted in `counter`; a RemoteShardError (an http shard failing past its retries) propagates.
    """
    samples = (
        s
        for url in shards
        for s in _read_tar(url, counter, allow_pipe, http_retries, http_backoff_s, http_timeout_s, max_member_bytes)
    )
    if sample_split is None:
        yield from samples
        return
    slot, num_slots = sample_split
    for i, sample in enumerate(samples):
        if i % num_slots == slot:
            yield sample
