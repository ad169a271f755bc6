"""The streaming data pipeline: shards -> samples -> pixels and tokens -> batches, one visible stage at a time.

Per rank, per data-loader worker, per epoch (`_SlotStream._epoch` runs them in this order):

1. shard list         `resolve_shards(spec)`: brace pattern, directory or list file (mmscale.data.shards)
2. shard shuffle      `shuffle_shards`: a permutation seeded by (seed, epoch), the same on every rank
3. split              `split_shards`: by rank, then by worker (rank and world size are passed in, never read from
                      torch.distributed); with fewer shards than ranks x workers, every slot reads all shards and
                      keeps every (ranks x workers)-th sample instead
4. tar -> samples     `tar_samples` (mmscale.data.reading): members grouped by key; a broken tar is counted once,
                      reading goes on
5. sample shuffle     `shuffle_samples`: a buffer of `shuffle_buffer` raw samples, seeded by (seed, epoch, slot)
6. decode + transform `decode_sample` (mmscale.data.decode): image -> resize shorter side, centre crop, normalise;
                      caption checked
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
- Resuming (`load_state_dict`) fast-forwards inside the epoch: each worker reads and discards its batches before
  the resume point, and the DataLoader workers are relabelled so the round robin continues where it stopped.
  Resumed batches are identical to an uninterrupted run's. A resume with another seed, world size, worker count,
  micro batch or epoch size is refused (`resume_problems`): its batches would not be the interrupted run's.

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
"""

from __future__ import annotations

import itertools
import logging
import random
import weakref
from collections.abc import Generator, Iterable, Iterator, Sequence
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmscale.config import DataConfig
from mmscale.data.collate import collate_samples
from mmscale.data.decode import (  # noqa: F401  (re-exported: stages 6-7)
    RAW_MEMBERS, caption_to_ids, decode_for_training, decode_sample, image_to_tensor, raw_members,
)
from mmscale.data.reading import (  # noqa: F401  (re-exported: stage 4 and skip counting)
    SampleError, SkipCounter, SkipWarner, tar_samples,
)
from mmscale.data.shards import read_sizes, resolve_shards
from mmscale.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- stages 2-5


def _rng(*parts: Any) -> random.Random:
    # A str seed is hashed with SHA-512 by `random`: stable across processes and Python runs.
    return random.Random("mmscale-data-" + "-".join(map(str, parts)))


def shuffle_shards(shards: Sequence[str], seed: int, epoch: int) -> list[str]:
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
    keeps samples `slot::num_slots`: each tar is then read by every slot, but no slot is left without data.
    """
    num_slots = world_size * num_workers
    if len(shards) >= num_slots:
        return list(shards)[rank::world_size][worker::num_workers], None
    return list(shards), (rank * num_workers + worker, num_slots)


def shuffle_samples(samples: Iterable[Any], bufsize: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle buffer: fill to `bufsize`, then yield a random element for each new one; drain at the end."""
    if bufsize <= 1:
        yield from samples
        return
    buf: list[Any] = []
    for s in samples:
        if len(buf) < bufsize:
            buf.append(s)
            continue
        k = rng.randrange(bufsize)
        buf[k], s = s, buf[k]
        yield s
    rng.shuffle(buf)
    yield from buf


# ----------------------------------------------------------------------------------------------- one slot's stream


class _SlotStream(IterableDataset):
    """One rank's micro-batches from (epoch, start_batch) on, for `num_epochs` epochs (None: endless); each
    DataLoader worker produces its share (see the module doc). Batches carry `__position__` = (epoch, batch)."""

    def __init__(
        self,
        *,
        shards: list[str],
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
    ):
        self.shards, self.cfg, self.tokenizer = shards, cfg, tokenizer
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        self.num_batches, self.start_batch, self.num_epochs = num_batches, start_batch, num_epochs
        self.num_workers = max(1, cfg.num_workers)
        self.seq_len = 1 + cfg.max_text_len
        self.keep_raw = shuffle  # training batches carry their samples' raw members (`__raw__`), eval batches not

    def _samples(self, epoch: int, worker: int, counter: SkipCounter) -> Iterator[dict[str, Any]]:
        """Tokenized samples of this slot in `epoch`: pass after pass over its shards (a pass is shuffled in itself)."""
        cfg = self.cfg
        shards = shuffle_shards(self.shards, self.seed, epoch) if self.shuffle else self.shards
        mine, sample_split = split_shards(shards, self.rank, self.world_size, worker, self.num_workers)
        sample_rng = _rng(self.seed, epoch, self.rank, worker, "samples")
        for pass_no in itertools.count():
            order = mine
            if pass_no == 1:  # once per epoch and slot; small eval sets wrap many times by design
                log.info(
                    "rank %d worker %d epoch %d: its %d shard(s) ran dry before its share of %d-sample batches; "
                    "reading them again (extra samples are dropped at the end of the epoch)",
                    self.rank, worker, epoch, len(mine), self.micro_batch_size,
                )
            if pass_no > 0 and self.shuffle:
                order = list(mine)
                _rng(self.seed, epoch, self.rank, worker, "pass", pass_no).shuffle(order)
            raw = tar_samples(order, counter, sample_split)
            if self.shuffle and cfg.shuffle_buffer > 1:
                raw = shuffle_samples(raw, cfg.shuffle_buffer, sample_rng)
            good = 0
            for r in raw:
                try:
                    s = decode_for_training(r, cfg, self.tokenizer)
                except SampleError as e:
                    counter.skip(str(e))
                    continue
                if self.keep_raw:  # what the sample is made of, as read: a replay buffer stores these bytes
                    s["raw"] = raw_members(r)
                good += 1
                yield s
            if good == 0:
                raise RuntimeError(
                    f"rank {self.rank} worker {worker}: no usable sample in its {len(mine)} shard(s) "
                    f"({', '.join(mine[:3])}{', ...' if len(mine) > 3 else ''}); all missing or corrupt?"
                )

    def _epoch(self, epoch: int, worker: int, start_batch: int, counter: SkipCounter) -> Iterator[dict[str, Any]]:
        """Batches i = worker, worker + W, ... of `epoch` (those before `start_batch` are read and dropped)."""
        samples = self._samples(epoch, worker, counter)
        collate_fn = partial(
            collate_samples,
            pad_id=self.tokenizer.pad_id,
            image_token_id=self.tokenizer.image_token_id,
            max_images=self.cfg.max_images,
            seq_len=self.seq_len,
        )
        try:
            for i in range(worker, self.num_batches, self.num_workers):
                if i < start_batch:  # fast-forward on resume: read the same samples, build nothing
                    for _ in range(self.micro_batch_size):
                        next(samples)
                    counter.take()
                    continue
                batch = collate_fn([next(samples) for _ in range(self.micro_batch_size)])
                count, reasons = counter.take()
                batch["num_skipped"] = torch.tensor(count, dtype=torch.int64)
                batch["__skipped__"] = reasons
                batch["__position__"] = (epoch, i)
                yield batch
        finally:
            samples.close()  # the unused rest of this epoch's samples: close its tar now, not when collected

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        loader_worker = info.id if info is not None else 0
        W, S = self.num_workers, self.num_batches
        # The DataLoader asks its workers in round robin from worker 0, and none runs dry before the stream ends, so
        # batch g of the whole stream (g = epoch * S + batch, the first one g0) comes from DataLoader worker
        # (g - g0) % W. In each epoch, that worker plays the worker its batches belong to (batch i: worker i % W):
        # worker (g0 + loader_worker - epoch * S) % W. After a resume at batch s this relabels worker k as
        # (k + s) % W; with S not divisible by W the role changes from epoch to epoch.
        g0 = self.epoch * S + self.start_batch
        counter = SkipCounter()
        if self.num_epochs is None:
            epochs: Iterable[int] = itertools.count(self.epoch)
        else:
            epochs = range(self.epoch, self.epoch + self.num_epochs)
        for epoch in epochs:
            worker = (g0 + loader_worker - epoch * S) % W
            yield from self._epoch(epoch, worker, self.start_batch if epoch == self.epoch else 0, counter)


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # decoding is per-sample Python/PIL work; torch threads would only oversubscribe


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

    `state_dict()` is the position of the next batch; `load_state_dict()` (before `iter()`) resumes there. One
    `iter()` keeps one set of worker processes for all its epochs; `close()` stops them (see the module doc). A
    loader has one position, so it has one stream: `iter()` closes the previous iterator.
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
    ):
        super().__init__()
        spec = shards if shards is not None else cfg.train_shards
        if not 0 <= rank < world_size:
            raise ValueError(f"rank ({rank}) must be in [0, world_size ({world_size}))")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size ({micro_batch_size}) must be >= 1")
        self.cfg, self.tokenizer, self.micro_batch_size = cfg, tokenizer, micro_batch_size
        self.rank, self.world_size, self.seed, self.pin_memory = rank, world_size, seed, pin_memory
        self.shards = resolve_shards(spec)
        self.samples_per_epoch = samples_per_epoch(cfg, self.shards, spec)
        self.steps_per_epoch = self.samples_per_epoch // (micro_batch_size * world_size)
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"shards {spec!r}: {self.samples_per_epoch} samples per epoch < micro_batch_size "
                f"({micro_batch_size}) * world_size ({world_size}); not even one step per epoch"
            )
        num_slots = world_size * max(1, cfg.num_workers)
        if len(self.shards) < num_slots:
            log.warning(
                "%d shard(s) < world_size (%d) * num_workers (%d): every worker reads every shard and keeps 1/%d "
                "of the samples; write more, smaller shards for efficient loading",
                len(self.shards), world_size, max(1, cfg.num_workers), num_slots,
            )
        self.epoch = 0
        self.batch_in_epoch = 0
        self.num_skipped = 0
        self._warner = SkipWarner(cfg.warn_every, f"train data rank {rank}")

    def state_dict(self) -> dict[str, Any]:
        epoch, batch = self.epoch, self.batch_in_epoch
        if batch >= self.steps_per_epoch:
            epoch, batch = epoch + 1, 0
        return {
            "epoch": epoch,
            "batch_in_epoch": batch,
            "num_skipped": self.num_skipped,
            # What the position means: a resume with other values would not continue the interrupted run's order.
            "steps_per_epoch": self.steps_per_epoch,
            "seed": self.seed,
            "world_size": self.world_size,
            "num_workers": self.cfg.num_workers,
            "micro_batch_size": self.micro_batch_size,
            "samples_per_epoch": self.samples_per_epoch,
        }

    def resume_problems(self, sd: dict[str, Any]) -> list[str]:
        """Why `sd` (a `state_dict()` from a checkpoint) cannot be resumed by this loader: one message per setting
        that differs, with both values and the fix; empty when it can. Reads nothing, starts nothing: the trainer
        calls it on every rank before any collective. Fields missing from an older checkpoint are not checked."""
        fixes = {
            "seed": lambda old: f"resume with train.seed={old}",
            "world_size": lambda old: f"resume on {old} rank(s)",
            "num_workers": lambda old: f"resume with data.num_workers={old}",
            "micro_batch_size": lambda old: f"resume with train.micro_batch_size={old}",
            "samples_per_epoch": lambda old: (
                f"resume with the checkpoint's shards (their sizes.json) or data.num_samples={old}"
            ),
            "steps_per_epoch": lambda old: (
                f"resume with the checkpoint's samples per epoch, train.micro_batch_size and world size (steps per "
                f"epoch = samples // (micro_batch_size * world_size), now {self.samples_per_epoch} // "
                f"({self.micro_batch_size} * {self.world_size}))"
            ),
        }
        now = self.state_dict()
        problems = []
        for name, fix in fixes.items():
            if name in sd and sd[name] != now[name]:
                problems.append(
                    f"data position: {name} was {sd[name]} at the checkpoint, is {now[name]} now; {fix(sd[name])} "
                    f"(the resumed batches would differ from the interrupted run's)"
                )
        return problems

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Resume at `sd`'s position; raises ValueError with `resume_problems(sd)` if the order would differ."""
        problems = self.resume_problems(sd)
        if problems:
            raise ValueError(
                f"cannot resume the train data at epoch {sd.get('epoch')} batch {sd.get('batch_in_epoch')}:\n  "
                + "\n  ".join(problems)
            )
        self.epoch = int(sd["epoch"])
        self.batch_in_epoch = min(int(sd["batch_in_epoch"]), self.steps_per_epoch)
        self.num_skipped = int(sd.get("num_skipped", 0))

    def _stream(self, epoch: int, start_batch: int) -> _SlotStream:
        return _SlotStream(
            shards=self.shards, cfg=self.cfg, tokenizer=self.tokenizer, micro_batch_size=self.micro_batch_size,
            rank=self.rank, world_size=self.world_size, seed=self.seed, epoch=epoch,
            num_batches=self.steps_per_epoch, start_batch=start_batch, shuffle=True, num_epochs=None,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.close()
        return self._track(self._batches())

    def _batches(self) -> Generator[dict[str, Any], None, None]:
        if self.batch_in_epoch >= self.steps_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        batches = _load_batches(self._stream(self.epoch, self.batch_in_epoch), self.cfg.num_workers, self.pin_memory)
        try:
            for batch in batches:
                if self.batch_in_epoch >= self.steps_per_epoch:
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                position = tuple(batch.pop("__position__"))
                if position != (self.epoch, self.batch_in_epoch):  # the round robin is out of step: a bug
                    raise RuntimeError(
                        f"rank {self.rank}: got the batch of (epoch, batch) {position}, expected "
                        f"{(self.epoch, self.batch_in_epoch)}"
                    )
                count = int(batch["num_skipped"])
                self.num_skipped += count
                self._warner.add(count, batch.pop("__skipped__"))
                self.batch_in_epoch += 1
                yield batch
        finally:
            batches.close()
        raise RuntimeError(f"rank {self.rank}: the endless train stream ended at epoch {self.epoch}")  # a bug


class EvalLoader(_WorkerOwner):
    """Finite, deterministic, unshuffled micro-batches for one rank; iterate it again for each evaluation.

    Every rank yields `num_batches` = min(max_batches, samples // (micro_batch_size * world_size)) batches (at
    least 1; `max_batches` when the shards have no sizes.json). A rank whose shards hold fewer samples wraps
    around them, so all ranks step together. Each pass starts its workers and stops them at its end; `close()`
    stops those of unfinished passes.
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
    ):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank ({rank}) must be in [0, world_size ({world_size}))")
        self.cfg, self.tokenizer, self.micro_batch_size = cfg, tokenizer, micro_batch_size
        self.rank, self.world_size, self.pin_memory = rank, world_size, pin_memory
        self.shards = resolve_shards(shards)
        sizes = read_sizes(self.shards)
        self.num_batches = max_batches
        if sizes is not None:
            self.num_batches = max(1, min(max_batches, sum(sizes.values()) // (micro_batch_size * world_size)))
        self.num_skipped = 0
        self._warner = SkipWarner(cfg.warn_every, f"eval data rank {rank}")

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._track(self._batches())

    def _batches(self) -> Generator[dict[str, Any], None, None]:
        stream = _SlotStream(
            shards=self.shards, cfg=self.cfg, tokenizer=self.tokenizer, micro_batch_size=self.micro_batch_size,
            rank=self.rank, world_size=self.world_size, seed=0, epoch=0, num_batches=self.num_batches,
            start_batch=0, shuffle=False, num_epochs=1,
        )
        batches = _load_batches(stream, self.cfg.num_workers, self.pin_memory)
        try:
            for batch in batches:
                del batch["__position__"]
                count = int(batch["num_skipped"])
                self.num_skipped += count
                self._warner.add(count, batch.pop("__skipped__"))
                yield batch
        finally:
            batches.close()
