"""Resuming the train stream: exact on the same layout at any stop, at a cost that does not grow with the position,
on another world size or worker count without losing a sample of the epoch, and in resampled mode.

Ranks are simulated by one TrainLoader per rank in this process; `num_workers=2` starts real worker processes.
"""

from __future__ import annotations

import collections
import json
import tarfile
from pathlib import Path

import pytest
import torch

from mmscale.config import DataConfig
from mmscale.data import TrainLoader, make_shapes_dataset, resolve_shards

MICRO = 4


def data_cfg(**kw) -> DataConfig:
    # shuffle blocks of 6 samples cross the 8-sample shards: positions fall inside blocks and between shards
    base = dict(image_size=16, max_text_len=12, shuffle_buffer=6, num_workers=2, warn_every=100)
    base.update(kw)
    return DataConfig(**base)


def run(loader: TrainLoader, n: int) -> tuple[list[dict], list[dict]]:
    """n batches, and the loader's state before each of them and after the last (as a checkpoint stores it)."""
    batches, states = [], []
    it = iter(loader)
    for _ in range(n):
        states.append(json.loads(json.dumps(loader.state_dict())))
        batches.append(next(it))
    states.append(json.loads(json.dumps(loader.state_dict())))
    it.close()
    return batches, states


def keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["__key__"]]


def shard_keys(folder: Path) -> dict[str, set[str]]:
    """{shard path: the keys of its samples}."""
    out = {}
    for shard in resolve_shards(str(folder)):
        with tarfile.open(shard) as tar:
            out[shard] = {m.name.split(".", 1)[0] for m in tar}
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """8 shards x 8 samples (16 px)."""
    return make_shapes_dataset(tmp_path_factory.mktemp("resume"), 64, 8, 16, seed=1)


@pytest.fixture(scope="module")
def two_ranks(shards, sp_tokenizer):
    """An uninterrupted 2-rank x 2-worker run: per rank, 10 batches (one epoch of 8 and two of the next) and the
    state before each."""
    return [run(TrainLoader(data_cfg(), sp_tokenizer, MICRO, r, 2, seed=5, shards=str(shards)), 10) for r in range(2)]


def test_resume_at_any_stop_is_exact(shards, sp_tokenizer, two_ranks):
    all_keys = set().union(*shard_keys(shards).values())
    steps = 8
    for stop in (0, 2, 4, 7):  # the start; mid-shard; a shard boundary (both workers 8 samples in); the last batch
        epoch_keys = []
        for rank, (reference, states) in enumerate(two_ranks):
            sd = states[stop]
            assert [w["raw"] for w in sd["workers"]] == [MICRO * len(range(w, stop, 2)) for w in range(2)]
            resumed = TrainLoader(data_cfg(), sp_tokenizer, MICRO, rank, 2, seed=5, shards=str(shards))
            resumed.load_state_dict(sd)
            got, after = run(resumed, 10 - stop)
            for g, want in zip(got, reference[stop:], strict=True):
                assert g["__key__"] == want["__key__"], (stop, rank)
                for name in ("pixel_values", "input_ids", "labels", "attention_mask"):
                    torch.testing.assert_close(g[name], want[name], rtol=0, atol=0)
            assert after[-1] == states[10]  # the positions after agree too
            epoch_keys += keys(reference[:stop]) + keys(got[: steps - stop])
        assert sorted(epoch_keys) == sorted(all_keys), stop  # before + after the stop: one epoch, each sample once


def test_late_resume_decodes_and_opens_nothing_before_the_position(tmp_path, sp_tokenizer):
    # 50 shards x 4 samples (8 px) in blocks of 16: a partly read block spans 4 shards, some of them read whole
    folder = make_shapes_dataset(tmp_path, 200, 4, 8, seed=2)
    cfg = data_cfg(image_size=8, shuffle_buffer=16)

    def loader():
        return TrainLoader(cfg, sp_tokenizer, MICRO, 0, 1, seed=9, shards=str(folder))

    reference, states = run(loader(), 50)  # one epoch: 50 batches from 2 workers x 25 shards
    assert loader().steps_per_epoch == 50
    stop = 45  # 90 % of the epoch
    resumed = loader()
    resumed.load_state_dict(states[stop])
    got, _ = run(resumed, 50 - stop)
    assert [b["__key__"] for b in got] == [b["__key__"] for b in reference[stop:]]
    assert resumed.num_decoded == len(keys(got)) == 20  # no sample before the position was decoded
    seen = set(keys(reference[:stop]))
    consumed = {shard for shard, ks in shard_keys(folder).items() if ks <= seen}
    assert len(consumed) >= 40
    # none of them was opened, not even one inside a worker's partly read block (passed over by its sizes.json count)
    assert resumed.shards_opened and not set(resumed.shards_opened) & consumed
    assert len(resumed.shards_opened) <= 10  # per worker: the 4 shards of its partly read block, and the last one


def test_resume_on_fewer_ranks(shards, sp_tokenizer, two_ranks):
    stop = 3
    before = [k for reference, _ in two_ranks for k in keys(reference[:stop])]
    states = [s[stop] for _, s in two_ranks]
    one = TrainLoader(data_cfg(), sp_tokenizer, MICRO, 0, 1, seed=5, shards=str(shards))
    assert one.resume_problems(states[0]) == []
    with pytest.raises(ValueError, match=r"saved by 2 rank\(s\), this run has 1: .*all_ranks"):
        one.load_state_dict(states[0])
    one.load_state_dict(states[0], all_ranks=states[::-1])  # any order
    assert (one.epoch, one.batch_in_epoch, one.steps_per_epoch) == (0, 6, 16)  # 24 samples were read: batch 6 of 16
    got, after = run(one, 10)
    assert after[-1]["epoch"] == 1 and after[-1]["batch_in_epoch"] == 0
    seen = collections.Counter(before + keys(got))
    assert set(seen) == set().union(*shard_keys(shards).values())  # no sample of the epoch lost
    assert max(seen.values()) == 1  # and, the rest fitting the remaining batches exactly, none repeated

    # the plan epoch resumes exactly too, on its own layout
    again = TrainLoader(data_cfg(), sp_tokenizer, MICRO, 0, 1, seed=5, shards=str(shards))
    again.load_state_dict(after[4])
    assert [b["__key__"] for b in run(again, 6)[0]] == [b["__key__"] for b in got[4:]]


def test_resume_on_more_ranks_and_fewer_workers(shards, sp_tokenizer, two_ranks):
    all_keys = set().union(*shard_keys(shards).values())
    single, states = run(TrainLoader(data_cfg(), sp_tokenizer, MICRO, 0, 1, seed=5, shards=str(shards)), 5)
    seen = collections.Counter(keys(single))
    steps = []
    for rank in range(2):  # 1 rank -> 2
        loader = TrainLoader(data_cfg(), sp_tokenizer, MICRO, rank, 2, seed=5, shards=str(shards))
        loader.load_state_dict(states[5], all_ranks=[states[5]])
        assert (loader.epoch, loader.batch_in_epoch) == (0, 2)  # 20 samples read: batch 2 (16) of 8 per rank
        got, after = run(loader, loader.steps_per_epoch - loader.batch_in_epoch)
        assert after[-1]["epoch"] == 1 and after[-1]["batch_in_epoch"] == 0
        steps.append(len(got))
        seen.update(keys(got))
    assert steps == [6, 6]  # every rank steps the same number of times
    assert set(seen) == all_keys  # none lost
    # the 4 samples of the batch rounded away (20 read = 2.5 batches of the 2-rank run) are read twice
    assert sum(seen.values()) - len(all_keys) == 4

    stop = 3  # 2 workers -> 1, on the same 2 ranks: each rank's own state is enough
    seen = collections.Counter(k for reference, _ in two_ranks for k in keys(reference[:stop]))
    for rank, (_, rank_states) in enumerate(two_ranks):
        loader = TrainLoader(data_cfg(num_workers=1), sp_tokenizer, MICRO, rank, 2, seed=5, shards=str(shards))
        loader.load_state_dict(rank_states[stop])
        seen.update(keys(run(loader, 8 - stop)[0]))
    assert set(seen) == all_keys and sum(seen.values()) == len(all_keys)


def test_resampled_resumes_exactly(shards, sp_tokenizer):
    cfg = data_cfg(resampled=True)

    def loader(**kw):
        return TrainLoader(data_cfg(resampled=True, **kw), sp_tokenizer, MICRO, 1, 2, seed=5, shards=str(shards))

    reference, states = run(loader(), 20)  # 2.5 nominal epochs of 8 steps: the streams run on across them
    assert states[-1]["epoch"] == 2 and states[-1]["batch_in_epoch"] == 4
    assert len(set(keys(reference))) < len(keys(reference))  # drawn with replacement: samples repeat
    for stop in (5, 11):
        resumed = loader()
        resumed.load_state_dict(states[stop])
        got = run(resumed, 20 - stop)[0]
        assert [b["__key__"] for b in got] == [b["__key__"] for b in reference[stop:]]
        assert resumed.num_decoded == len(keys(got))
    assert cfg.resampled and [b["__key__"] for b in run(loader(), 3)[0]] == [b["__key__"] for b in reference[:3]]
    # on one worker: it draws on past both old workers' draws
    fewer = loader(num_workers=1)
    fewer.load_state_dict(states[11])
    drawn = max(w["sources"][0]["piece"] for w in states[11]["workers"])
    assert fewer.state_dict()["workers"][0]["sources"][0]["piece"] == drawn + 1
    assert len(run(fewer, 3)[0]) == 3
