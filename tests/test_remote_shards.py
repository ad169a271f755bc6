"""Remote shards: http(s) shards from a real HTTP server on 127.0.0.1 (in a thread) stream like local files; a
dropped connection is retried without losing or doubling a sample; a failing server ends in a clear error after
N attempts; network failures are never counted as corrupt samples. `pipe:` shards only when the config allows them.
"""

from __future__ import annotations

import http.server
import socket
import struct
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from mmscale.config import ConfigError, DataConfig
from mmscale.job.preflight import config_from_dict
from mmscale.data import TrainLoader, check_shard_spec, resolve_shards
from mmscale.data.reading import BROKEN_TAR, NETWORK_RETRY, RemoteShardError, SkipCounter, tar_samples
from mmscale.data.shards import ShardSpecError


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.plan: dict[str, list[str]] = {}  # path -> what its next requests get (then "ok")
        self.requests: Counter[str] = Counter()
        self.swap: dict[str, bytes] = {}  # path -> the bytes a "swapped" request serves


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        path = self.path.lstrip("/")
        self.server.requests[path] += 1
        plan = self.server.plan.get(path) or ["ok"]
        action = plan.pop(0) if self.server.plan.get(path) else "ok"
        if action.isdigit():  # an HTTP error status
            self.send_error(int(action))
            return
        file = self.server.root / path
        if not file.is_file():
            self.send_error(404)
            return
        data = self.server.swap[path] if action == "swapped" else file.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if action in ("drop", "reset"):  # half the body, then the connection goes
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            if action == "reset":  # an RST, as from a crashed proxy, instead of a clean close
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        self.wfile.write(data)


@pytest.fixture
def server(shapes_shards):
    srv = _Server(Path(shapes_shards))
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


def _members(samples) -> list[tuple[str, dict]]:
    return [(s["__key__"], {k: v for k, v in s.items() if k != "__url__"}) for s in samples]


def _local(shapes_shards, *names) -> list[tuple[str, dict]]:
    return _members(tar_samples([str(Path(shapes_shards) / n) for n in names], SkipCounter()))


# ----------------------------------------------------------------------------------------------- http


def test_http_shards_stream_like_local_files(server, shapes_shards, sp_tokenizer, tmp_path):
    names = sorted(p.name for p in Path(shapes_shards).glob("*.tar"))
    counter = SkipCounter()
    over_http = _members(tar_samples([f"{server.base}/{n}" for n in names], counter))
    assert over_http == _local(shapes_shards, *names) and len(over_http) == 64
    assert counter.take() == (0, []) and counter.take_kinds() == {}

    # The loader, given a list file of URLs, makes the same batches as from the local folder.
    listing = tmp_path / "shards.txt"
    listing.write_text("".join(f"{server.base}/{n}\n" for n in names))
    cfg = DataConfig(image_size=32, max_text_len=12, num_samples=64, shuffle_buffer=8, num_workers=0)

    def batches(spec: str) -> list[dict]:
        it = iter(TrainLoader(cfg, sp_tokenizer, 4, 0, 1, seed=3, shards=spec))
        out = [next(it) for _ in range(8)]
        it.close()
        return out

    remote, local = batches(str(listing)), batches(str(shapes_shards))
    for a, b in zip(remote, local, strict=True):
        assert a["__key__"] == b["__key__"]
        assert a["input_ids"].equal(b["input_ids"]) and a["pixel_values"].equal(b["pixel_values"])


@pytest.mark.parametrize("how", ["drop", "reset"])
def test_dropped_connection_is_retried_and_no_sample_is_lost_or_doubled(server, shapes_shards, caplog, how):
    server.plan["train-000001.tar"] = [how]  # its first response breaks off half-way
    urls = [f"{server.base}/train-00000{i}.tar" for i in range(3)]
    counter = SkipCounter()
    with caplog.at_level("WARNING", logger="mmscale.data.pipeline"):
        got = _members(tar_samples(urls, counter, http_retries=2, http_backoff_s=0.01))
    assert got == _local(shapes_shards, "train-000000.tar", "train-000001.tar", "train-000002.tar")
    assert server.requests["train-000001.tar"] == 2
    assert counter.take() == (0, [])  # no corrupt sample
    assert counter.take_kinds() == {NETWORK_RETRY: 1}
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "train-000001.tar: network failure" in warning and "retry 1 of 2" in warning
    if how == "drop":  # (an RST discards what the client has not read yet: it fails before any sample)
        assert "reading on after its 3 sample(s) already used" in warning  # it broke inside the 4th of 8


def test_failing_server_ends_in_a_clear_error_after_n_attempts(server):
    server.plan["train-000000.tar"] = ["503"] * 10
    counter = SkipCounter()
    t0 = time.perf_counter()
    with pytest.raises(RemoteShardError) as e:
        list(tar_samples([f"{server.base}/train-000000.tar"], counter, http_retries=2, http_backoff_s=0.05))
    assert time.perf_counter() - t0 >= 0.05 + 0.1  # backoff doubles: 0.05, then 0.1
    msg = str(e.value)
    for part in (f"{server.base}/train-000000.tar", "failed 3 time(s) in a row", "data.http_retries=2",
                 "HTTP Error 503", "raise data.http_retries"):
        assert part in msg, (part, msg)
    assert server.requests["train-000000.tar"] == 3
    assert counter.take() == (0, []) and counter.take_kinds() == {NETWORK_RETRY: 2}


@pytest.mark.parametrize("status, words", [(403, "Forbidden"), (404, "Not Found")])
def test_permission_or_missing_shard_is_reported_as_such_not_as_a_corrupt_sample(server, status, words):
    server.plan["train-000000.tar"] = [str(status)] * 10
    counter = SkipCounter()
    with pytest.raises(RemoteShardError, match=rf"HTTP Error {status}: {words}.*403/404 is the server refusing"):
        list(tar_samples([f"{server.base}/train-000000.tar"], counter, http_retries=1, http_backoff_s=0.01))
    assert counter.take() == (0, []) and counter.take_kinds() == {NETWORK_RETRY: 1}


def test_refused_connection_names_the_url():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/train-000000.tar"
    with pytest.raises(RemoteShardError, match=rf"{url}: failed 1 time\(s\).*(refused|Errno)"):
        list(tar_samples([url], SkipCounter(), http_retries=0))


def test_corrupt_tar_served_whole_is_a_broken_tar_not_a_retry(server, shapes_shards, tmp_path):
    shard = Path(shapes_shards) / "train-000000.tar"
    with tarfile.open(shard) as tar:
        offsets = [m.offset_data for m in tar]
    server.swap["train-000000.tar"] = shard.read_bytes()[: offsets[6] + 50]  # cut inside the 4th sample's image
    server.plan["train-000000.tar"] = ["swapped"]
    counter = SkipCounter()
    got = _members(tar_samples([f"{server.base}/train-000000.tar"], counter, http_retries=3, http_backoff_s=0.01))
    assert got == _local(shapes_shards, "train-000000.tar")[:3]
    assert server.requests["train-000000.tar"] == 1
    assert counter.take_kinds() == {BROKEN_TAR: 1}


def test_a_shard_changed_between_attempts_stops_instead_of_mixing_two_versions(server, shapes_shards):
    server.swap["train-000000.tar"] = (Path(shapes_shards) / "train-000001.tar").read_bytes()
    server.plan["train-000000.tar"] = ["drop", "swapped"]
    with pytest.raises(RemoteShardError, match="changed while it was read"):
        list(tar_samples([f"{server.base}/train-000000.tar"], SkipCounter(), http_backoff_s=0.01))


# ----------------------------------------------------------------------------------------------- pipe:


def test_pipe_shards_are_refused_unless_allowed(shapes_shards, tmp_path):
    shard = Path(shapes_shards) / "train-000000.tar"
    pipe = f"pipe:cat {shard}"
    def pipe_problems(raw: dict) -> list[str]:
        try:
            config_from_dict(raw)
        except ConfigError as e:  # (train shards need a tokenizer too, which these configs lack)
            return [p for p in e.problems if "is a pipe: shard" in p]
        return []

    for field in ("train_shards", "val_shards"):
        raw = {"data": {"synthetic_train_samples": 8, "num_samples": 8, field: pipe}}
        (problem,) = pipe_problems(raw)
        assert problem.startswith(f"data.{field}: {pipe!r} is a pipe: shard") and "data.allow_pipe=true" in problem
        raw["data"]["allow_pipe"] = True
        assert pipe_problems(raw) == []

    listing = tmp_path / "shards.txt"
    listing.write_text(f"# local, then a command\n{shard}\n{pipe}\n")
    with pytest.raises(ShardSpecError, match=rf"list file .*shards.txt' line 3 names {pipe!r}.*data.allow_pipe"):
        resolve_shards(str(listing))
    (problem,) = check_shard_spec(str(listing), "data.train_shards")
    assert problem.startswith("data.train_shards: list file") and "allow_pipe" in problem
    assert resolve_shards(str(listing), allow_pipe=True) == [str(shard), pipe]
    assert check_shard_spec(str(listing), "data.train_shards", allow_pipe=True) == []

    with pytest.raises(ShardSpecError, match="data.allow_pipe"):  # the reader refuses it too
        list(tar_samples([pipe], SkipCounter()))
    counter = SkipCounter()
    assert _members(tar_samples([pipe], counter, allow_pipe=True)) == _local(shapes_shards, "train-000000.tar")
    assert counter.take() == (0, [])
