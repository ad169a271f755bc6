"""A replay buffer that outgrows RAM and survives restarts: raw samples in WebDataset tar shards, an index in RAM.

What it keeps
-------------
`ReservoirBuffer` keeps a uniform random sample of every sample offered to it (`add`), at most its share of
`capacity`: reservoir sampling, Vitter's algorithm R (Vitter, "Random sampling with a reservoir", ACM TOMS 1985).
The t-th sample offered (t = 1, 2, ...) fills the next free slot while there is one; after that it is kept with
probability capacity / t, replacing a uniformly chosen slot. After N offers every offered sample is in the buffer
with probability capacity / N, and the kept set is a uniform random subset of that size.

With `world_size` ranks, each rank keeps its own buffer over the samples it sees (in mmscale, the shards its data
split gives it), of `rank_share(capacity, rank, world_size)` slots: `capacity // world_size`, plus one on the first
`capacity % world_size` ranks, so the shares sum to `capacity` and differ by at most 1. Ranks never communicate.

`balance="class"` (the `cls` member) or `balance="task"` (the `task` member) keep the groups' counts as equal as the
stream allows (class-balanced reservoir sampling, Chrysakis & Moens, "Online continual learning from imbalanced data",
ICML 2020, with "full" read as "largest now"). While there is a free slot the sample takes it. When the buffer is
full, a sample of group g, with m_g of its group stored and n_g of its group offered so far (this one included):

- if g is not a largest group (m_g < max over groups of m), it replaces a uniformly chosen sample of a largest group
  (a largest group chosen uniformly among ties), so the counts move towards equal;
- if g is a largest group, it is kept with probability m_g / n_g, replacing a uniformly chosen sample of its own
  group: algorithm R within the group, so each group's stored samples stay a uniform sample of that group's stream.

Groups that arrive one after another (blocks) therefore end with counts within 1 of each other; a group rarer than
capacity / groups keeps all its samples and the others share the rest. Choosing the group costs O(groups) per offer.

What is stored
--------------
Raw members, not decoded tensors: a sample is a dict {member: bytes | str | int} such as the pipeline's raw samples
({"jpg": bytes, "txt": bytes}), with a `cls` label or a `task` id if wanted. bytes are stored as they are, str as
UTF-8, int as ASCII decimal (WebDataset's `.cls` convention); `__key__` and `__url__`, when given, are kept as the
members `src_key` and `src_url`; other `__`-names are dropped. Member names are lower case (`[a-z0-9_][a-z0-9_.-]*`,
at most 64 characters). What `sample` and `iter_all` return is what WebDataset's tar reader (and
`mmscale.data.reading.tar_samples`) gives: {"__key__": str, member: bytes, ...}, ready for
`mmscale.data.decode.decode_sample`.

On disk, under `directory/rank{r}/`
-----------------------------------
- `replay-000000.tar`, `replay-000001.tar`, ...: WebDataset tar shards (members `r{rank}-{t:012d}.{member}`, t the
  0-based offer number on this rank, unique over the buffer's life; mtime 0, mode 0444). A shard is append-only
  while it is being written (as `replay-NNNNNN.tar.tmp`) and immutable once renamed to its final name. A replaced
  slot's old sample stays in its shard as garbage: replacing a slot writes only the new sample.
- `state.json`: the last committed state, `state_dict()` as JSON. It is the commit point: written as
  `state.json.tmp`, fsynced, renamed. Nothing that a committed state refers to is ever modified.

Only the index lives in RAM: per slot (shard number, byte offset, byte length) of the sample's tar members, 24
bytes in `array('q')`s (40 more in balanced mode: group, position in it, the group's slot list), per shard a few
counters, two RNG states. `state_dict()` carries these arrays as base64 strings (32 characters per slot). Samples
are read back from disk by offset when `sample` or `iter_all` asks for them.

`commit()`:

1. The shard being written is finished (two zero blocks), fsynced and renamed to its final name (or deleted if
   every sample in it has been replaced meanwhile). A shard is also finished when it reaches `shard_bytes`.
2. Compaction, when garbage (bytes of replaced samples) exceeds `compact_garbage` (default 0.5) of the data bytes in
   the shards the index uses: every shard whose own garbage exceeds that fraction has its live samples copied, byte
   for byte, into new shards, and the index points there. After a commit every shard is at most that fraction
   garbage, so the shards in use hold at most 1 / (1 - compact_garbage) times the live bytes (2x by default); the
   shards kept for earlier commits (step 4) come on top.
   A slot is never rewritten in place; compaction copies amortise over the many replacements that made the garbage.
3. `state.json` is written atomically (temporary file, fsync, rename, directory fsync): the commit point.
4. Shards that neither the new state nor the `keep_commits - 1` commits before it (default 3 in all) refer to are
   deleted, as are temporary files. With `keep_commits=None` no shard is ever deleted.

A crash at any point leaves the last committed state whole: a new `ReservoirBuffer` over the directory opens
`state.json` and deletes the temporary files and shards it does not refer to. `state_dict()` commits first, so the
state it returns is always on disk. `load_state_dict(sd)` makes `sd` the committed state of the directory (so a
resume from an older checkpoint is consistent on disk too); it needs the shards `sd` refers to, which are kept as
long as `sd` is among the last `keep_commits` commits: with one commit per trainer checkpoint, set `keep_commits`
to at least the number of checkpoints a resume may fall back to, plus one for a checkpoint that failed half way
through saving after its commit (the default 3 fits the trainer's default `train.keep_checkpoints=2`).

Restarts are exact: the state holds the offer count, both RNG states (the decision RNG and the default draw RNG of
`sample`) and the index, so a buffer restored from `state_dict()` (or reopened from its last commit) holds the
same bytes and makes the same decisions and draws as one that never stopped. Commits and compaction change where
the bytes lie, never which samples are kept or drawn.

One object per rank directory at a time: two writers over the same `rank{r}/` would corrupt each other. Do not
`add` or `commit` while iterating `iter_all()`.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import re
import sys
import tarfile
from array import array
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
SHARD_PREFIX = "replay"
FORMAT_VERSION = 1
BALANCE_MEMBERS = {"class": "cls", "task": "task"}
"""`balance` -> the member whose value is the group."""

_BLOCK = 512
_END_OF_ARCHIVE = b"\0" * (2 * _BLOCK)
_MEMBER_RE = re.compile(r"[a-z0-9_][a-z0-9_.-]{0,63}\Z")
_SHARD_RE = re.compile(rf"{SHARD_PREFIX}-(\d{{6,}})\.tar\Z")
_RENAMED = {"__key__": "src_key", "__url__": "src_url"}
_RENAMED_FROM = {v: k for k, v in _RENAMED.items()}


def rank_share(capacity: int, rank: int, world_size: int) -> int:
    """Slots of `rank`: capacity // world_size, plus 1 on the first capacity % world_size ranks."""
    return capacity // world_size + (1 if rank < capacity % world_size else 0)


def shard_file_name(number: int) -> str:
    return f"{SHARD_PREFIX}-{number:06d}.tar"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _raise_named(e: OSError, path: Path) -> NoReturn:
    """Raise `e` naming `path`: a buffered write's, a flush's or an fsync's error names no file (`[Errno 28] No space
    left on device`). An error that names a file already, or carries no errno, is raised as it is."""
    if e.filename is None and e.errno is not None:
        raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) from e
    raise e


def _write_json_atomic(path: Path, obj: Any) -> None:
    """`path` holds `obj` whole, or what it held before: a temporary file, fsync, rename, directory fsync."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            _raise_named(e, tmp)
        raise
    _fsync_dir(path.parent)


def _pack(a: array) -> str:
    """An int64 array as base64 of its little-endian bytes: a compact plain value for state dicts and JSON."""
    if sys.byteorder == "big":
        a = array("q", a)
        a.byteswap()
    return base64.b64encode(a.tobytes()).decode("ascii")


def _unpack(text: str) -> array:
    a = array("q")
    a.frombytes(base64.b64decode(text))
    if sys.byteorder == "big":
        a.byteswap()
    return a


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss_next = rng.getstate()
    return [version, list(internal), gauss_next]


def _set_rng_state(rng: random.Random, state: list) -> None:
    version, internal, gauss_next = state
    rng.setstate((version, tuple(internal), gauss_next))


def _encode_members(sample: Mapping[str, Any]) -> list[tuple[str, bytes]]:
    """The sample's members as (name, bytes), sorted by name; raises ValueError/TypeError on what cannot be stored."""
    if not isinstance(sample, Mapping):
        raise TypeError(f"a sample is a dict {{member: bytes | str | int}}, got {type(sample).__name__}")
    members = []
    for name, value in sample.items():
        if not isinstance(name, str):
            raise TypeError(f"member names are str, got {name!r}")
        if name.startswith("__"):
            if name not in _RENAMED:
                continue  # webdataset metadata (__local_path__, ...)
            name = _RENAMED[name]
            if name in sample:
                raise ValueError(f"sample has both a {_RENAMED_FROM[name]!r} and a {name!r} member; rename one")
        elif not _MEMBER_RE.match(name):
            raise ValueError(
                f"member name {name!r}: use lower case letters, digits, '_', '.', '-' (at most 64 characters, not "
                f"starting with '.' or '-'), as WebDataset extensions (e.g. 'jpg', 'txt', 'cls')"
            )
        if isinstance(value, bool) or not isinstance(value, (bytes, bytearray, memoryview, str, int)):
            raise TypeError(
                f"member {name!r}: {type(value).__name__} cannot be stored; give bytes (e.g. the encoded image), "
                f"str (caption) or int (class / task id)"
            )
        if isinstance(value, str):
            data = value.encode("utf-8")
        elif isinstance(value, int):
            data = str(value).encode("ascii")
        else:
            data = bytes(value)  # bytes: no copy
        members.append((name, data))
    if not members:
        raise ValueError(f"sample has no member to store (keys: {sorted(sample)})")
    members.sort()
    return members


def _group_key(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", errors="replace").strip()
    return str(value).strip()


def _parse_sample(chunk: bytes, where: str) -> dict[str, Any]:
    """One sample's tar members (headers + data + padding, as written by `_ShardWriter.write`) -> raw sample."""
    sample: dict[str, Any] = {}
    pos = 0
    try:
        while pos < len(chunk):
            info = tarfile.TarInfo.frombuf(chunk[pos : pos + _BLOCK], "utf-8", "surrogateescape")
            pos += _BLOCK
            key, _, member = info.name.partition(".")
            data = chunk[pos : pos + info.size]
            if len(data) != info.size or sample.setdefault("__key__", key) != key:
                raise ValueError(f"member {info.name!r} truncated or of another sample")
            sample[member] = data
            pos += info.size + (-info.size % _BLOCK)
    except (tarfile.TarError, ValueError) as e:
        raise OSError(f"replay buffer: unreadable sample at {where}: {e}; the shard is damaged") from None
    if not sample:
        raise OSError(f"replay buffer: empty sample at {where}; the shard is damaged")
    return sample


class _ShardWriter:
    """The shard being appended to: `replay-NNNNNN.tar.tmp` until `finish()` renames it."""

    def __init__(self, directory: Path, number: int):
        self.number = number
        self.path = directory / shard_file_name(number)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.file: BinaryIO = open(self.tmp, "wb")
        self.size = 0

    def write(self, key: str, members: list[tuple[str, bytes]]) -> tuple[int, int]:
        """Append one sample's members; returns (offset, length) of its bytes in the shard."""
        offset = self.size
        for name, data in members:
            info = tarfile.TarInfo(f"{key}.{name}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            self._put(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
            self._put(data)
            self._put(b"\0" * (-len(data) % _BLOCK))
        return offset, self.size - offset

    def copy(self, chunk: bytes) -> int:
        """Append one sample's bytes as read from another shard (compaction); returns their offset here."""
        offset = self.size
        self._put(chunk)
        return offset

    def _put(self, data: bytes) -> None:
        try:
            self.file.write(data)
        except OSError as e:  # (a full disk: the buffer stops, see `add`)
            _raise_named(e, self.tmp)
        self.size += len(data)

    def flush(self) -> None:
        self.file.flush()

    def finish(self) -> int:
        """End the tar, make it durable, rename it to its final name; returns the file size."""
        self._put(_END_OF_ARCHIVE)
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as e:
            _raise_named(e, self.tmp)
        self.file.close()
        os.replace(self.tmp, self.path)
        _fsync_dir(self.path.parent)
        return self.size

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


class ReservoirBuffer:
    """Reservoir sample (algorithm R, or class-/task-balanced) of the samples offered on this rank, kept on disk.

    Args:
        directory: the buffer's folder (shared by all ranks; this rank uses `directory/rank{rank}/`). If it holds a
            committed state, the buffer opens it (refused if it was made with other arguments).
        capacity: slots over all ranks; this rank keeps `rank_share(capacity, rank, world_size)` of them.
        rank, world_size: this rank among `world_size` (passed in, never read from torch.distributed).
        seed: seeds this rank's decision RNG and the default draw RNG of `sample` (with the rank).
        balance: None (uniform), "class" (groups by the `cls` member) or "task" (by the `task` member).
        shard_bytes: a shard is finished once it holds this many bytes (and at every commit).
        compact_garbage: compaction threshold, a fraction in (0, 1] of the shards' data bytes (see the module doc);
            1.0 never compacts.
        keep_commits: shards are kept while any of the last `keep_commits` committed states refers to them; None
            keeps every shard.

    See the module doc for the sampling rules, the on-disk format and the commit protocol.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        capacity: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        balance: str | None = None,
        *,
        shard_bytes: int = 256 << 20,
        compact_garbage: float = 0.5,
        keep_commits: int | None = 3,
    ):
        problems = []
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            problems.append(f"capacity must be an integer >= 1, got {capacity!r}")
        if not isinstance(world_size, int) or world_size < 1:
            problems.append(f"world_size must be an integer >= 1, got {world_size!r}")
        elif not isinstance(rank, int) or not 0 <= rank < world_size:
            problems.append(f"rank ({rank!r}) must be in [0, world_size ({world_size}))")
        if not isinstance(seed, int):
            problems.append(f"seed must be an integer, got {seed!r}")
        if balance is not None and balance not in BALANCE_MEMBERS:
            problems.append(f"balance must be None, 'class' or 'task', got {balance!r}")
        if not isinstance(shard_bytes, int) or shard_bytes < 1:
            problems.append(f"shard_bytes must be an integer >= 1, got {shard_bytes!r}")
        if not isinstance(compact_garbage, (int, float)) or not 0 < compact_garbage <= 1:
            problems.append(f"compact_garbage must be a fraction in (0, 1] (1: never compact), got {compact_garbage!r}")
        if keep_commits is not None and (not isinstance(keep_commits, int) or keep_commits < 1):
            problems.append(f"keep_commits must be None (keep every shard) or an integer >= 1, got {keep_commits!r}")
        if problems:
            raise ValueError("ReservoirBuffer: " + "; ".join(problems))
        self.root = Path(directory)
        self.directory = self.root / f"rank{rank}"
        self.total_capacity, self.rank, self.world_size, self.seed = capacity, rank, world_size, seed
        self.capacity = rank_share(capacity, rank, world_size)
        """This rank's slots."""
        self.balance = balance
        self.shard_bytes, self.compact_garbage, self.keep_commits = shard_bytes, float(compact_garbage), keep_commits
        self._member = BALANCE_MEMBERS[balance] if balance else None
        self._active: _ShardWriter | None = None
        self._failed: BaseException | None = None
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fresh()
        state_file = self.directory / STATE_FILE
        self._dirty = True  # a new buffer's first commit writes its (empty) state
        if state_file.is_file():
            self._apply(json.loads(state_file.read_text()), f"{state_file}")
            self._dirty = False
            log.info("replay buffer rank %d: opened %s (%d samples of %d offered, commit %d)",
                     rank, state_file, len(self), self._seen, self._generation)
        self._collect_garbage()  # what a crashed run left: temporary files, shards no committed state refers to

    # ------------------------------------------------------------------------------------------- state in RAM

    def _fresh(self) -> None:
        self._seen = 0
        self._rng = random.Random(f"mmscale-replay-{self.seed}-{self.rank}-decide")  # str seed: SHA-512, stable
        self._draw_rng = random.Random(f"mmscale-replay-{self.seed}-{self.rank}-draw")
        # slot -> where its sample's tar members lie: shard number, byte offset, byte length
        self._shard, self._offset, self._length = array("q"), array("q"), array("q")
        self._sizes: dict[int, int] = {}  # finished shard -> file size
        self._live: dict[int, int] = {}  # shard -> bytes of samples the index refers to
        self._dead: dict[int, int] = {}  # shard -> bytes of replaced samples (garbage)
        self._next_shard = 0
        self._generation = 0
        self._history: list[list] = []  # [[generation, [shard numbers it refers to]], ...], the last keep_commits
        # balanced mode: groups in first-seen order
        self._group_index: dict[str, int] = {}
        self._group_keys: list[str] = []
        self._group_seen: list[int] = []  # offered per group
        self._members: list[array] = []  # group -> its slots (order matters: victims are chosen by position)
        self._slot_group = array("q")  # slot -> group
        self._slot_pos = array("q")  # slot -> position in its group's list

    def __len__(self) -> int:
        return len(self._shard)

    @property
    def seen(self) -> int:
        """Samples offered to this rank's buffer so far."""
        return self._seen

    def group_counts(self) -> dict[str, int]:
        """{group: samples stored} in balanced mode (groups in first-seen order); {} otherwise."""
        return {k: len(m) for k, m in zip(self._group_keys, self._members)}

    def stats(self) -> dict[str, int]:
        """Sizes for logging: samples, offers, shards in use, live and garbage bytes in them, commits."""
        return {
            "samples": len(self),
            "seen": self._seen,
            "shards": len(self._live),
            "live_bytes": sum(self._live.values()),
            "garbage_bytes": sum(self._dead.values()),
            "commits": self._generation,
        }

    # ------------------------------------------------------------------------------------------- adding

    def add(self, sample: Mapping[str, bytes | str | int]) -> bool:
        """Offer one sample; returns whether it was stored. Validated before anything changes (ValueError,
        TypeError); an I/O error leaves the object unusable (reopen or `load_state_dict`) and the disk at the last
        commit."""
        self._check_usable()
        members = _encode_members(sample)
        group = -1
        if self._member is not None:
            if self._member not in sample:
                raise ValueError(
                    f"balance={self.balance!r} needs a {self._member!r} member in every sample; this one has "
                    f"{sorted(sample)}"
                )
            group_key = _group_key(sample[self._member])
        try:
            self._seen += 1
            self._dirty = True
            if self._member is not None:
                group = self._group_id(group_key)
                self._group_seen[group] += 1
            slot = self._decide(group)
            if slot < 0:
                return False
            key = f"r{self.rank}-{self._seen - 1:012d}"
            writer = self._writer()
            offset, length = writer.write(key, members)
            self._live[writer.number] = self._live.get(writer.number, 0) + length
            self._place(slot, writer.number, offset, length, group)
            if writer.size >= self.shard_bytes:
                self._finish_active()
        except BaseException as e:
            self._failed = e
            raise
        return True

    def _decide(self, group: int) -> int:
        """The slot the current (the `seen`-th) sample goes to, or -1 to drop it. Uses only `self._rng`."""
        n, t = len(self), self._seen
        if n < self.capacity:
            return n
        if group < 0:  # algorithm R: kept with probability capacity / t, into a uniform slot
            j = self._rng.randrange(t)
            return j if j < self.capacity else -1
        counts = [len(m) for m in self._members]
        largest = max(counts)
        if counts[group] < largest:  # evict from a largest group
            tied = [g for g, c in enumerate(counts) if c == largest]
            victim_group = tied[self._rng.randrange(len(tied))]
            return self._members[victim_group][self._rng.randrange(largest)]
        j = self._rng.randrange(self._group_seen[group])  # algorithm R within the group
        return self._members[group][j] if j < counts[group] else -1

    def _group_id(self, key: str) -> int:
        gid = self._group_index.get(key)
        if gid is None:
            gid = self._group_index[key] = len(self._group_keys)
            self._group_keys.append(key)
            self._group_seen.append(0)
            self._members.append(array("q"))
        return gid

    def _place(self, slot: int, shard: int, offset: int, length: int, group: int) -> None:
        if slot == len(self):
            self._shard.append(shard)
            self._offset.append(offset)
            self._length.append(length)
            if group >= 0:
                self._slot_group.append(group)
                self._slot_pos.append(len(self._members[group]))
                self._members[group].append(slot)
            return
        old, old_length = self._shard[slot], self._length[slot]
        self._live[old] -= old_length
        if self._live[old] == 0 and (self._active is None or old != self._active.number):
            del self._live[old]  # no slot refers to it: out of the index (its file goes when no commit needs it)
            self._dead.pop(old, None)
            self._sizes.pop(old, None)
        else:
            self._dead[old] = self._dead.get(old, 0) + old_length
        self._shard[slot], self._offset[slot], self._length[slot] = shard, offset, length
        if group >= 0 and self._slot_group[slot] != group:
            members = self._members[self._slot_group[slot]]  # swap-remove the slot from its old group
            pos, last = self._slot_pos[slot], members[-1]
            members[pos] = last
            self._slot_pos[last] = pos
            members.pop()
            self._slot_group[slot] = group
            self._slot_pos[slot] = len(self._members[group])
            self._members[group].append(slot)

    def _writer(self) -> _ShardWriter:
        if self._active is None:
            self._active = _ShardWriter(self.directory, self._next_shard)
            self._next_shard += 1
        return self._active

    def _finish_active(self) -> None:
        w, self._active = self._active, None
        if w is None:
            return
        if self._live.get(w.number, 0) == 0:  # every sample in it was replaced already: nothing refers to it
            w.discard()
            self._live.pop(w.number, None)
            self._dead.pop(w.number, None)
            return
        self._sizes[w.number] = w.finish()

    # ------------------------------------------------------------------------------------------- reading

    def sample(self, n: int, rng: random.Random | None = None) -> list[dict[str, Any]]:
        """`n` raw samples drawn uniformly, independently (with replacement), from this rank's buffer.

        `rng` (a `random.Random`) makes the draws; by default the buffer's own draw RNG, whose state is part of
        `state_dict()`, so draws after a restart are those of an uninterrupted run.
        """
        self._check_usable()
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n and not len(self):
            raise ValueError(f"replay buffer rank {self.rank} is empty ({self._seen} offered); cannot draw {n}")
        if rng is None:
            rng = self._draw_rng
            self._dirty = self._dirty or n > 0
        slots = [rng.randrange(len(self)) for _ in range(n)]
        return self._read(slots)

    def iter_all(self) -> Iterator[dict[str, Any]]:
        """Every stored raw sample, in slot order. Do not add or commit while iterating."""
        self._check_usable()
        batch = 256
        for start in range(0, len(self), batch):
            yield from self._read(range(start, min(start + batch, len(self))))

    def _read(self, slots: Iterable[int]) -> list[dict[str, Any]]:
        """The samples in `slots`, in that order; each distinct slot read once, in disk order."""
        slots = list(slots)
        if self._active is not None:
            self._active.flush()
        got: dict[int, dict[str, Any]] = {}
        files: dict[int, BinaryIO] = {}
        try:
            for slot in sorted(set(slots), key=lambda s: (self._shard[s], self._offset[s])):
                shard = self._shard[slot]
                f = files.get(shard)
                if f is None:
                    f = files[shard] = open(self._shard_path(shard), "rb")
                f.seek(self._offset[slot])
                chunk = f.read(self._length[slot])
                got[slot] = _parse_sample(chunk, f"{f.name} offset {self._offset[slot]}")
        finally:
            for f in files.values():
                f.close()
        return [dict(got[s]) for s in slots]

    def _shard_path(self, number: int) -> Path:
        if self._active is not None and number == self._active.number:
            return self._active.tmp
        return self.directory / shard_file_name(number)

    # ------------------------------------------------------------------------------------------- commit

    def commit(self) -> None:
        """Make the current state durable: finish the shard being written, compact if due, write `state.json`
        atomically, delete shards no retained commit refers to. A no-op when nothing changed since the last one.
        If it raises, the disk holds the previous commit and this object is unusable (reopen to continue)."""
        self._check_usable()
        if not self._dirty:
            return
        try:
            self._finish_active()
            if self._compaction_due():
                self._compact()
            self._generation += 1
            self._history.append([self._generation, sorted(self._live)])
            if self.keep_commits is not None:
                del self._history[: -self.keep_commits]
            _write_json_atomic(self.directory / STATE_FILE, self._state())
        except BaseException as e:
            self._failed = e
            raise
        self._dirty = False
        self._collect_garbage()

    def _compaction_due(self) -> bool:
        dead = sum(self._dead.values())
        return dead > 0 and dead > self.compact_garbage * (dead + sum(self._live.values()))

    def _compact(self) -> None:
        sparse = {
            no for no, dead in self._dead.items()
            if dead > self.compact_garbage * (dead + self._live[no])
        }
        moving = sorted((s for s in range(len(self)) if self._shard[s] in sparse),
                        key=lambda s: (self._shard[s], self._offset[s]))
        files: dict[int, BinaryIO] = {}
        try:
            for slot in moving:
                old, length = self._shard[slot], self._length[slot]
                if old not in files:
                    files[old] = open(self._shard_path(old), "rb")
                files[old].seek(self._offset[slot])
                chunk = files[old].read(length)
                if len(chunk) != length:
                    raise OSError(f"replay buffer: {files[old].name} is shorter than its index says; damaged")
                writer = self._writer()
                self._offset[slot] = writer.copy(chunk)
                self._shard[slot] = writer.number
                self._live[writer.number] = self._live.get(writer.number, 0) + length
                self._live[old] -= length
                if writer.size >= self.shard_bytes:
                    self._finish_active()
            self._finish_active()
        finally:
            for f in files.values():
                f.close()
        for no in sparse:  # nothing refers to them now; the files stay while a retained commit does
            del self._live[no], self._dead[no], self._sizes[no]
        log.info("replay buffer rank %d: compacted %d shard(s), moved %d samples", self.rank, len(sparse), len(moving))

    def _collect_garbage(self) -> None:
        """Delete temporary files and the shards that neither the index nor a retained commit refers to."""
        keep = set(self._live)
        for _, shards in self._history:
            keep.update(shards)
        active = self._active.tmp.name if self._active is not None else None
        for path in self.directory.iterdir():
            m = _SHARD_RE.match(path.name)
            if (m and int(m.group(1)) not in keep) or (path.name.endswith(".tmp") and path.name != active):
                path.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------- state_dict

    def state_dict(self) -> dict[str, Any]:
        """The buffer's state as plain values (JSON- and `torch.load(weights_only=True)`-safe): arguments, counters,
        RNG states, index, shard sizes, retained commits. Commits first, so it is what `state.json` holds."""
        self.commit()
        return self._state()

    def _state(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "rank": self.rank,
            "world_size": self.world_size,
            "capacity": self.total_capacity,
            "seed": self.seed,
            "balance": self.balance,
            "seen": self._seen,
            "generation": self._generation,
            "next_shard": self._next_shard,
            "rng": _rng_state(self._rng),
            "draw_rng": _rng_state(self._draw_rng),
            "slots": len(self),
            # slot -> shard number, byte offset, byte length; int64 arrays as base64 (see _pack)
            "index": {"shard": _pack(self._shard), "offset": _pack(self._offset), "length": _pack(self._length)},
            # [number, file size, garbage bytes] of every shard the index refers to
            "shards": [[no, self._sizes[no], self._dead.get(no, 0)] for no in sorted(self._live)],
            "history": [[gen, list(shards)] for gen, shards in self._history],
            "groups": None if self._member is None else {
                "keys": list(self._group_keys),
                "seen": list(self._group_seen),
                "members": [_pack(m) for m in self._members],  # group -> its slots
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state` (from `state_dict()`) and make it the directory's committed state: uncommitted work and
        shards written after it are discarded. Refused (ValueError) if it was made with other arguments; OSError if
        a shard it refers to is missing or of the wrong size."""
        self._apply(state, "the given state")
        try:
            _write_json_atomic(self.directory / STATE_FILE, self._state())
        except BaseException as e:  # RAM holds `state`, the disk another one: unusable until reopened
            self._failed = e
            raise
        self._dirty = False
        self._failed = None
        self._collect_garbage()

    def _apply(self, state: Mapping[str, Any], source: str) -> None:
        """Replace the in-RAM state by `state`, after checking it fits these arguments and the files on disk."""
        mine = {"rank": self.rank, "world_size": self.world_size, "capacity": self.total_capacity,
                "seed": self.seed, "balance": self.balance}
        wrong = [f"{k} is {state.get(k)!r} there, {v!r} here" for k, v in mine.items() if state.get(k) != v]
        if state.get("format") != FORMAT_VERSION:
            wrong.append(f"format is {state.get('format')!r} there, {FORMAT_VERSION} here")
        if wrong:
            raise ValueError(
                f"replay buffer {self.directory}: {source} was made with other arguments ({'; '.join(wrong)}); "
                f"construct the buffer with the same arguments, or use another directory for a new buffer"
            )
        index = state["index"]
        shard, offset, length = (_unpack(index[k]) for k in ("shard", "offset", "length"))
        sizes = {int(no): int(size) for no, size, _ in state["shards"]}
        dead = {int(no): int(d) for no, _, d in state["shards"] if d}
        live: dict[int, int] = {}
        for no, ln in zip(shard, length):
            live[no] = live.get(no, 0) + ln
        problems = []
        for no in sorted(live):
            path = self.directory / shard_file_name(no)
            if no not in sizes:
                problems.append(f"{path.name} has no recorded size")
            elif not path.is_file():
                problems.append(f"{path.name} is missing")
            elif path.stat().st_size != sizes[no]:
                problems.append(f"{path.name} has {path.stat().st_size} bytes, not {sizes[no]}")
        if problems:
            raise OSError(
                f"replay buffer {self.directory}: {source} (commit {state['generation']}, {state['seen']} offered) "
                f"does not match the shards on disk: {'; '.join(problems[:5])}. A state older than the last "
                f"keep_commits ({self.keep_commits}) commits has lost its shards; resume from a newer one"
            )
        if self._active is not None:  # uncommitted work of the state being replaced
            self._active.discard()
            self._active = None
        self._fresh()
        self._seen, self._generation = int(state["seen"]), int(state["generation"])
        self._next_shard = int(state["next_shard"])
        _set_rng_state(self._rng, state["rng"])
        _set_rng_state(self._draw_rng, state["draw_rng"])
        self._shard, self._offset, self._length = shard, offset, length
        self._live, self._sizes = live, {no: sizes[no] for no in live}
        self._dead = {no: dead.get(no, 0) for no in live}
        self._history = [[int(gen), [int(s) for s in shards]] for gen, shards in state["history"]]
        groups = state["groups"]
        if self._member is not None:
            self._group_keys = list(groups["keys"])
            self._group_index = {k: g for g, k in enumerate(self._group_keys)}
            self._group_seen = [int(n) for n in groups["seen"]]
            self._members = [_unpack(m) for m in groups["members"]]
            self._slot_group = array("q", bytes(8 * len(self._shard)))
            self._slot_pos = array("q", bytes(8 * len(self._shard)))
            for g, members in enumerate(self._members):
                for pos, slot in enumerate(members):
                    self._slot_group[slot], self._slot_pos[slot] = g, pos

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise RuntimeError(
                f"replay buffer {self.directory}: an earlier write or commit failed ({self._failed!r}); the disk holds "
                f"the last commit: construct a new ReservoirBuffer over the directory (or call load_state_dict) to "
                f"continue from it"
            )
