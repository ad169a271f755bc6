"""Which failures are a dead peer (issue 18, finding 11): only an exception raised inside a collective (a gloo or
NCCL error, or a timeout, surfacing from torch.distributed or from DeepSpeed's waits on it) makes a rank report "a
collective failed" and exit 4; a data error, a full disk or a model error takes the normal error path with its own
message, whatever words it carries ("timed out", "socket", "connection refused").

The fast tests classify real exceptions: a gloo world of two processes whose rank 1 exits (or stays silent past the
timeout) while rank 0 calls mmscale's collectives and DeepSpeed-like engine verbs, and, in this process, an http
shard that times out, writes to a full disk (/dev/full) and model errors. The slow one is a real 2-rank training run
whose rank 1 fails in its data worker.

    python tests/test_failure_kinds.py ... is that run's script (started by the deepspeed launcher).
"""

from __future__ import annotations

import datetime
import errno
import json
import multiprocessing
import os
import socket
import sys
from pathlib import Path

import pytest
import torch

from mmscale.data.reading import RemoteShardError, SkipCounter, tar_samples
from mmscale.training import cluster

ROOT = Path(__file__).resolve().parents[1]
needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a disk that is full)")


def _raised(fn) -> BaseException:
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return e
    raise AssertionError(f"{fn} raised nothing")


def _remote_shard_timeout() -> RemoteShardError:
    """The real reader on an http shard whose server accepts the connection and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)  # the kernel completes the handshake; nobody ever reads or writes
        url = f"http://127.0.0.1:{server.getsockname()[1]}/train-000000.tar"
        e = _raised(lambda: list(tar_samples([url], SkipCounter(), http_retries=0, http_timeout_s=0.3)))
    assert isinstance(e, RemoteShardError) and "timed out" in str(e), e
    return e


def _raise_remote_shard_timeout() -> None:
    raise _remote_shard_timeout()  # (its traceback still ends in the reader)


def _write_to_full_disk() -> None:
    with open("/dev/full", "w") as f:  # every write to /dev/full fails with ENOSPC
        f.write("step 7\n")


def _checkpoint_to_full_disk() -> None:
    torch.save({"w": torch.ones(1000)}, "/dev/full")  # a RuntimeError from torch's C++ zip writer


class _DeepSpeedLike:
    """Stands in for a DeepSpeed engine behind mmscale's `Engine`: `forward` gathers a partitioned parameter as
    ZeRO-3 does (an async all_gather waited on through DeepSpeed's own handle, so the error surfaces in DeepSpeed's
    code), `step` all-reduces as gradient reduction does, `save_checkpoint` writes with torch.save. `fail` makes the
    model or the writer fail instead."""

    def __init__(self, fail: str = "", path: str = "/dev/full"):
        self.fail, self.path = fail, path

    def __call__(self, **batch):
        if self.fail == "shape":
            return torch.ones(2, 3) @ torch.ones(2, 3)  # a model bug: RuntimeError from torch's C++
        if self.fail == "words":
            raise RuntimeError("decoding the frame cache timed out (socket closed, connection refused)")
        import torch.distributed as dist
        from deepspeed.runtime.zero.partition_parameters import AllGatherHandle, ZeroParamStatus

        p = torch.nn.Parameter(torch.zeros(2))
        full = torch.zeros(2 * dist.get_world_size())
        handle = dist.all_gather_into_tensor(full, torch.ones(2), async_op=True)
        p.ds_status = ZeroParamStatus.INFLIGHT
        AllGatherHandle(handle, p).wait()
        return full

    def step(self):
        import torch.distributed as dist

        dist.all_reduce(torch.ones(4))

    def save_checkpoint(self, directory, tag, **_):
        torch.save({"w": torch.ones(1000)}, self.path)


def _engine(fail: str = ""):
    from mmscale.training.engine import Engine

    return Engine(ds=_DeepSpeedLike(fail), world_size=2, rank=0, grad_accum=1)


def _verdicts(cases: dict) -> dict[str, dict]:
    out = {}
    for name, fn in cases.items():
        try:
            fn()
            out[name] = {"raised": None}
        except Exception as e:  # noqa: BLE001
            out[name] = {"raised": f"{type(e).__name__}: {str(e)[:200]}", "peer": cluster.is_peer_failure(e)}
    return out


# ----------------------------------------------------------------------------------------------- 2 ranks, gloo


def _rank_main(rank: int, port: int, scenario: str, out: str) -> None:
    """One rank of a 2-process gloo world (2 s collective timeout). Rank 1 leaves (`dead`: exits; `silent`: stays
    but never joins another collective); rank 0 records how each failure it then meets is classified."""
    import time

    import torch.distributed as dist

    from mmscale.training import engine

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=2))
    engine.barrier()  # both are up
    if rank == 1:
        if scenario == "silent":
            time.sleep(30)
        os._exit(0)
    time.sleep(0.5)  # rank 1 is gone (or silent)
    cases = {
        "all_reduce_sum": lambda: engine.all_reduce_sum([1.0, 2.0]),
        "zero3_forward": lambda: _engine().forward(x=torch.ones(1)),
        "step": lambda: _engine().step(),
    }
    if scenario == "dead":
        cases.update({
            "barrier": engine.barrier,
            "broadcast_object": lambda: engine.broadcast_object({"step": 7}),
            "all_gather_object": lambda: engine.all_gather_object(7),
            # the same broken world: failures that are not a collective's
            "model_error": lambda: _engine("shape").forward(x=torch.ones(1)),
            "model_error_words": lambda: _engine("words").forward(x=torch.ones(1)),
            "remote_shard": _raise_remote_shard_timeout,
        })
        if os.path.exists("/dev/full"):
            cases.update({"disk_full": _write_to_full_disk, "checkpoint_disk_full": lambda: _engine().save("d", "t")})
    Path(out).write_text(json.dumps(_verdicts(cases)))
    os._exit(0)


def _two_ranks(scenario: str, tmp_path: Path) -> dict[str, dict]:
    ctx = multiprocessing.get_context("spawn")  # a fork of pytest (torch's threads started) could hang
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / f"{scenario}.json"
    procs = [ctx.Process(target=_rank_main, args=(r, port, scenario, str(out))) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        procs[0].join(120)  # rank 0 records; rank 1 (gone, or silent on purpose) is then stopped
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    assert out.exists(), f"rank 0 wrote no verdicts (exit codes {[p.exitcode for p in procs]})"
    return json.loads(out.read_text())


def test_a_dead_peer_fails_every_collective_as_a_peer_failure_and_nothing_else(tmp_path):
    """Rank 1 exits: each of mmscale's collectives and each engine verb that runs one (ZeRO-3's gather waited on in
    DeepSpeed's code, the step's reduction) is a peer failure on rank 0; a model error, an http shard that timed
    out and a full disk, met in the same broken world, are not."""
    v = _two_ranks("dead", tmp_path)
    collectives = ["all_reduce_sum", "barrier", "broadcast_object", "all_gather_object", "zero3_forward", "step"]
    others = ["model_error", "model_error_words", "remote_shard"] + \
        (["disk_full", "checkpoint_disk_full"] if os.path.exists("/dev/full") else [])
    for name in collectives + others:
        assert v[name]["raised"], (name, v[name])
    assert {n: v[n]["peer"] for n in collectives} == {n: True for n in collectives}, v
    assert {n: v[n]["peer"] for n in others} == {n: False for n in others}, v


def test_a_timeout_inside_a_collective_is_a_peer_failure(tmp_path):
    """Rank 1 is alive but never joins: rank 0's collectives time out (2 s), and that is a peer failure."""
    v = _two_ranks("silent", tmp_path)
    for name in ("all_reduce_sum", "zero3_forward", "step"):
        assert v[name]["raised"] and v[name]["peer"] is True, (name, v)


# ----------------------------------------------------------------------------------------------- one process


def test_an_http_shard_that_timed_out_is_not_a_peer_failure():
    assert not cluster.is_peer_failure(_remote_shard_timeout())


@needs_dev_full
def test_a_full_disk_is_not_a_peer_failure():
    e = _raised(_write_to_full_disk)
    assert isinstance(e, OSError) and e.errno == errno.ENOSPC, e
    assert not cluster.is_peer_failure(e)
    assert not cluster.is_peer_failure(_raised(_checkpoint_to_full_disk))


def test_words_alone_never_make_a_peer_failure():
    """Errors raised outside any collective, carrying every word the old classifier matched."""
    def raise_(e):
        def f():
            raise e
        return f

    for e in (OSError(errno.ENOSPC, "No space left on device", "/shared/run/metrics.jsonl"),
              RemoteShardError("http://shards/train-3.tar: failed 6 time(s) in a row; last error: timed out"),
              RuntimeError("socket closed by peer: connection refused, gloo nccl timeout, broken pipe"),
              ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
              TimeoutError("timed out"),
              # a data-loader worker's error comes back re-raised with the worker's traceback in its message
              OSError("Caught OSError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                      "last):\n  File \"reading.py\", line 323, in _read_http_tar\n    urlopen(request, "
                      "timeout=timeout_s)\nOSError: [Errno 28] No space left on device")):
        assert not cluster.is_peer_failure(_raised(raise_(e))), e


def test_engine_verbs_pass_a_non_collective_error_through_unchanged():
    """Outside a process group: the model's and the writer's own errors keep their type and message."""
    shape = _raised(lambda: _engine("shape").forward(x=torch.ones(1)))
    assert type(shape) is RuntimeError and "cannot be multiplied" in str(shape), shape
    words = _raised(lambda: _engine("words").forward(x=torch.ones(1)))
    assert type(words) is RuntimeError and not cluster.is_peer_failure(words)
    if os.path.exists("/dev/full"):
        full = _raised(lambda: _engine().save("d", "t"))
        assert type(full) is RuntimeError and not cluster.is_peer_failure(full)


# ----------------------------------------------------------------------------------------------- a real run


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["enospc", "remote_timeout"])
def test_a_rank_whose_data_fails_names_its_error_not_a_collective(fault, tmp_path):
    """2 ranks (ZeRO-3, gloo): rank 1's data worker fails at its third batch. Rank 1 ends with that error's
    traceback, not "a collective failed"; rank 0, whose peer is gone, names rank 1 and exits 4."""
    from test_training import launch

    run = tmp_path / "run"
    r = launch(Path(__file__), [fault, "--config", str(ROOT / "configs/tiny.yaml"), f"output_dir={run}",
                                "train.max_steps=6", "deepspeed.collective_timeout_s=60"], nprocs=2, check=False)
    log = r.stdout + r.stderr
    assert r.returncode != 0, log[-4000:]
    named = "No space left on device" if fault == "enospc" else "last error: timed out"
    assert named in log, log[-6000:]
    assert "rank 1: a collective failed" not in log, log[-6000:]
    assert "rank 0: a collective failed" in log and "rank(s) 1 " in log, log[-6000:]


def _fail_rank1_data(fault: str) -> None:
    """Rank 1's data stream raises at its third batch (in the data-loader worker, forked from here)."""
    from mmscale.data import pipeline

    real = pipeline._SlotStream._batch

    def _batch(self, samples, reader, counter, epoch, i, worker):
        if self.rank == 1 and i >= 2:
            if fault == "enospc":
                raise OSError(errno.ENOSPC, "No space left on device", "/scratch/cache/train-000001.idx")
            raise RemoteShardError("http://shards.example/train-000001.tar: failed 6 time(s) in a row "
                                   "(data.http_retries=5), after 0 sample(s) read; last error: timed out")
        return real(self, samples, reader, counter, epoch, i, worker)

    pipeline._SlotStream._batch = _batch


if __name__ == "__main__":  # the slow test's run: launchers/train.py with rank 1's data failing
    import runpy

    fault = next(a for a in sys.argv[1:] if a in ("enospc", "remote_timeout"))
    sys.argv.remove(fault)  # (the deepspeed launcher puts its --local_rank first)
    _fail_rank1_data(fault)
    sys.argv[0] = str(ROOT / "launchers/train.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
