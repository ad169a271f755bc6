"""Data-loader worker processes: one set per `iter()` for all epochs, stopped by `close()`, `with`, a new `iter()`
or dropping the iterator; and the batch order across epoch boundaries when workers persist."""

from __future__ import annotations

import gc

import psutil  # a DeepSpeed dependency
import pytest

from mmscale.config import DataConfig
from mmscale.data import EvalLoader, TrainLoader


def data_cfg(**kw) -> DataConfig:
    base = dict(image_size=32, max_text_len=12, shuffle_buffer=16, num_workers=2, warn_every=100)
    base.update(kw)
    return DataConfig(**base)


def live_children() -> set[int]:
    """Live processes below this one (DataLoader workers are children of the process that iterates)."""
    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.add(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def alive(pids: set[int]) -> set[int]:
    return pids & live_children()


def keys(batches) -> list[list[str]]:
    return [b["__key__"] for b in batches]


def _take(loader, n):
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


@pytest.fixture
def train_loader(shapes_shards, sp_tokenizer):
    def make(**kw):
        # 36 samples per epoch / 4 = 9 steps: not divisible by the 2 workers, so worker roles swap between epochs.
        cfg = data_cfg(**{"num_samples": 36, **kw})
        return TrainLoader(cfg, sp_tokenizer, 4, 0, 1, seed=11, shards=str(shapes_shards))

    return make


def test_one_set_of_workers_for_all_epochs(train_loader):
    loader = train_loader()
    assert loader.steps_per_epoch == 9
    before = live_children()
    seen: set[int] = set()
    it = iter(loader)
    for _ in range(3 * loader.steps_per_epoch):
        next(it)
        seen |= live_children() - before
    assert len(seen) == 2, f"3 epochs started {len(seen)} worker processes; one set of 2 expected"
    assert alive(seen) == seen  # still there between epochs, ready for the next batch
    it.close()
    assert not alive(seen)


def test_close_stops_workers_and_iteration_resumes(train_loader):
    reference = keys(_take(train_loader(), 14))
    loader = train_loader()
    before = live_children()
    it = iter(loader)
    got = [next(it) for _ in range(5)]
    workers = live_children() - before
    assert len(workers) == 2
    loader.close()
    assert not alive(workers), "close() left worker processes alive"
    with pytest.raises(StopIteration):
        next(it)
    loader.close()  # idempotent
    it = iter(loader)  # a fresh set of workers, at the loader's position (mid-epoch, with the roles relabelled)
    got += [next(it) for _ in range(9)]
    fresh = live_children() - before
    assert fresh and not fresh & workers
    loader.close()
    assert not alive(fresh)
    assert keys(got) == reference


def test_context_manager_new_iter_and_dropped_iterator_stop_workers(train_loader, shapes_val_shards, sp_tokenizer):
    before = live_children()
    with train_loader() as loader:
        first = iter(loader)
        next(first)
        first_workers = live_children() - before
        second = iter(loader)  # one position, one stream: the previous iterator is closed
        assert not alive(first_workers)
        next(second)
        second_workers = live_children() - before
        assert len(first_workers) == len(second_workers) == 2
    assert not alive(second_workers), "leaving the with block left worker processes alive"

    third = iter(train_loader())
    next(third)
    third_workers = live_children() - before
    del third  # dropped without close(): collecting the generator stops its workers
    gc.collect()
    assert len(third_workers) == 2 and not alive(third_workers)

    evaluator = EvalLoader(data_cfg(), sp_tokenizer, 2, 0, 1, shards=str(shapes_val_shards), max_batches=4)
    assert len(list(evaluator)) == 4 and not live_children() - before  # a full pass stops its workers
    partial = iter(evaluator)
    next(partial)
    eval_workers = live_children() - before
    assert len(eval_workers) == 2
    evaluator.close()
    assert not alive(eval_workers)
    assert len(list(evaluator)) == 4  # usable after close()




@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core machine: fine here
@pytest.mark.parametrize("num_workers", [2, 3])
def test_order_across_epoch_boundaries(train_loader, num_workers):
    """Persistent workers give the batches of a fresh set of workers per epoch, in the same order, also when
    steps_per_epoch (9) is not divisible by the worker count; and a resume across the boundary continues it."""
    steps = 9
    stream = keys(_take(train_loader(num_workers=num_workers), 3 * steps + 2))
    per_epoch = []
    for epoch in range(3):
        fresh = train_loader(num_workers=num_workers)
        fresh.load_state_dict({"epoch": epoch, "batch_in_epoch": 0})
        per_epoch += keys(_take(fresh, steps))
    assert stream[: 3 * steps] == per_epoch
    assert len({tuple(k) for k in stream[:steps]}) == steps  # distinct batches, not one repeated
    resumed = train_loader(num_workers=num_workers)
    resumed.load_state_dict({"epoch": 0, "batch_in_epoch": 7})  # the stream then crosses two epoch boundaries
    assert keys(_take(resumed, 2 * steps + 4)) == stream[7:]
    assert resumed.state_dict()["epoch"] == 3 and resumed.state_dict()["batch_in_epoch"] == 2
