"""The streaming data pipeline: shards -> samples -> pixels and tokens -> batches, one visible stage at a time.

Per rank, per data-loader worker ("slot"), per epoch (`_SlotStream._epoch_samples` runs them in this order):

1. shard list         `resolve_shards(spec)`: brace pattern, directory or list file (mmscale.data.shards)
2. shard shuffle      `shuffle_shards`: a permutation seeded by (seed, epoch), the same on every rank
3. split              `split_shards`: by rank, then by worker (rank and world size are passed in, never read from
                      torch.distributed); with fewer shards than ranks x workers, every slot reads all shards and
                      keeps every (ranks x workers)-th sample of each
4. tar -> samples     `tar_samples` (mmscale.data.reading), one shard ("piece") at a time: members grouped by key;
                      a broken tar is counted once, reading goes on; a member over `data.max_member_bytes` is
                      passed over unread
5. block shuffle      the slot's raw samples are cut into consecutive blocks of `shuffle_buffer`; each block is
                      permuted by an RNG seeded by (seed, epoch, rank, worker, pass, block)
6. decode + transform `decode_sample` (mmscale.data.decode): image -> resize shorter side, centre crop, normalise;
                      caption and label checked (a label must be below `num_classes`, model.num_classes)
7. tokenize           `caption_to_ids`: [<image>] + caption tokens (truncated) + [eos]
8. batch + collate    `mmscale.data.collate.collate_samples`, inside the worker, so only tensors cross processes

Corrupt samples (undecodable image, missing or empty caption, broken tar) are skipped and counted (`SkipCounter`);
each batch carries the count of its worker since its previous batch, and the loader logs a warning for the first
skip and then every `warn_every` skips.

Step counts and ordering guarantees
-----------------------------------
- `steps_per_epoch = samples_per_epoch // (micro_batch_size * world_size)`, with samples_per_epoch from
  `DataConfig.num_samples` or the shards' `sizes.json`. Every rank yields exactly that many micro-batches per
  epoch, whatever the shard sizes, so collectives never hang on an uneven split.
- Micro-batch i of an epoch comes from worker `i % num_workers` (the DataLoader's round robin). Each worker fills
  exactly its share of batches: if its shards run dry first it starts another pass over them (reshuffled, logged);
  what it has not used when its share is full is dropped for this epoch.
- Hence every sample is seen exactly once per epoch when each (rank, worker) slot holds exactly
  (its batch share x micro_batch_size) samples: e.g. equal shards, shard count divisible by world_size x workers,
  and samples per slot divisible by micro_batch_size, with steps_per_epoch divisible by num_workers.
- Same (shards, seed, epoch, rank, world_size, num_workers, micro_batch_size, DataConfig) -> identical batches
  in identical order. Different world sizes or worker counts give different (equally valid) orders: a 2-rank
  run does not see the batches of a 1-rank run with twice the micro batch.
- The block shuffle mixes samples only within `shuffle_buffer` consecutive raw samples of a slot (the shard order
  is shuffled too): unlike a streaming shuffle buffer, its content at any point is known from the position alone.

Positions and resuming
----------------------
- A slot's position in an epoch is (pass, raw, piece, sample): `raw` samples of the pass consumed (skipped corrupt
  ones included), and the coordinate (piece = index in the pass's shard list, sample = index in that shard) where
  the block holding raw sample `raw` starts. Every batch carries its worker's position after it; the loader's
  `state_dict()` holds, besides (epoch, batch_in_epoch), each logical worker's latest one.
- Resuming (`load_state_dict`) costs at most one block, wherever the position: a worker opens no shard before
  `piece` (nor, with a sizes.json, any shard of the partly read block all of whose samples there were consumed),
  passes over the first `sample` samples of that shard as raw tar members, reads the block raw, and decodes only the
  samples after `raw`. Resumed batches are identical to an uninterrupted run's (same world size and workers).
  A checkpoint without positions (written before they existed) resumes by reading and decoding each worker's
  batches before the resume point, as before.
- Another world size or worker count: `load_state_dict(sd, all_ranks=[every old rank's state_dict()])` (only
  this rank's own for a changed worker count alone). The rest of the interrupted epoch is what every old slot had
  not read in its first pass: the rest of its shards from the start of its partly read block, less that block's
  samples already consumed (known from the block's permutation and the sizes.json counts). It is spread over the
  new slots in proportion to the batches each still makes, in the new layout's epoch at batch
  `old batch * old world size // new world size` (a "plan", kept in the state until that epoch ends); every rank
  still steps `steps_per_epoch` times per epoch. Nothing is lost when the rest of the epoch fits those batches
  (it does when the epoch's samples fill its steps exactly, the exactly-once case above); what may repeat: the
  samples a slot reads again when its part runs dry (e.g. those of the batch rounded away in
  `old batch * old world size // new world size`). It needs every shard's count (sizes.json); a broken tar in a
  partly read block can make that block's consumed samples miscounted (some repeat or are missed).
- A resume with another seed, micro batch, epoch size, shuffle_buffer, shard count, resampled mode or sources is
  refused (`resume_problems`, with the fix): the positions would not mean the same samples.

Endless modes: resampled shards and mixtures
--------------------------------------------
- `data.resampled`: each slot draws shards with replacement forever (draw d of slot (rank, worker): an RNG seeded
  by (seed, rank, worker, d), like webdataset's ResampledShards) and block-shuffles the drawn samples. Its
  position is (draws, sample in the shard, raw) and resumes in constant time too. Epochs are nominal
  (`steps_per_epoch` for logging); batch g of the whole stream comes from worker `g % num_workers`.
- `data.sources`: a mixture. Sample n of a slot comes from source i, drawn with the sources' weights by an RNG
  seeded by (seed, rank, worker, n // 1024); each source is a stream of its own (its own shard shuffle, split,
  block shuffle and epochs: a source that runs out on a slot starts its next epoch there, independently of the
  others), or a resampled one with `data.resampled`. A slot's position: n and each source's (epoch, raw, piece,
  sample). Samples per epoch: `data.num_samples`, or else the sum of every source's sizes.json counts; nominal, as
  in resampled mode.
- On another world size or worker count: resampled sources go on at the next draw (past every old slot's), and each
  epoch-based source's unread rest of every old slot's current epoch is spread evenly over the new slots (a plan
  epoch of that source) before its next epoch begins: nothing of a source's epoch in progress is lost.

Worker processes
----------------
- A `TrainLoader` starts one set of `num_workers` processes per `iter()` and keeps them for every epoch after:
  each worker streams epoch after epoch itself. Batch g of the endless stream (epoch g // steps_per_epoch) comes
  from DataLoader worker g % num_workers (counted from the first batch of this `iter()`), which plays, in each
  epoch, the worker that batch belongs to above; so the order is the same whether steps_per_epoch is divisible by
  num_workers or not, and the same as with a fresh set of workers per epoch.
- An `EvalLoader` starts its workers for each pass and stops them at its end.
- `close()` (or leaving a `with` block, or dropping the iterator) shuts the workers down at once; iterating again
  afterwards starts a fresh set at the loader's position.
- Each batch also reports the work behind it: the loader sums the samples its workers decoded (`num_decoded`) and
  the shards they opened (`shards_opened`, a Counter of shard names) for the batches it yielded.
"""

from __future__ import annotations

import collections
import copy
import itertools
import logging
import random
import signal
import weakref
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmscale.config import DataConfig
from mmscale.data.collate import collate_samples
from mmscale.data.decode import (  # noqa: F401  (re-exported: stages 6-7)
    caption_to_ids, decode_for_training, decode_sample, image_to_tensor, raw_members,
)
from mmscale.data.reading import (  # noqa: F401  (re-exported: stage 4 and skip counting)
    SampleError, SkipCounter, SkipWarner, tar_samples,
)
from mmscale.data.shards import read_sizes, resolve_shards
from mmscale.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MIX_CHUNK = 1024
"""A mixture draws its sources' labels in chunks of this many samples (one RNG per chunk): constant-time resume."""
_MAX_EMPTY_DRAWS = 1000
_MAX_BAD_RUN = 10_000


# ----------------------------------------------------------------------------------------------- stages 2-3


def _rng(*parts: Any) -> random.Random:
    # A str seed is hashed with SHA-512 by `random`: stable across processes and Python runs.
    return random.Random("mmscale-data-" + "-".join(map(str, parts)))


def shuffle_shards(shards: Sequence[str], seed: int | str, epoch: int) -> list[str]:
    """Permutation of `shards` seeded by (seed, epoch): the same on every rank, so the split stays a partition."""
    out = list(shards)
    _rng(seed, epoch, "shards").shuffle(out)
    return out


def split_shards(
    shards: Sequence[str], rank: int, world_size: int, worker: int, num_workers: int
) -> tuple[list[str], tuple[int, int] | None]:
    """This (rank, worker) slot's shards, and a sample-level split `(slot, num_slots)` or None.

    With at least world_size x num_workers shards, slot (rank, worker) reads `shards[rank::world_size][worker::
    num_workers]` (webdataset's split_by_node then split_by_worker). With fewer, every slot reads all shards and
    keeps samples `slot::num_slots` of each: each tar is then read by every slot, but no slot is left without data.
    """
    num_slots = world_size * num_workers
    if len(shards) >= num_slots:
        return list(shards)[rank::world_size][worker::num_workers], None
    return list(shards), (rank * num_workers + worker, num_slots)


# ----------------------------------------------------------------------------------------------- pieces
# A piece is (url, split, start, stop, skip): the samples i of shard `url` (counted after the sample-level `split`
# (slot, num_slots), if any) with start <= i < stop (None: to the end), less those in `skip`. A pass reads a list of
# pieces: whole shards, or, after a resume on another layout, the parts of shards an old slot had not read.
# Tuples here; lists once a state dict went through JSON (`_as_piece`).

Piece = tuple


def _as_piece(x: Sequence[Any]) -> Piece:
    url, split, start, stop, skip = x
    return (url, tuple(split) if split is not None else None, int(start), stop, tuple(skip))


def _whole(url: str, split: tuple[int, int] | None) -> Piece:
    return (url, split, 0, None, ())


def _kept(size: int, split: tuple[int, int] | None) -> int:
    return size if split is None else len(range(split[0], size, split[1]))


def _piece_count(piece: Piece, sizes: dict[str, int] | None) -> int | None:
    """Samples `piece` yields by the sizes.json counts; None when its shard has none."""
    url, split, start, stop, skip = piece
    if sizes is None or url not in sizes:
        return None
    end = _kept(sizes[url], split) if stop is None else min(stop, _kept(sizes[url], split))
    return max(0, end - start - sum(1 for x in skip if start <= x < end))


def _nth(piece: Piece, m: int) -> int:
    """Sample index (in the shard, after the split) of the m-th sample `piece` yields."""
    _, _, start, _, skip = piece
    i = start + m
    for x in sorted(skip):
        if x <= i:
            i += 1
        else:
            break
    return i


def _bounded(piece: Piece, sizes: dict[str, int]) -> Piece:
    url, split, start, stop, skip = piece
    kept = _kept(sizes[url], split)
    return (url, split, start, kept if stop is None else min(stop, kept), skip)


def _from(piece: Piece, m: int) -> Piece:
    """`piece` without its first m samples."""
    url, split, _, stop, skip = piece
    i = _nth(piece, m)
    return (url, split, i, stop, tuple(x for x in skip if x >= i))


def _split_piece(piece: Piece, m: int) -> tuple[Piece, Piece]:
    """(the first m samples of `piece`, the rest)."""
    url, split, start, stop, skip = piece
    i = _nth(piece, m)
    return (url, split, start, i, tuple(x for x in skip if x < i)), _from(piece, m)


def _block_order(length: int, seed_parts: tuple, block: int) -> list[int]:
    """The permutation of block `block` (of `length` samples): position n of the block yields sample order[n]."""
    order = list(range(length))
    if length > 1:
        _rng(*seed_parts, "block", block).shuffle(order)
    return order


def _remaining(
    pieces: Sequence[Piece], raw: int, piece: int, sample: int, block: int, seed_parts: tuple, sizes: dict[str, int]
) -> list[Piece]:
    """What a slot at position (raw, piece, sample) of a pass over `pieces` (block size `block`, block RNG
    `seed_parts`) has not read: everything from the start of its current block on, less that block's samples it
    consumed. Needs every piece's count in `sizes`."""
    if piece >= len(pieces):
        return []
    tail = [_bounded(_from(pieces[piece], sample), sizes)] + [_bounded(p, sizes) for p in pieces[piece + 1:]]
    consumed = raw % block
    if consumed:
        counts = [_piece_count(p, sizes) for p in tail]
        length = min(block, sum(counts))
        extra: list[list[int]] = [[] for _ in tail]
        t = base = 0
        for offset in sorted(_block_order(length, seed_parts, raw // block)[:consumed]):
            while offset >= base + counts[t]:
                base, t = base + counts[t], t + 1
            extra[t].append(_nth(tail[t], offset - base))
        tail = [(u, s, a, z, tuple(sorted({*skip, *x}))) for (u, s, a, z, skip), x in zip(tail, extra)]
    return [p for p in tail if _piece_count(p, sizes)]


def _proportional(total: int, shares: Sequence[int]) -> list[int]:
    """`total` split in proportion to `shares` (largest remainders first, ties to the earlier): sums to `total`."""
    whole = sum(shares)
    if whole == 0:
        return [0] * len(shares)
    out = [total * s // whole for s in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(total * shares[i] % whole), i))
    for i in by_remainder[: total - sum(out)]:
        out[i] += 1
    return out


def _cut(pieces: Sequence[Piece], counts: Sequence[int], sizes: dict[str, int]) -> list[list[Piece]]:
    """`pieces` cut, in order, into consecutive rows of `counts` samples."""
    rest = collections.deque(pieces)
    rows = []
    for want in counts:
        row: list[Piece] = []
        while want > 0 and rest:
            p = rest.popleft()
            n = _piece_count(p, sizes)
            if n <= want:
                row.append(p)
                want -= n
            else:
                head, tail = _split_piece(p, want)
                row.append(head)
                rest.appendleft(tail)
                want = 0
        rows.append(row)
    return rows


class _Draws:
    """Resampled mode's endless piece list of one slot: draw d is a whole shard chosen with replacement by an RNG
    seeded by (seed, source, rank, worker, d), so any draw is found in constant time."""

    def __init__(self, shards: Sequence[str], key: Any, rank: int, worker: int):
        self.shards, self.key, self.rank, self.worker = list(shards), key, rank, worker

    def __getitem__(self, d: int) -> Piece:
        return _whole(self.shards[_rng(self.key, "draw", self.rank, self.worker, d).randrange(len(self.shards))], None)


@dataclass
class _Source:
    """One stream of shards: the train shards, or one source of a mixture (`data.sources`)."""

    name: str
    shards: list[str]
    weight: float
    key: Any
    """What seeds its shard shuffle, draws and blocks besides the epoch: the run's seed (plain train shards, as
    before mixtures existed) or `{seed}-{name}` (a mixture's source)."""
    resampled: bool


# ----------------------------------------------------------------------------------------------- stages 4-5


class _Reader:
    """Raw samples of piece lists, from a position, block-shuffled (in a worker); counts what it opens and decodes."""

    def __init__(self, cfg: DataConfig, sizes: dict[str, int] | None, counter: SkipCounter):
        self.cfg, self.sizes, self.counter = cfg, sizes, counter
        self.decoded = 0
        self.opened: collections.Counter[str] = collections.Counter()

    def take_stats(self) -> dict[str, Any]:
        out = {"decoded": self.decoded, "opened": dict(self.opened)}
        self.decoded, self.opened = 0, collections.Counter()
        return out

    def _count_from(self, pieces: Sequence[Piece], piece: int, sample: int, limit: int) -> int | None:
        """min(limit, samples from (piece, sample) on) by the sizes.json counts; None if a shard has none."""
        total = 0
        for k in itertools.count(piece):
            try:
                n = _piece_count(pieces[k], self.sizes)
            except IndexError:
                break
            if n is None:
                return None
            total += n - (sample if k == piece else 0)
            if total >= limit:
                return limit
        return total

    def samples(
        self, pieces: Sequence[Piece], piece: int, sample: int, elide: frozenset[int] = frozenset()
    ) -> Iterator[tuple[tuple[int, int], dict[str, Any] | None]]:
        """((piece, sample), raw) from coordinate (piece, sample) on. A piece whose samples up to the block's end
        are all in `elide` (offsets from the start) and whose count sizes.json gives is passed over unopened: its
        samples come as None."""
        offset = empty = 0
        for k in itertools.count(piece):
            try:
                url, split, start, stop, skip = pieces[k]
            except IndexError:
                return
            first = sample if k == piece else 0
            n = _piece_count(pieces[k], self.sizes) if elide else None
            if n is not None and n - first <= len(elide) and all(offset + m in elide for m in range(n - first)):
                for m in range(first, n):
                    yield (k, m), None
                offset += n - first
                continue
            self.opened[url] += 1
            skip, m = set(skip), 0
            raw = tar_samples([url], self.counter, split, allow_pipe=self.cfg.allow_pipe,
                              http_retries=self.cfg.http_retries, http_backoff_s=self.cfg.http_backoff_s,
                              max_member_bytes=self.cfg.max_member_bytes)
            try:
                for i, s in enumerate(raw):
                    if stop is not None and i >= stop:
                        break
                    if i < start or i in skip:
                        continue
                    if m >= first:  # before: the shard's samples of earlier blocks, passed over undecoded
                        yield (k, m), s
                        offset += 1
                    m += 1
            finally:
                raw.close()
            empty = empty + 1 if m == 0 else 0
            if empty >= _MAX_EMPTY_DRAWS and isinstance(pieces, _Draws):  # else an endless loop over broken shards
                raise RuntimeError(f"{empty} shards in a row gave no sample (the last: {url}); all missing or broken?")

    def shuffled(
        self, pieces: Sequence[Piece], raw: int, piece: int, sample: int, block: int, seed_parts: tuple
    ) -> Iterator[tuple[dict[str, Any] | None, tuple[int, int, int]]]:
        """(raw sample, position after it) from position (raw, piece, sample) of a pass over `pieces`: blocks of
        `block` consecutive samples, block b permuted by `_block_order(len, seed_parts, b)`. A sample is None only
        when sizes.json miscounts a shard passed over unopened (see the module doc)."""
        b, first = divmod(raw, block)
        elide: frozenset[int] = frozenset()
        if first and self.sizes is not None:  # the block's consumed samples need not be read if whole shards
            length = self._count_from(pieces, piece, sample, block)
            if length is not None:
                elide = frozenset(_block_order(length, seed_parts, b)[:first])
        reader = self.samples(pieces, piece, sample, elide)
        try:
            item = next(reader, None)
            while item is not None:
                start = item[0]
                samples: list[dict[str, Any] | None] = []
                while item is not None and len(samples) < block:
                    samples.append(item[1])
                    item = next(reader, None)  # one ahead: where the next block starts
                after = item[0] if item is not None else (len(pieces), 0)  # (an endless list never ends)
                order = _block_order(len(samples), seed_parts, b)
                for n in range(first, len(samples)):
                    yield samples[order[n]], (b * block + n + 1, *(after if n + 1 == block else start))
                b, first = b + 1, 0
        finally:
            reader.close()


# ----------------------------------------------------------------------------------------------- one slot's stream

FRESH_PASS = {"pass": 0, "raw": 0, "piece": 0, "sample": 0}
FRESH_SOURCE = {"epoch": 0, "raw": 0, "piece": 0, "sample": 0}


def _slot_pieces(src: _Source, epoch: int, rank: int, world_size: int, worker: int, num_workers: int,
                 shuffle: bool) -> list[Piece]:
    """Slot (rank, worker)'s whole shards of `src` in `epoch` (stages 2-3)."""
    shards = shuffle_shards(src.shards, src.key, epoch) if shuffle else src.shards
    mine, split = split_shards(shards, rank, world_size, worker, num_workers)
    return [_whole(u, split) for u in mine]


class _SlotStream(IterableDataset):
    """One rank's micro-batches from (epoch, start_batch) on, for `num_epochs` epochs (None: endless); each
    DataLoader worker produces its share (see the module doc). Batches carry `__position__` = {epoch, batch,
    worker, at: the worker's position after it} and `__read__` = {decoded, opened} since its previous batch.

    `positions`: each logical worker's position at the start (for epoch `epoch` in epoch mode; None, or a None
    entry: read and decode the batches before `start_batch` again). `plan`: the pieces that replace a slot's shards
    in one epoch (of a source, in a mixture) after a resume on another layout. `num_classes`: `model.num_classes`,
    the bound on class labels (0: none), a label at or above it is skipped as bad_label."""

    def __init__(
        self,
        *,
        sources: list[_Source],
        sizes: dict[str, int] | None,
        cfg: DataConfig,
        tokenizer: Tokenizer,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        epoch: int,
        num_batches: int,
        start_batch: int,
        shuffle: bool,
        num_epochs: int | None = 1,
        endless: bool = False,
        positions: list[dict[str, Any] | None] | None = None,
        plan: dict[str, Any] | None = None,
        keep_raw: bool = False,
        num_classes: int = 0,
        media: Sequence[Any] = (),
    ):
        self.sources, self.sizes, self.cfg, self.tokenizer = sources, sizes, cfg, tokenizer
        self.num_classes = num_classes
        self.media = list(media)
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        self.num_batches, self.start_batch, self.num_epochs = num_batches, start_batch, num_epochs
        self.endless, self.positions, self.plan = endless, positions, plan
        self.num_workers = max(1, cfg.num_workers)
        self.block = max(1, cfg.shuffle_buffer) if shuffle else 1
        self.seq_len = 1 + cfg.max_text_len
        self.keep_raw = keep_raw  # batches carry their samples' raw members (`__raw__`): for a replay buffer
        self.weights = [s.weight for s in sources]

    def _decoded(self, reader: _Reader, counter: SkipCounter, raw: dict[str, Any] | None) -> dict[str, Any] | None:
        if raw is None:
            return None
        reader.decoded += 1
        try:
            s = decode_for_training(raw, self.cfg, self.tokenizer, self.num_classes, self.media)
        except SampleError as e:
            counter.skip(e)
            return None
        if self.keep_raw:  # what the sample is made of, as read: a replay buffer stores these bytes
            s["raw"] = raw_members(raw)
        return s

    def _planned(self, source: int | None, cycle: int, worker: int) -> list[Piece] | None:
        """The plan's pieces for this slot in `cycle` (an epoch; of mixture source `source`), None without one."""
        plan = self.plan
        if plan is not None and source is not None:
            plan = plan["sources"][source]
        if plan is None or plan["epoch"] != cycle:
            return None
        return [_as_piece(p) for p in plan["workers"][worker]]

    # ------------------------------------------------------------------- epoch mode

    def _epoch_samples(
        self, reader: _Reader, counter: SkipCounter, epoch: int, worker: int, start: dict[str, Any]
    ) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(sample, position after it) of this slot in `epoch` from `start`: pass after pass over its pieces."""
        src = self.sources[0]
        first_pass = self._planned(None, epoch, worker) or _slot_pieces(
            src, epoch, self.rank, self.world_size, worker, self.num_workers, self.shuffle)
        pass_no, raw, piece, sample = start["pass"], start["raw"], start["piece"], start["sample"]
        while True:
            pieces = first_pass
            if pass_no > 0 and self.shuffle:
                pieces = list(first_pass)
                _rng(self.seed, epoch, self.rank, worker, "pass", pass_no).shuffle(pieces)
            fresh, good = (raw, piece, sample) == (0, 0, 0), 0
            parts = (self.seed, epoch, self.rank, worker, "pass", pass_no)
            for r, (raw, piece, sample) in reader.shuffled(pieces, raw, piece, sample, self.block, parts):
                s = self._decoded(reader, counter, r)
                if s is not None:
                    good += 1
                    yield s, {"pass": pass_no, "raw": raw, "piece": piece, "sample": sample}
            if fresh and good == 0:
                names = [p[0] for p in pieces]
                raise RuntimeError(
                    f"rank {self.rank} worker {worker}: no usable sample in its {len(names)} shard(s) "
                    f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}); all missing or corrupt?"
                )
            pass_no, raw, piece, sample = pass_no + 1, 0, 0, 0
            if pass_no == 1:  # once per epoch and slot; small eval sets wrap many times by design
                log.info(
                    "rank %d worker %d epoch %d: its %d shard(s) ran dry before its share of %d-sample batches; "
                    "reading them again (extra samples are dropped at the end of the epoch)",
                    self.rank, worker, epoch, len(first_pass), self.micro_batch_size,
                )

    def _batch(self, samples: Iterator, reader: _Reader, counter: SkipCounter, epoch: int, i: int,
               worker: int) -> dict[str, Any]:
        got = [next(samples) for _ in range(self.micro_batch_size)]
        batch = collate_samples(
            [s for s, _ in got],
            pad_id=self.tokenizer.pad_id,
            image_token_id=self.tokenizer.image_token_id,
            max_images=self.cfg.max_images,
            seq_len=self.seq_len,
            media=self.media,
            image_shape=(3, self.cfg.image_size, self.cfg.image_size),
        )
        count, reasons = counter.take()
        batch["num_skipped"] = torch.tensor(count, dtype=torch.int64)
        batch["skipped_by_kind"] = counter.take_kinds()  # {kind: count} since this worker's previous batch
        batch["__skipped__"] = reasons
        batch["__position__"] = {"epoch": epoch, "batch": i, "worker": worker, "at": got[-1][1]}
        batch["__read__"] = reader.take_stats()
        return batch

    def _epoch(self, reader: _Reader, counter: SkipCounter, epoch: int, worker: int, start_batch: int,
               start: dict[str, Any] | None) -> Iterator[dict[str, Any]]:
        """Batches i = worker, worker + W, ... of `epoch` from `start_batch` on; this worker's position is `start`
        (None: at the epoch's start, and its batches before `start_batch` are read, decoded and dropped)."""
        samples = self._epoch_samples(reader, counter, epoch, worker, start or FRESH_PASS)
        try:
            for i in range(worker, self.num_batches, self.num_workers):
                if i < start_batch:
                    if start is None:  # a checkpoint without positions: replay
                        for _ in range(self.micro_batch_size):
                            next(samples)
                        counter.take()
                        counter.take_kinds()
                    continue
                yield self._batch(samples, reader, counter, epoch, i, worker)
        finally:
            samples.close()  # the unused rest of this epoch's samples: close its tar now, not when collected

    # ------------------------------------------------------------------- endless modes

    def _source_samples(
        self, reader: _Reader, counter: SkipCounter, index: int, worker: int, start: dict[str, Any]
    ) -> Iterator[tuple[dict[str, Any] | None, dict[str, Any]]]:
        """(sample or None if skipped, source position after it): source `index` on this slot, forever."""
        src = self.sources[index]
        cycle, raw, piece, sample = start["epoch"], start["raw"], start["piece"], start["sample"]
        bad_run = 0
        while True:
            planned = None if src.resampled else self._planned(index, cycle, worker)
            if src.resampled:
                pieces: Sequence[Piece] = _Draws(src.shards, src.key, self.rank, worker)
                parts: tuple = (src.key, "draws", self.rank, worker)
            else:
                pieces = planned if planned is not None else _slot_pieces(
                    src, cycle, self.rank, self.world_size, worker, self.num_workers, self.shuffle)
                parts = (src.key, "epoch", cycle, self.rank, worker)
            fresh, good = (raw, piece, sample) == (0, 0, 0) and planned is None, 0
            for r, (raw, piece, sample) in reader.shuffled(pieces, raw, piece, sample, self.block, parts):
                s = self._decoded(reader, counter, r)
                good, bad_run = (good + 1, 0) if s is not None else (good, bad_run + 1)
                if bad_run >= _MAX_BAD_RUN:
                    raise RuntimeError(f"rank {self.rank} worker {worker}: source {src.name!r}: {bad_run} samples in "
                                       f"a row were unusable (the last in {pieces[piece][0]}); all corrupt?")
                yield s, {"epoch": cycle, "raw": raw, "piece": piece, "sample": sample}
            if fresh and good == 0:
                raise RuntimeError(
                    f"rank {self.rank} worker {worker}: source {src.name!r} has no usable sample in its "
                    f"{len(pieces)} shard(s) of epoch {cycle}; all missing or corrupt?"
                )
            cycle, raw, piece, sample = cycle + 1, 0, 0, 0

    def _mixed_samples(
        self, reader: _Reader, counter: SkipCounter, worker: int, start: dict[str, Any]
    ) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(sample, position after it) of the slot's mixture (one source: that source alone), forever."""
        n, at = start["mixed"], list(start["sources"])
        streams = [self._source_samples(reader, counter, i, worker, at[i]) for i in range(len(self.sources))]
        chunk_no, chunk = -1, [0] * MIX_CHUNK
        try:
            while True:
                if len(streams) > 1 and n // MIX_CHUNK != chunk_no:
                    chunk_no = n // MIX_CHUNK
                    chunk = mixture_chunk(self.seed, self.rank, worker, chunk_no, self.weights)
                i = chunk[n % MIX_CHUNK]
                s, at[i] = next(streams[i])
                n += 1
                if s is not None:
                    yield s, {"mixed": n, "sources": list(at)}
        finally:
            for stream in streams:
                stream.close()

    # ------------------------------------------------------------------- the worker

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        loader_worker = info.id if info is not None else 0
        W, S = self.num_workers, self.num_batches
        # The DataLoader asks its workers in round robin from worker 0, and none runs dry before the stream ends, so
        # batch g of the whole stream (g = epoch * S + batch, the first one g0) comes from DataLoader worker
        # (g - g0) % W. In epoch mode, that worker plays, in each epoch, the worker its batches belong to (batch i:
        # worker i % W): worker (g0 + loader_worker - epoch * S) % W. After a resume at batch s this relabels worker
        # k as (k + s) % W; with S not divisible by W the role changes from epoch to epoch. In the endless modes
        # batch g belongs to worker g % W, whose stream runs on across epochs.
        g0 = self.epoch * S + self.start_batch
        counter = SkipCounter()
        reader = _Reader(self.cfg, self.sizes, counter)
        last = None if self.num_epochs is None else self.epoch + self.num_epochs
        if self.endless:
            worker = (g0 + loader_worker) % W
            samples = self._mixed_samples(reader, counter, worker, self.positions[worker])
            try:
                for g in itertools.count(g0 + loader_worker, W):
                    epoch, i = divmod(g, S)
                    if last is not None and epoch >= last:
                        return
                    yield self._batch(samples, reader, counter, epoch, i, worker)
            finally:
                samples.close()
            return
        for epoch in itertools.count(self.epoch) if last is None else range(self.epoch, last):
            worker = (g0 + loader_worker - epoch * S) % W
            start, start_batch = FRESH_PASS, 0
            if epoch == self.epoch:
                start = None if self.positions is None else self.positions[worker]
                start_batch = self.start_batch
            yield from self._epoch(reader, counter, epoch, worker, start_batch, start)


def mixture_chunk(seed: int, rank: int, worker: int, chunk: int, weights: Sequence[float]) -> list[int]:
    """Source indices of a mixture's samples chunk * MIX_CHUNK ... on slot (rank, worker): drawn with `weights`."""
    return _rng(seed, "mix", rank, worker, chunk).choices(range(len(weights)), weights=weights, k=MIX_CHUNK)


PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
"""What a preemption sends (SLURM's --signal, Kubernetes, the launcher): the rank saves and stops
(mmscale.training.cluster); its data-loader workers ignore them."""


def ignore_stop_signals() -> None:
    """For data-loader workers: srun delivers a job step's signals to every process of a task; a worker killed by
    one would fail the step its rank still has to finish. The parent stops its workers itself."""
    for s in PREEMPT_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # decoding is per-sample Python/PIL work; torch threads would only oversubscribe
    ignore_stop_signals()  # a preemption signal is for the rank, which finishes its step and then stops us


def _load_batches(stream: _SlotStream, num_workers: int, pin_memory: bool) -> Generator[dict[str, Any], None, None]:
    """The stream's batches, made by `num_workers` worker processes (0: in this process).

    A generator, so that its `finally` stops the workers whether the consumer exhausts it, closes it, or drops
    it (Python closes a generator it collects): then, not whenever the DataLoader iterator happens to be freed.
    """
    if num_workers == 0:
        yield from stream
        return
    batches = iter(
        DataLoader(
            stream,
            batch_size=None,  # the stream yields whole batches
            num_workers=num_workers,
            worker_init_fn=_worker_init,
            pin_memory=pin_memory,
        )  # in order (the default): the batch order relies on the round robin (see _SlotStream.__iter__)
    )
    try:
        yield from batches
    finally:
        # Private, but the DataLoader's only way to stop its workers now (its __del__ calls it too); it joins each
        # worker (up to 5 s) and then terminates the ones still alive. A no-op once it has run.
        batches._shutdown_workers()


class _WorkerOwner:
    """close() and `with` for a loader: stops the workers of every live iterator of it."""

    def __init__(self):
        # Weak: an iterator the consumer drops is collected (and its workers stopped) as before.
        self._live: weakref.WeakSet[Generator] = weakref.WeakSet()

    def _track(self, gen: Generator) -> Generator:
        self._live.add(gen)
        return gen

    def close(self) -> None:
        """Shut down the worker processes of this loader's iterators now; iterating again starts fresh ones."""
        for gen in list(self._live):
            gen.close()  # GeneratorExit at its `yield`: the `finally` of _load_batches stops its workers
        self._live.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------- loaders


def samples_per_epoch(cfg: DataConfig, shards: list[str], spec: str) -> int:
    if cfg.num_samples > 0:
        return cfg.num_samples
    sizes = read_sizes(shards)
    if sizes is None:
        raise ValueError(
            f"shards {spec!r}: no sizes.json beside them records every shard's sample count; write the shards "
            f"with `python -m mmscale.data.write_shards` or set data.num_samples (samples per epoch)"
        )
    return sum(sizes.values())


class TrainLoader(_WorkerOwner):
    """Infinite micro-batches for one rank: epoch after epoch, each exactly `steps_per_epoch` long.

    Reads `shards` (else `data.train_shards`; else the mixture `data.sources`); `data.resampled` draws shards with
    replacement. `state_dict()` is the position of the next batch, with each worker's raw position;
    `load_state_dict(sd, all_ranks)` (before `iter()`) resumes there, on this layout or another (see the module
    doc). One `iter()` keeps one set of worker processes for all its epochs; `close()` stops them. A loader has one
    position, so it has one stream: `iter()` closes the previous iterator.

    `num_decoded` and `shards_opened` (a Counter of shard names) sum the work behind the batches yielded so far.
    `num_classes`: `model.num_classes` (0: no classification head); a `.cls` label at or above it is skipped and
    counted as bad_label, never reaches the loss.
    """

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: Tokenizer,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        shards: str | None = None,
        pin_memory: bool = False,
        keep_raw: bool = False,
        num_classes: int = 0,
        media: Sequence[Any] = (),
    ):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank ({rank}) must be in [0, world_size ({world_size}))")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size ({micro_batch_size}) must be >= 1")
        self.cfg, self.tokenizer, self.micro_batch_size = cfg, tokenizer, micro_batch_size
        self.rank, self.world_size, self.seed, self.pin_memory = rank, world_size, seed, pin_memory
        # batches carry each sample's raw members (`__raw__`) only when asked (a replay buffer stores them): the
        # bytes cost a copy across the worker boundary (~2 ms per batch of 32 224-px JPEGs)
        self.keep_raw = keep_raw
        self.num_classes = num_classes
        self.media = list(media)  # the other media (mmscale.media.bind_media): decoded and collated with the images
        self.num_workers = max(1, cfg.num_workers)
        self.block = max(1, cfg.shuffle_buffer)
        spec = shards or cfg.train_shards
        self.mixture = not spec and bool(cfg.sources)
        if spec:
            self.sources = [_Source("train", resolve_shards(spec, cfg.allow_pipe), 1.0, seed, cfg.resampled)]
        elif self.mixture:
            self.sources = [_Source(s.name, resolve_shards(s.shards, cfg.allow_pipe), s.weight, f"{seed}-{s.name}",
                                    cfg.resampled) for s in cfg.sources]
        else:
            raise ValueError("train data: no shards; give data.train_shards (or the loader's shards) or data.sources")
        self.endless = self.mixture or cfg.resampled
        self.shards = [u for s in self.sources for u in s.shards]
        self.sizes: dict[str, int] = {}
        self._unsized: list[str] = []  # sources without every shard's count
        for i, src in enumerate(self.sources):
            sizes = read_sizes(src.shards)
            if sizes is None:
                self._unsized.append(f"data.sources[{i}].shards ({cfg.sources[i].shards!r})" if self.mixture
                                     else f"shards {spec!r}")
            else:
                self.sizes.update(sizes)
        if not self.mixture:
            self.samples_per_epoch = samples_per_epoch(cfg, self.sources[0].shards, spec)
        elif cfg.num_samples > 0:
            self.samples_per_epoch = cfg.num_samples
        elif self._unsized:
            raise ValueError(
                f"{self._unsized[0]}: no sizes.json beside them records every shard's sample count, and a mixture's "
                f"epoch is the sum of its sources' counts; write the shards with `python -m mmscale.data.write_shards` "
                f"or set data.num_samples (samples per epoch of the mixture)"
            )
        else:
            self.samples_per_epoch = sum(self.sizes[u] for s in self.sources for u in s.shards)
        self.steps_per_epoch = self.samples_per_epoch // (micro_batch_size * world_size)
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"train data: {self.samples_per_epoch} samples per epoch < micro_batch_size ({micro_batch_size}) * "
                f"world_size ({world_size}); not even one step per epoch"
            )
        num_slots = world_size * self.num_workers
        for src in self.sources:
            if not src.resampled and len(src.shards) < num_slots:
                log.warning(
                    "%s: %d shard(s) < world_size (%d) * num_workers (%d): every worker reads every shard and keeps "
                    "1/%d of the samples; write more, smaller shards for efficient loading",
                    src.name, len(src.shards), world_size, self.num_workers, num_slots,
                )
        self.epoch = 0
        self.batch_in_epoch = 0
        self.num_skipped = 0
        self.num_decoded = 0
        self.shards_opened: collections.Counter[str] = collections.Counter()
        self._positions: list[dict[str, Any] | None] = self._fresh_positions()
        self._plan: dict[str, Any] | None = None
        self._warner = SkipWarner(cfg.warn_every, f"train data rank {rank}")

    def _fresh_positions(self) -> list[dict[str, Any] | None]:
        if self.endless:
            return [{"mixed": 0, "sources": [dict(FRESH_SOURCE) for _ in self.sources]}
                    for _ in range(self.num_workers)]
        return [dict(FRESH_PASS) for _ in range(self.num_workers)]

    def _next_epoch(self) -> None:
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        if not self.endless:  # an epoch's positions and plan end with it
            self._positions, self._plan = self._fresh_positions(), None

    def state_dict(self) -> dict[str, Any]:
        epoch, batch = self.epoch, self.batch_in_epoch
        positions, plan = self._positions, self._plan
        if batch >= self.steps_per_epoch:
            epoch, batch = epoch + 1, 0
            if not self.endless:
                positions, plan = self._fresh_positions(), None
        if plan is not None and self.endless:  # a source's plan epoch every worker has left is done with
            sources = [p if p is not None and any(w is None or w["sources"][i]["epoch"] <= p["epoch"]
                                                  for w in positions) else None
                       for i, p in enumerate(plan["sources"])]
            plan = {"sources": sources} if any(p is not None for p in sources) else None
        return {
            "epoch": epoch,
            "batch_in_epoch": batch,
            "num_skipped": self.num_skipped,
            "rank": self.rank,
            "workers": copy.deepcopy(positions),
            "plan": copy.deepcopy(plan),
            # What the position means: a resume with other values would not continue the interrupted run's order.
            "steps_per_epoch": self.steps_per_epoch,
            "seed": self.seed,
            "world_size": self.world_size,
            "num_workers": self.cfg.num_workers,
            "micro_batch_size": self.micro_batch_size,
            "samples_per_epoch": self.samples_per_epoch,
            "shuffle_buffer": self.cfg.shuffle_buffer,
            "resampled": self.cfg.resampled,
            "sources": [[s.name, s.weight] for s in self.sources] if self.mixture else None,
            "num_shards": [len(s.shards) for s in self.sources],
        }

    def _layout(self, sd: dict[str, Any]) -> tuple[int, int]:
        """(world size, workers per rank) that wrote `sd` (this loader's, for a checkpoint that does not say)."""
        return int(sd.get("world_size", self.world_size)), max(1, int(sd.get("num_workers", self.cfg.num_workers)))

    def resume_problems(self, sd: dict[str, Any]) -> list[str]:
        """Why `sd` (a `state_dict()` from a checkpoint) cannot be resumed by this loader: one message per setting
        that differs, with both values and the fix; empty when it can. Another world size or worker count is fine
        (see the module doc). Reads nothing, starts nothing: the trainer calls it on every rank before any
        collective. Fields missing from an older checkpoint are not checked."""
        old_world, old_workers = self._layout(sd)

        def shards_fix(old):
            return f"resume with the checkpoint's shards ({old} shard(s) per source)"

        fixes = {
            "seed": lambda old: f"resume with train.seed={old}",
            "micro_batch_size": lambda old: f"resume with train.micro_batch_size={old}",
            "samples_per_epoch": lambda old: (
                f"resume with the checkpoint's shards (their sizes.json) or data.num_samples={old}"
            ),
            "shuffle_buffer": lambda old: f"resume with data.shuffle_buffer={old} (positions count blocks of it)",
            "resampled": lambda old: f"resume with data.resampled={str(old).lower()}",
            "sources": lambda old: (
                "resume with data.train_shards (the checkpoint read no mixture)" if old is None else
                "resume with the checkpoint's data.sources (names and weights, in order: "
                + ", ".join(f"{n}={w}" for n, w in old) + ")"
            ),
            "num_shards": shards_fix,
        }
        if old_world == self.world_size:  # (on another world size it changes, and is recomputed)
            fixes["steps_per_epoch"] = lambda old: (
                f"resume with the checkpoint's samples per epoch and train.micro_batch_size (steps per epoch = "
                f"samples // (micro_batch_size * world_size), now {self.samples_per_epoch} // "
                f"({self.micro_batch_size} * {self.world_size}))"
            )
        now = self.state_dict()
        problems = []
        for name, fix in fixes.items():
            if name in sd and _plain(sd[name]) != _plain(now[name]):
                problems.append(
                    f"data position: {name} was {sd[name]} at the checkpoint, is {now[name]} now; {fix(sd[name])} "
                    f"(the resumed batches would differ from the interrupted run's)"
                )
        if (old_world, old_workers) != (self.world_size, self.num_workers):
            keep = f"resume on {old_world} rank(s) with data.num_workers={sd.get('num_workers', old_workers)}"
            layout = (f"{old_world} rank(s) x {old_workers} worker(s) at the checkpoint, {self.world_size} x "
                      f"{self.num_workers} now")
            if "workers" not in sd:
                problems.append(f"data position: {layout}, but the checkpoint holds no per-worker raw positions "
                                f"(it predates them), which spreading the rest of the epoch needs; {keep}")
            elif self._unsized and not self.cfg.resampled:
                problems.append(
                    f"data position: {layout}; spreading the rest of the epoch over the new workers needs every "
                    f"shard's sample count, but {self._unsized[0]} has no sizes.json: write the shards with "
                    f"`python -m mmscale.data.write_shards`, or {keep}"
                )
        return problems

    def load_state_dict(self, sd: dict[str, Any], all_ranks: list[dict[str, Any]] | None = None) -> None:
        """Resume at `sd`'s position (this rank's `state_dict()` from the checkpoint; on another layout, any rank's).

        On another world size, `all_ranks` must hold every old rank's `state_dict()` (any order): the rest of the
        epoch is spread over the new ranks. On another worker count alone `sd` is enough. Raises ValueError with
        `resume_problems(sd)` if the position cannot be resumed here.
        """
        problems = self.resume_problems(sd)
        if problems:
            raise ValueError(
                f"cannot resume the train data at epoch {sd.get('epoch')} batch {sd.get('batch_in_epoch')}:\n  "
                + "\n  ".join(problems)
            )
        self.num_skipped = int(sd.get("num_skipped", 0))
        old_world, old_workers = self._layout(sd)
        if (old_world, old_workers) == (self.world_size, self.num_workers):
            self.epoch = int(sd["epoch"])
            self.batch_in_epoch = min(int(sd["batch_in_epoch"]), self.steps_per_epoch)
            workers = sd.get("workers")
            if workers is None:  # a checkpoint from before positions: replay (see the module doc)
                workers = self._fresh_positions() if self.endless else [None] * self.num_workers
            self._positions = copy.deepcopy(list(workers))
            self._plan = copy.deepcopy(sd.get("plan"))
            return
        if old_world != self.world_size:
            if all_ranks is None:
                raise ValueError(
                    f"the train data position was saved by {old_world} rank(s), this run has {self.world_size}: "
                    f"load_state_dict needs every old rank's state_dict (all_ranks=[...]) to spread the rest of epoch "
                    f"{sd.get('epoch')} over the new ranks"
                )
            olds = self._old_ranks(all_ranks, old_world)
        else:
            olds = [sd]
        if self.endless:
            self._resume_endless_elsewhere(olds, old_world, old_workers)
        else:
            self._resume_epoch_elsewhere(olds, old_world, old_workers)

    def _old_ranks(self, all_ranks: list[dict[str, Any]], old_world: int) -> list[dict[str, Any]]:
        olds = sorted(all_ranks, key=lambda s: int(s.get("rank", -1)))
        ranks = [s.get("rank") for s in olds]
        if ranks != list(range(old_world)):
            raise ValueError(f"all_ranks: expected the train data state of each old rank 0..{old_world - 1} once, "
                             f"got ranks {ranks}")
        stops = sorted({(int(s["epoch"]), int(s["batch_in_epoch"])) for s in olds})
        if len(stops) > 1:
            raise ValueError(f"all_ranks: the old ranks are at different (epoch, batch) {stops}; give the states of "
                             f"one checkpoint")
        for s in olds:
            problems = self.resume_problems(s)
            if problems or self._layout(s) != self._layout(olds[0]):
                raise ValueError(f"all_ranks: rank {s['rank']}'s state cannot be resumed here: "
                                 + "; ".join(problems or ["its layout differs from rank 0's"]))
        return olds

    def _new_slots(self, whole_world: bool) -> tuple[list[tuple[int, int]], int]:
        """The new (rank, worker) slots the rest is spread over (every rank's or this rank's), and where ours begin."""
        ranks = list(range(self.world_size)) if whole_world else [self.rank]
        return [(r, w) for r in ranks for w in range(self.num_workers)], ranks.index(self.rank) * self.num_workers

    def _resume_epoch_elsewhere(self, olds: list[dict[str, Any]], old_world: int, old_workers: int) -> None:
        """Epoch mode on another layout: a plan for the rest of the epoch (see the module doc)."""
        epoch, batch = int(olds[0]["epoch"]), int(olds[0]["batch_in_epoch"])
        if batch >= int(olds[0].get("steps_per_epoch", batch + 1)):
            epoch, batch = epoch + 1, 0
        new_batch = batch * old_world // self.world_size  # the same samples read, in batches of the new world
        self.epoch, self.batch_in_epoch = epoch, new_batch
        self._positions, self._plan = self._fresh_positions(), None
        if new_batch >= self.steps_per_epoch:
            self._next_epoch()
        if batch == 0 or new_batch >= self.steps_per_epoch:
            return
        src = self.sources[0]
        remaining: list[Piece] = []
        for sd in olds:
            r = int(sd.get("rank", self.rank))
            plan = sd.get("plan") if sd.get("plan") and sd["plan"]["epoch"] == epoch else None
            for w in range(old_workers):
                at = sd["workers"][w]
                if at is None:
                    raise ValueError(
                        f"rank {r} worker {w}: no raw position (resumed from a checkpoint without positions, and no "
                        f"batch of it since); resume once on {old_world} rank(s) with data.num_workers={old_workers}"
                    )
                if at["pass"] > 0:  # its first pass is read whole
                    continue
                pieces = ([_as_piece(p) for p in plan["workers"][w]] if plan is not None
                          else _slot_pieces(src, epoch, r, old_world, w, old_workers, True))
                remaining += _remaining(pieces, at["raw"], at["piece"], at["sample"], self.block,
                                        (self.seed, epoch, r, w, "pass", 0), self.sizes)
        total = sum(_piece_count(p, self.sizes) for p in remaining)
        slots, mine = self._new_slots(old_world != self.world_size)
        W, S = self.num_workers, self.steps_per_epoch
        shares = [len(range(new_batch + (w - new_batch) % W, S, W)) * self.micro_batch_size for _, w in slots]
        rows = _cut(remaining, _proportional(total, shares), self.sizes)
        self._plan = {"epoch": epoch, "workers": rows[mine: mine + W]}
        log.info(
            "train data rank %d: epoch %d resumed at batch %d on %d rank(s) x %d worker(s) (saved at batch %d by %d x "
            "%d): its %d unread samples are spread over the %d samples of its remaining batches",
            self.rank, epoch, new_batch, self.world_size, W, batch, old_world, old_workers, total, sum(shares),
        )

    def _resume_endless_elsewhere(self, olds: list[dict[str, Any]], old_world: int, old_workers: int) -> None:
        """Resampled or mixture mode on another layout (see the module doc)."""
        epoch, batch = int(olds[0]["epoch"]), int(olds[0]["batch_in_epoch"])
        old_steps = int(olds[0]["steps_per_epoch"])
        self.epoch, self.batch_in_epoch = divmod((epoch * old_steps + batch) * old_world // self.world_size,
                                                 self.steps_per_epoch)
        old = [(int(sd["rank"]), w, sd["workers"][w], sd.get("plan")) for sd in olds for w in range(old_workers)]
        slots, mine = self._new_slots(old_world != self.world_size)
        starts, plans = [], []
        for i, src in enumerate(self.sources):
            ats = [(r, w, at["sources"][i], plan["sources"][i] if plan else None) for r, w, at, plan in old]
            if src.resampled:  # on at the next draw: no new slot repeats an old slot's draw
                starts.append({**FRESH_SOURCE, "piece": max(a["piece"] for _, _, a, _ in ats) + 1})
                plans.append(None)
                continue
            remaining: list[Piece] = []
            for r, w, a, plan in ats:
                pieces = ([_as_piece(p) for p in plan["workers"][w]] if plan and plan["epoch"] == a["epoch"]
                          else _slot_pieces(src, a["epoch"], r, old_world, w, old_workers, True))
                remaining += _remaining(pieces, a["raw"], a["piece"], a["sample"], self.block,
                                        (src.key, "epoch", a["epoch"], r, w), self.sizes)
            total = sum(_piece_count(p, self.sizes) for p in remaining)
            rows = _cut(remaining, _proportional(total, [1] * len(slots)), self.sizes)
            cycle = max(a["epoch"] for _, _, a, _ in ats) + 1
            plans.append({"epoch": cycle, "workers": rows[mine: mine + self.num_workers]})
            starts.append({**FRESH_SOURCE, "epoch": cycle})
        mixed = max(at["mixed"] for _, _, at, _ in old)
        self._positions = [{"mixed": mixed, "sources": copy.deepcopy(starts)} for _ in range(self.num_workers)]
        self._plan = {"sources": plans} if any(p is not None for p in plans) else None

    def _stream(self) -> _SlotStream:
        return _SlotStream(
            sources=self.sources, sizes=self.sizes or None, cfg=self.cfg, tokenizer=self.tokenizer,
            micro_batch_size=self.micro_batch_size, rank=self.rank, world_size=self.world_size, seed=self.seed,
            epoch=self.epoch, num_batches=self.steps_per_epoch, start_batch=self.batch_in_epoch, shuffle=True,
            num_epochs=None, endless=self.endless, positions=copy.deepcopy(self._positions),
            plan=copy.deepcopy(self._plan), keep_raw=self.keep_raw, num_classes=self.num_classes, media=self.media,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.close()
        return self._track(self._batches())

    def _batches(self) -> Generator[dict[str, Any], None, None]:
        if self.batch_in_epoch >= self.steps_per_epoch:
            self._next_epoch()
        batches = _load_batches(self._stream(), self.cfg.num_workers, self.pin_memory)
        try:
            for batch in batches:
                if self.batch_in_epoch >= self.steps_per_epoch:
                    self._next_epoch()
                position = batch.pop("__position__")
                if (position["epoch"], position["batch"]) != (self.epoch, self.batch_in_epoch):  # a bug
                    raise RuntimeError(
                        f"rank {self.rank}: got the batch of (epoch, batch) {(position['epoch'], position['batch'])}, "
                        f"expected {(self.epoch, self.batch_in_epoch)}"
                    )
                self._positions[position["worker"]] = position["at"]
                read = batch.pop("__read__")
                self.num_decoded += read["decoded"]
                self.shards_opened.update(read["opened"])
                count = int(batch["num_skipped"])
                self.num_skipped += count
                self._warner.add(count, batch.pop("__skipped__"))
                self.batch_in_epoch += 1
                yield batch
        finally:
            batches.close()
        raise RuntimeError(f"rank {self.rank}: the endless train stream ended at epoch {self.epoch}")  # a bug


def _plain(value: Any) -> Any:
    """`value` as JSON gives it back (tuples as lists): a checkpoint's state dict compares equal to a fresh one."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class EvalLoader(_WorkerOwner):
    """Finite, deterministic, unshuffled micro-batches for one rank; iterate it again for each evaluation.

    Every rank yields `num_batches` = min(max_batches, samples // (micro_batch_size * world_size)) batches (at
    least 1; `max_batches` when the shards have no sizes.json). A rank whose shards hold fewer samples wraps
    around them, so all ranks step together. Each pass starts its workers and stops them at its end; `close()`
    stops those of unfinished passes. `num_classes`: as for TrainLoader.
    """

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: Tokenizer,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        shards: str,
        max_batches: int,
        pin_memory: bool = False,
        num_classes: int = 0,
        media: Sequence[Any] = (),
    ):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank ({rank}) must be in [0, world_size ({world_size}))")
        self.cfg, self.tokenizer, self.micro_batch_size = cfg, tokenizer, micro_batch_size
        self.rank, self.world_size, self.pin_memory = rank, world_size, pin_memory
        self.num_classes = num_classes
        self.media = list(media)  # the other media (mmscale.media.bind_media): decoded and collated with the images
        self.shards = resolve_shards(shards, cfg.allow_pipe)
        self.sizes = read_sizes(self.shards)
        self.num_batches = max_batches
        if self.sizes is not None:
            self.num_batches = max(1, min(max_batches, sum(self.sizes.values()) // (micro_batch_size * world_size)))
        self.num_skipped = 0
        self._warner = SkipWarner(cfg.warn_every, f"eval data rank {rank}")

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._track(self._batches())

    def _batches(self) -> Generator[dict[str, Any], None, None]:
        stream = _SlotStream(
            sources=[_Source("eval", self.shards, 1.0, 0, False)], sizes=self.sizes, cfg=self.cfg,
            tokenizer=self.tokenizer, micro_batch_size=self.micro_batch_size, rank=self.rank,
            world_size=self.world_size, seed=0, epoch=0, num_batches=self.num_batches, start_batch=0, shuffle=False,
            num_epochs=1, num_classes=self.num_classes, media=self.media,
        )
        batches = _load_batches(stream, self.cfg.num_workers, self.pin_memory)
        try:
            for batch in batches:
                del batch["__position__"], batch["__read__"]
                count = int(batch["num_skipped"])
                self.num_skipped += count
                self._warner.add(count, batch.pop("__skipped__"))
                yield batch
        finally:
            batches.close()
