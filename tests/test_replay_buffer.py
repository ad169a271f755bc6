"""The on-disk reservoir replay buffer (mmscale.continual.replay_buffer): uniform inclusion (a chi-square test that
also rejects biased variants), exact restarts, the split over ranks, crash safety, balanced groups, bytes kept out of
RAM, compaction, WebDataset-readable shards. Fast: no DeepSpeed, no process group."""

from __future__ import annotations

import io
import json
import math
import os
import random
import sys
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from mmscale.continual.replay_buffer import STATE_FILE, ReservoirBuffer, rank_share, shard_file_name


def item(i: int, size: int = 64) -> dict:
    """Offer number i: image-like bytes, a caption, a class, a source key (all distinct per i)."""
    return {"jpg": i.to_bytes(4, "little") * (size // 4), "txt": f"caption {i}", "cls": i % 5, "__key__": f"{i:06d}"}


def contents(buf: ReservoirBuffer) -> list[dict]:
    return list(buf.iter_all())


def shard_files(buf: ReservoirBuffer) -> list[Path]:
    return sorted(buf.directory.glob("*.tar"))


# ----------------------------------------------------------------------------------------------- (1) uniformity

N_OFFERED, CAPACITY, RUNS = 2000, 100, 200
ALPHA = 1e-3
"""The uniformity test's nominal false-alarm rate: a correct buffer fails it with probability 1e-3 (per set of
seeds; the seeds below are fixed, so the outcome is deterministic). The chi-square approximation at 10 expected
inclusions per item is slightly liberal: over 20,000 simulated experiments with exactly uniform 100-of-2000 subsets
the statistic exceeded the critical value in 0.14% of them."""


def chi2_critical(df: int, alpha: float) -> float:
    """Upper `alpha` quantile of chi-square(df): scipy's, else the Wilson-Hilferty approximation (within 0.1% of it
    at df = 1999)."""
    try:
        from scipy.stats import chi2
    except ImportError:
        from statistics import NormalDist

        z = NormalDist().inv_cdf(1 - alpha)
        return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return float(chi2.isf(alpha, df))


def inclusion_statistic(counts: list[int], runs: int, capacity: int) -> float:
    """Chi-square statistic of per-item inclusion counts over `runs` independent buffers.

    Under uniformity each run keeps a uniform `capacity`-subset of the N items, so count_i ~ Binomial(runs, p), p =
    capacity / N, and the counts' covariance is runs p (1 - p) N / (N - 1) (I - 11^T / N): the sum of
    (count_i - E)^2 / (E (1 - p)) scaled by (N - 1) / N is approximately chi-square with N - 1 degrees of freedom.
    """
    n = len(counts)
    p = capacity / n
    expected = runs * p
    return (n - 1) / n * sum((c - expected) ** 2 for c in counts) / (expected * (1 - p))


def inclusion_counts(cls: type[ReservoirBuffer], root: Path, runs: int) -> list[int]:
    counts = [0] * N_OFFERED
    for seed in range(runs):
        buf = cls(root / f"seed{seed}", CAPACITY, seed=seed)
        for i in range(N_OFFERED):
            buf.add({"cls": i})
        kept = contents(buf)
        assert len(kept) == CAPACITY and buf.seen == N_OFFERED
        for s in kept:
            counts[int(s["cls"])] += 1
    return counts


class KeepFirst(ReservoirBuffer):
    """Biased: keeps the first `capacity` samples and drops the rest."""

    def _decide(self, group: int) -> int:
        return len(self) if len(self) < self.capacity else -1


class ReplaceOldest(ReservoirBuffer):
    """Biased, subtler: the right acceptance probability capacity / t, but the oldest stored sample is replaced."""

    def _decide(self, group: int) -> int:
        if len(self) < self.capacity:
            return len(self)
        if self._rng.randrange(self._seen) >= self.capacity:
            return -1
        oldest = min(range(len(self)), key=lambda s: (self._shard[s], self._offset[s]))  # written first
        return oldest


def test_inclusion_is_uniform(tmp_path):
    counts = inclusion_counts(ReservoirBuffer, tmp_path, RUNS)
    stat, critical = inclusion_statistic(counts, RUNS, CAPACITY), chi2_critical(N_OFFERED - 1, ALPHA)
    assert sum(counts) == RUNS * CAPACITY
    assert stat < critical, f"chi2 {stat:.1f} >= {critical:.1f} (df {N_OFFERED - 1}, alpha {ALPHA}): not uniform"
    # and the first, middle and last items are all kept about capacity / N of the time
    thirds = [sum(counts[k * N_OFFERED // 3 : (k + 1) * N_OFFERED // 3]) / (RUNS * CAPACITY) for k in range(3)]
    assert all(abs(t - 1 / 3) < 0.02 for t in thirds), thirds


@pytest.mark.parametrize("variant", [KeepFirst, ReplaceOldest])
def test_uniformity_test_rejects_biased_buffers(tmp_path, variant):
    counts = inclusion_counts(variant, tmp_path, RUNS)
    stat, critical = inclusion_statistic(counts, RUNS, CAPACITY), chi2_critical(N_OFFERED - 1, ALPHA)
    assert sum(counts) == RUNS * CAPACITY
    assert stat > critical, f"{variant.__name__}: chi2 {stat:.1f} <= {critical:.1f}; the test has no power"


# ----------------------------------------------------------------------------------------------- (2) restarts

RESTART_KW = dict(capacity=50, seed=3, shard_bytes=8192, keep_commits=2)  # ~2 samples per shard: many shards


def offer(buf: ReservoirBuffer, start: int, stop: int, draws: list, commit_at: tuple[int, ...] = ()) -> None:
    """Offer start..stop-1; every 25 offers draw 3 samples with the buffer's own RNG (as the trainer callback will);
    commit after the offers in `commit_at`."""
    for i in range(start, stop):
        buf.add(item(i))
        if (i + 1) % 25 == 0:
            draws.append([s["__key__"] for s in buf.sample(3)])
        if i + 1 in commit_at:
            buf.commit()


def test_restart_is_bit_for_bit(tmp_path):
    import torch

    # uninterrupted, with the same commit at 300, and once more with no commit at all
    ref, ref_draws = ReservoirBuffer(tmp_path / "ref", **RESTART_KW), []
    offer(ref, 0, 500, ref_draws, commit_at=(300,))
    plain, plain_draws = ReservoirBuffer(tmp_path / "plain", **RESTART_KW), []
    offer(plain, 0, 500, plain_draws)

    # run A: state at 300 (commit + state_dict), goes on to 420 with another commit at 400, then dies
    a, a_draws = ReservoirBuffer(tmp_path / "run", **RESTART_KW), []
    offer(a, 0, 300, a_draws)
    state = a.state_dict()
    offer(a, 300, 420, a_draws, commit_at=(400,))
    del a
    # the state goes through a checkpoint the way the trainer stores it, and through JSON
    ckpt = tmp_path / "state.pt"
    torch.save({"callbacks": {"replay": state}}, ckpt)
    state = torch.load(ckpt, weights_only=True)["callbacks"]["replay"]
    assert json.loads(json.dumps(state)) == state
    assert len(json.dumps(state)) < 20_000  # counters, two RNG states, a 50-slot index

    b = ReservoirBuffer(tmp_path / "run", **RESTART_KW)  # opens the commit at 400 ...
    assert b.seen == 400
    b.load_state_dict(state)  # ... and is sent back to 300, as a resume from the older checkpoint does
    assert b.seen == 300 and len(b) == 50
    b_draws = a_draws[:12]  # the 12 draws up to offer 300
    offer(b, 300, 500, b_draws)

    assert contents(b) == contents(ref) == contents(plain)
    assert b_draws == ref_draws == plain_draws
    assert [s["__key__"] for s in b.sample(20)] == [s["__key__"] for s in ref.sample(20)]
    assert b.sample(20, random.Random(7)) == ref.sample(20, random.Random(7))
    # the future decisions too
    offer(b, 500, 800, b_draws)
    offer(ref, 500, 800, ref_draws)
    assert contents(b) == contents(ref) and b_draws == ref_draws
    sb, sr = b.state_dict(), ref.state_dict()
    assert (sb["seen"], sb["rng"], sb["draw_rng"]) == (sr["seen"], sr["rng"], sr["draw_rng"])


def test_reopening_the_last_commit_continues_exactly(tmp_path):
    ref, ref_draws = ReservoirBuffer(tmp_path / "ref", **RESTART_KW), []
    offer(ref, 0, 500, ref_draws)
    a, draws = ReservoirBuffer(tmp_path / "run", **RESTART_KW), []
    offer(a, 0, 300, draws, commit_at=(300,))
    offer(a, 300, 350, [])  # never committed: lost in the crash
    del a
    b = ReservoirBuffer(tmp_path / "run", **RESTART_KW)  # no state given: the last commit
    offer(b, 300, 500, draws)
    assert contents(b) == contents(ref) and draws == ref_draws


def test_a_state_whose_shards_are_gone_is_refused(tmp_path):
    buf = ReservoirBuffer(tmp_path, **{**RESTART_KW, "keep_commits": 1})
    offer(buf, 0, 100, [])
    old = buf.state_dict()
    offer(buf, 100, 400, [], commit_at=(200, 300, 400))
    with pytest.raises(OSError, match="missing"):
        buf.load_state_dict(old)


# ----------------------------------------------------------------------------------------------- (3) ranks


@pytest.mark.parametrize("capacity, world_size", [(101, 2), (100, 2), (10, 3), (7, 8), (1000, 64)])
def test_rank_shares_sum_to_capacity(capacity, world_size):
    shares = [rank_share(capacity, r, world_size) for r in range(world_size)]
    assert sum(shares) == capacity and max(shares) - min(shares) <= 1


def test_two_ranks_split_the_capacity(tmp_path):
    stream = [item(i) for i in range(1000)]
    ranks = [ReservoirBuffer(tmp_path, 101, rank=r, world_size=2, seed=1) for r in range(2)]
    for r, buf in enumerate(ranks):
        for s in stream[r::2]:  # each rank is fed its half of the stream
            buf.add(s)
        buf.commit()
    lens = [len(b) for b in ranks]
    assert sum(lens) == 101 and abs(lens[0] - lens[1]) <= 1 and sorted(lens) == [50, 51]
    assert [b.seen for b in ranks] == [500, 500]
    for r, buf in enumerate(ranks):
        assert buf.directory == tmp_path / f"rank{r}" and shard_files(buf)
        srcs = {int(s["src_key"]) for s in contents(buf)}
        assert all(i % 2 == r for i in srcs)  # only its own half
    keys = [s["__key__"] for b in ranks for s in contents(b)]
    assert len(set(keys)) == len(keys)  # keys are unique across ranks too
    with pytest.raises(ValueError, match="rank"):
        ReservoirBuffer(tmp_path, 101, rank=1, world_size=1)


# ----------------------------------------------------------------------------------------------- (4) crash safety


@pytest.mark.parametrize("fail_at, shard_bytes", [("shard", 1 << 20), ("state", 8192)])
def test_a_crash_mid_commit_leaves_the_last_commit(tmp_path, monkeypatch, fail_at, shard_bytes):
    # "shard": the rename of the shard written since the commit fails (big shards: it is still being written);
    # "state": the shards are renamed (small shards: some already when they filled up), state.json's rename fails
    kw = dict(capacity=40, seed=5, shard_bytes=shard_bytes)
    ref = ReservoirBuffer(tmp_path / "ref", **kw)
    offer(ref, 0, 400, [])

    buf = ReservoirBuffer(tmp_path / "run", **kw)
    offer(buf, 0, 300, [])
    buf.commit()
    committed = contents(buf)
    offer(buf, 300, 360, [])  # replaces some committed slots; written into a new shard, not committed

    real_replace = os.replace

    def failing_replace(src, dst):
        name = Path(dst).name
        if (fail_at == "shard" and name.endswith(".tar")) or (fail_at == "state" and name == STATE_FILE):
            raise OSError(f"simulated crash renaming {name}")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated crash"):
        buf.commit()
    with pytest.raises(RuntimeError, match="failed"):
        buf.add(item(360))  # the object is spent; the disk is what counts
    monkeypatch.setattr(os, "replace", real_replace)
    assert any(p.name.endswith(".tmp") for p in buf.directory.iterdir()) or fail_at == "state"
    (buf.directory / (STATE_FILE + ".tmp")).write_text('{"torn')  # a torn state write, as a power cut leaves it
    del buf

    reopened = ReservoirBuffer(tmp_path / "run", **kw)
    assert reopened.seen == 300 and contents(reopened) == committed
    assert not [p for p in reopened.directory.iterdir() if p.name.endswith(".tmp")]  # cleaned up
    referenced = {shard_file_name(no) for no, _size, _garbage in reopened.state_dict()["shards"]}
    assert {p.name for p in shard_files(reopened)} == referenced  # shards written after the commit are gone
    offer(reopened, 300, 400, [])  # and it goes on as if nothing had happened
    assert contents(reopened) == contents(ref)


# ----------------------------------------------------------------------------------------------- (5) balance


@pytest.mark.parametrize("capacity", [100, 103])
def test_class_balance_with_classes_in_blocks(tmp_path, capacity):
    buf = ReservoirBuffer(tmp_path, capacity, seed=2, balance="class")
    i = 0
    for cls in range(4):
        for _ in range(300):
            buf.add({"txt": f"sample {i}", "cls": cls})
            i += 1
        counts = buf.group_counts()
        assert list(counts) == [str(c) for c in range(cls + 1)]
        assert sum(counts.values()) == capacity and max(counts.values()) - min(counts.values()) <= 1, counts
    stored = {}
    for s in contents(buf):
        stored[s["cls"]] = stored.get(s["cls"], 0) + 1
    assert {k.decode(): v for k, v in stored.items()} == buf.group_counts()
    # the balanced state survives a restart exactly
    state = buf.state_dict()
    again = ReservoirBuffer(tmp_path, capacity, seed=2, balance="class")
    again.load_state_dict(state)
    for j in range(i, i + 200):
        buf.add({"txt": f"sample {j}", "cls": j % 6})
        again.add({"txt": f"sample {j}", "cls": j % 6})
    assert contents(again) == contents(buf) and again.group_counts() == buf.group_counts()


def test_task_balance_keeps_a_rare_task_whole(tmp_path):
    buf = ReservoirBuffer(tmp_path, 100, seed=4, balance="task")
    for i in range(2000):
        buf.add({"txt": f"s{i}", "task": "rare" if i % 100 == 0 else "common"})  # 20 rare among 2000
    assert buf.group_counts() == {"rare": 20, "common": 80}
    with pytest.raises(ValueError, match="'task' member"):
        buf.add({"txt": "no task"})


# ----------------------------------------------------------------------------------------------- (6) RAM


def test_sample_bytes_stay_on_disk(tmp_path):
    n, size = 1000, 100_000
    tracemalloc.start()
    try:
        buf = ReservoirBuffer(tmp_path, n, seed=0)
        for i in range(n):
            buf.add({"jpg": bytes([i % 251]) * size, "txt": f"caption {i}", "cls": i})  # made here, one at a time
        buf.commit()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    data = n * size
    assert len(buf) == n and sum(p.stat().st_size for p in shard_files(buf)) > data
    assert peak < data / 50, f"peak traced allocation {peak} bytes while adding {data} bytes of samples"
    index = sum(sys.getsizeof(a) for a in (buf._shard, buf._offset, buf._length))
    assert index < 40 * n  # 24 bytes per slot
    for s in buf.sample(5, random.Random(0)):
        i = int(s["cls"])
        assert s["jpg"] == bytes([i % 251]) * size and s["txt"] == f"caption {i}".encode()


# ----------------------------------------------------------------------------------------------- compaction, format


def test_compaction_bounds_the_disk_and_keeps_the_content(tmp_path):
    kw = dict(capacity=30, seed=6, shard_bytes=1 << 20)  # one shard per commit
    never = ReservoirBuffer(tmp_path / "never", **kw, compact_garbage=1.0)
    buf = ReservoirBuffer(tmp_path / "compacted", **kw)
    for i in range(3000):
        never.add(item(i))
        buf.add(item(i))
        if (i + 1) % 100 == 0:
            never.commit()
            buf.commit()
            stats = buf.stats()
            assert stats["garbage_bytes"] <= 0.5 * (stats["garbage_bytes"] + stats["live_bytes"]), stats
    assert contents(buf) == contents(never)
    assert never.stats()["garbage_bytes"] > 0.7 * (never.stats()["garbage_bytes"] + never.stats()["live_bytes"])
    on_disk = sum(p.stat().st_size for p in shard_files(buf))
    assert on_disk < sum(p.stat().st_size for p in shard_files(never)) / 2
    # live data, at most as much garbage, the shards kept for the commit before, tar end blocks
    assert on_disk <= 3 * buf.stats()["live_bytes"] + 1024 * len(shard_files(buf))
    reopened = ReservoirBuffer(tmp_path / "compacted", **kw)
    assert contents(reopened) == contents(buf)


def test_shards_are_webdataset_shards(tmp_path):
    from PIL import Image

    from mmscale.data.pipeline import SkipCounter, decode_sample, tar_samples

    buf = ReservoirBuffer(tmp_path, 20, seed=0, shard_bytes=1 << 16)
    for i in range(100):
        img = io.BytesIO()
        Image.new("RGB", (40, 30), (i, 255 - i, 0)).save(img, format="JPEG")
        buf.add({"jpg": img.getvalue(), "txt": f"a shape number {i}", "cls": i, "__key__": f"src{i:04d}",
                 "__url__": "shards/train-000001.tar"})
    buf.commit()
    kept = {s["__key__"]: s for s in contents(buf)}
    counter = SkipCounter()
    read = {s["__key__"]: s for s in tar_samples([str(p) for p in shard_files(buf)], counter)}
    assert counter.count == 0 and len(shard_files(buf)) > 1
    for p in shard_files(buf):
        with tarfile.open(p) as tar:  # plain tar readers agree
            assert all(m.isreg() and m.mtime == 0 for m in tar.getmembers())
    for key, s in kept.items():  # shards hold the kept samples (and replaced ones, until compaction)
        assert {k: v for k, v in read[key].items() if k != "__url__"} == s
        assert s["src_key"] == f"src{int(s['cls']):04d}".encode() and s["src_url"] == b"shards/train-000001.tar"
        decoded = decode_sample(s, image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)  # the pipeline's decode stage
        assert decoded["images"][0].shape == (3, 16, 16) and decoded["caption"] == f"a shape number {int(s['cls'])}"


def test_arguments_and_samples_are_checked(tmp_path):
    buf = ReservoirBuffer(tmp_path, 10, seed=1)
    for i in range(20):
        buf.add(item(i))
    buf.commit()
    with pytest.raises(ValueError, match="capacity is 10 there, 12 here"):
        ReservoirBuffer(tmp_path, 12, seed=1)
    with pytest.raises(ValueError, match="seed is 1 there, 2 here"):
        ReservoirBuffer(tmp_path, 10, seed=2)
    other = ReservoirBuffer(tmp_path / "other", 10, rank=1, world_size=2, seed=1)
    with pytest.raises(ValueError, match="rank is 0 there, 1 here"):
        other.load_state_dict(buf.state_dict())
    for bad, error in [({"jpg": 1.5}, TypeError), ({"JPG": b"x"}, ValueError), ({"__local_path__": "x"}, ValueError),
                       ({"cls": True}, TypeError), ([b"x"], TypeError)]:
        with pytest.raises(error):
            buf.add(bad)
    assert buf.seen == 20  # a refused sample changes nothing
    with pytest.raises(ValueError, match="capacity"):
        ReservoirBuffer(tmp_path / "x", 0)
    with pytest.raises(ValueError, match="balance"):
        ReservoirBuffer(tmp_path / "x", 5, balance="label")
    with pytest.raises(ValueError, match="empty"):
        ReservoirBuffer(tmp_path / "empty", 5).sample(1)
