"""Data-layer faults of issue 18 (findings 7, 10, 14, 16), each reproduced on real shards, files and configs:

- 7: a class label at or above `model.num_classes` is skipped and counted as `bad_label`, never reaches the loss;
- 10: the shard writer refuses an `--out` that holds shards (unless `--overwrite`), treats a null or missing
  caption as a bad row, and refuses `--samples-per-shard 0` as a usage error;
- 14: a `pipe:` shard hidden inside braces in a shard list file is refused, like one on a line of its own;
- 16: a tar member over `data.max_member_bytes` is skipped and counted as `member_too_large` without being read
  into memory, from a local file and over http.
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import tarfile
import threading
import tracemalloc
from pathlib import Path

import pytest
import torch
from PIL import Image

import mmscale.data.write_shards as write_shards_cli
from mmscale.config import ConfigError, DataConfig
from mmscale.job.preflight import config_from_dict
from mmscale.data import TrainLoader, check_shard_spec, resolve_shards, write_tar_shards
from mmscale.data.decode import decode_for_training, decode_sample
from mmscale.data.reading import (
    BAD_KINDS, BAD_LABEL, BadDataError, BadInputMonitor, SampleError, SkipCounter, tar_samples,
)
from mmscale.data.shards import ShardSpecError

MEAN, STD = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
MEMBER_TOO_LARGE = "member_too_large"


def jpeg(colour: tuple[int, int, int], size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def config_problems(raw: dict) -> list[str]:
    try:
        config_from_dict(raw)
    except ConfigError as e:
        return e.problems
    return []


# ----------------------------------------------------------------------------------------------- 7: labels


def test_label_at_or_above_num_classes_is_a_bad_label(tmp_path, sp_tokenizer):
    """Finding 7: `.cls = 99` with model.num_classes 10 reached the loss (IndexError on CPU); it is skipped and
    counted as bad_label by the decoder, and the training loader never yields such a label."""
    image = jpeg((200, 30, 30))
    for label in ("10", "99"):
        with pytest.raises(SampleError, match=rf"class label \(.cls member\) {label} .*model.num_classes \(10\)") as e:
            decode_sample({"__key__": "k", "jpg": image, "cls": label}, 16, MEAN, STD, num_classes=10)
        assert e.value.kind == BAD_LABEL
    assert decode_sample({"__key__": "k", "jpg": image, "cls": "9"}, 16, MEAN, STD, num_classes=10)["class_label"] == 9
    # no head (num_classes 0): labels are not checked against a bound
    assert decode_sample({"__key__": "k", "jpg": image, "cls": "99"}, 16, MEAN, STD)["class_label"] == 99
    cfg = DataConfig(image_size=16, max_text_len=8)
    raw = {"__key__": "k", "jpg": image, "cls": "99", "txt": "a red circle"}
    with pytest.raises(SampleError) as e:
        decode_for_training(raw, cfg, sp_tokenizer, num_classes=10)
    assert e.value.kind == BAD_LABEL

    labels = [3, 99, 7, 10, 0, 1, 9, 2]  # two out of range
    write_tar_shards([{"__key__": f"s{i}", "jpg": image, "cls": str(c), "txt": "a red circle"}
                      for i, c in enumerate(labels)], tmp_path, 100)
    cfg = DataConfig(image_size=16, max_text_len=8, num_samples=6, shuffle_buffer=0, num_workers=0)
    loader = TrainLoader(cfg, sp_tokenizer, 6, 0, 1, seed=0, shards=str(tmp_path), num_classes=10)
    batch = next(iter(loader))
    loader.close()
    assert sorted(batch["class_labels"].tolist()) == [0, 1, 2, 3, 7, 9]
    assert batch["skipped_by_kind"] == {BAD_LABEL: 2}
    head = torch.nn.functional.cross_entropy(torch.zeros(6, 10), batch["class_labels"])  # what the loss does
    assert torch.isfinite(head)


# ----------------------------------------------------------------------------------------------- 10: shard writer


@pytest.fixture
def pictures(tmp_path) -> Path:
    folder = tmp_path / "img"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (16, 16), (40 * i, 100, 30)).save(folder / f"p{i}.png")
    return folder


def _pairs(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_shard_writer_refuses_an_out_folder_holding_shards(tmp_path, pictures, capsys):
    """Finding 10: a second run into the same --out kept the first run's higher-numbered shards in the folder and in
    sizes.json (6 samples stayed while it reported 2); it is refused unless --overwrite, which replaces them."""
    rows = [{"image": f"p{i}.png", "caption": f"picture {i}"} for i in range(6)]
    out = tmp_path / "out"
    first = _pairs(tmp_path / "six.jsonl", rows)
    second = _pairs(tmp_path / "two.jsonl", rows[:2])
    base = ["--images", str(pictures), "--out", str(out), "--samples-per-shard", "1"]
    assert write_shards_cli.main(["--input", str(first), *base]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(before) == 7  # 6 shards and sizes.json
    capsys.readouterr()

    assert write_shards_cli.main(["--input", str(second), *base]) == 1
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err and "6 shard" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched

    assert write_shards_cli.main(["--input", str(second), *base, "--overwrite"]) == 0
    assert "wrote 2 samples" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["sizes.json", "train-000000.tar", "train-000001.tar"]
    assert json.loads((out / "sizes.json").read_text()) == {"train-000000.tar": 1, "train-000001.tar": 1}
    assert len(resolve_shards(str(out))) == 2

    # another split (prefix) beside the shards is the documented way to share a folder: not refused, kept
    assert write_shards_cli.main(["--input", str(second), *base, "--prefix", "val"]) == 0
    assert json.loads((out / "sizes.json").read_text()) == {
        "train-000000.tar": 1, "train-000001.tar": 1, "val-000000.tar": 1, "val-000001.tar": 1}
    assert write_shards_cli.main(["--input", str(first), *base, "--overwrite"]) == 0
    assert json.loads((out / "sizes.json").read_text()) == {  # --overwrite replaces this prefix's shards only
        **{f"train-{i:06d}.tar": 1 for i in range(6)}, "val-000000.tar": 1, "val-000001.tar": 1}

    empty = tmp_path / "empty"  # an existing folder without shards is fine
    empty.mkdir()
    (empty / "README").write_text("notes\n")
    assert write_shards_cli.main(["--input", str(second), "--images", str(pictures), "--out", str(empty)]) == 0


def test_shard_writer_null_or_missing_caption_is_a_bad_row(tmp_path, pictures, capsys):
    """Finding 10: `"caption": null` was stored as the text "None"; a null or missing caption is a bad row."""
    rows = [{"image": "p0.png", "caption": "a picture"}, {"image": "p1.png", "caption": None},
            {"image": "p2.png"}, {"image": "p3.png", "caption": "another"}]
    pairs = _pairs(tmp_path / "pairs.jsonl", rows)
    args = ["--input", str(pairs), "--images", str(pictures), "--out", str(tmp_path / "out")]
    assert write_shards_cli.main(args) == 1
    err = capsys.readouterr().err
    assert "pairs.jsonl:2: no caption" in err and "--skip-bad-rows" in err
    assert write_shards_cli.main([*args, "--skip-bad-rows", "--overwrite"]) == 0
    captured = capsys.readouterr()
    assert "skipped 2 rows" in captured.out
    assert "pairs.jsonl:2: no caption" in captured.err and "pairs.jsonl:3: no caption" in captured.err
    captions = []
    for shard in resolve_shards(str(tmp_path / "out")):
        with tarfile.open(shard) as tar:
            captions += [tar.extractfile(m).read().decode() for m in tar if m.name.endswith(".txt")]
    assert captions == ["a picture", "another"]


@pytest.mark.parametrize("value", ["0", "-3"])
def test_shard_writer_samples_per_shard_must_be_positive(tmp_path, pictures, capsys, value):
    """Finding 10: `--samples-per-shard 0` gave a ValueError traceback; it is a usage error (exit 2) naming the flag."""
    pairs = _pairs(tmp_path / "pairs.jsonl", [{"image": "p0.png", "caption": "a picture"}])
    with pytest.raises(SystemExit) as e:
        write_shards_cli.main(["--input", str(pairs), "--images", str(pictures), "--out", str(tmp_path / "out"),
                               "--samples-per-shard", value])
    assert e.value.code == 2
    assert "--samples-per-shard" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- 14: pipe in braces


def test_pipe_hidden_in_braces_in_a_list_file_is_refused(tmp_path, shapes_shards):
    """Finding 14: a list file line `{pipe:CMD,x.tar}` passed validation (lines were checked before brace
    expansion) and a data worker crashed mid-run; it is refused after expansion, in the config report too."""
    shard = Path(shapes_shards) / "train-000000.tar"
    listing = tmp_path / "shards.txt"
    listing.write_text(f"{shard}\n{{pipe:touch {tmp_path}/ran,{shard}}}\n")
    with pytest.raises(ShardSpecError, match=r"list file .*shards.txt' line 2 names 'pipe:touch .*data.allow_pipe"):
        resolve_shards(str(listing))
    (problem,) = check_shard_spec(str(listing), "data.train_shards")
    assert problem.startswith("data.train_shards: list file") and "pipe:touch" in problem and "allow_pipe" in problem
    problems = config_problems({"data": {"train_shards": str(listing), "num_samples": 8}})
    assert any(p.startswith("data.train_shards: list file") and "pipe:" in p for p in problems), problems
    problems = config_problems({"data": {"sources": [{"name": "a", "shards": str(listing), "weight": 1.0}],
                                         "num_samples": 8}})
    assert any(p.startswith("data.sources[0].shards: list file") and "pipe:" in p for p in problems), problems
    # allowed: passed through, in order
    assert resolve_shards(str(listing), allow_pipe=True) == [str(shard), f"pipe:touch {tmp_path}/ran", str(shard)]
    assert check_shard_spec(str(listing), "data.train_shards", allow_pipe=True) == []
    assert not (tmp_path / "ran").exists()  # nothing ran


# ----------------------------------------------------------------------------------------------- 16: member size cap


def _tar_with_big_member(path: Path, big: int) -> list[str]:
    """A tar: good0, `huge` (a .jpg member of `big` zero bytes, copied from /dev/zero), good1; the good keys."""
    with tarfile.open(path, "w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("good0.jpg", jpeg((10, 200, 30)))
        add("good0.txt", b"a red circle")
        info = tarfile.TarInfo("huge.jpg")
        info.size = big
        with open("/dev/zero", "rb") as zeros:
            tar.addfile(info, zeros)
        add("huge.txt", b"a red circle")
        add("good1.jpg", jpeg((200, 10, 30)))
        add("good1.txt", b"a red circle")
    return ["good0", "good1"]


def _read_and_decode(urls: list[str], cfg: DataConfig, tokenizer) -> tuple[list[str], dict[str, int], int]:
    """(kept keys, skips by kind, peak bytes Python allocated while reading and decoding)."""
    counter, kept = SkipCounter(), []
    tracemalloc.start()
    try:
        for raw in tar_samples(urls, counter, max_member_bytes=cfg.max_member_bytes):
            try:
                kept.append(decode_for_training(raw, cfg, tokenizer)["__key__"])
            except SampleError as e:
                counter.skip(e)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return kept, counter.take_kinds(), peak


BIG = 48 << 20


def test_member_over_max_member_bytes_is_skipped_unread(tmp_path, sp_tokenizer):
    """Finding 16: each tar member was read whole, so one multi-GB member made a worker run out of memory; a member
    over data.max_member_bytes is skipped (its sample counted as member_too_large) from the tar header's size,
    its bytes passed over, never held."""
    assert MEMBER_TOO_LARGE in BAD_KINDS
    good = _tar_with_big_member(tmp_path / "big.tar", BIG)
    cfg = DataConfig(image_size=16, max_text_len=8, max_member_bytes=1 << 20)
    kept, kinds, peak = _read_and_decode([str(tmp_path / "big.tar")], cfg, sp_tokenizer)
    assert kept == good
    assert kinds == {MEMBER_TOO_LARGE: 1}
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB: the {BIG >> 20} MiB member was read into memory"
    # the message names the sample, the member, its size and the field
    raw = next(r for r in tar_samples([str(tmp_path / "big.tar")], SkipCounter(), max_member_bytes=1 << 20)
               if r["__key__"] == "huge")
    with pytest.raises(SampleError, match=rf"huge in .*big.tar: member huge.jpg .*{BIG}.*data.max_member_bytes"):
        decode_for_training(raw, cfg, sp_tokenizer)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_member_over_max_member_bytes_over_http_is_skipped_unread(tmp_path, sp_tokenizer):
    """Finding 16: the same over http: the streamed member's bytes are passed over, not held."""
    good = _tar_with_big_member(tmp_path / "big.tar", BIG)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(tmp_path)))
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/big.tar"
        cfg = DataConfig(image_size=16, max_text_len=8, max_member_bytes=1 << 20)
        kept, kinds, peak = _read_and_decode([url], cfg, sp_tokenizer)
    finally:
        srv.shutdown()
        srv.server_close()
    assert kept == good
    assert kinds == {MEMBER_TOO_LARGE: 1}
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB: the {BIG >> 20} MiB member was read into memory"


def test_max_member_bytes_in_the_loader_the_threshold_and_the_config(tmp_path, sp_tokenizer):
    """Finding 16: the training loader applies data.max_member_bytes and counts member_too_large per batch; the
    bad-input threshold counts it like any other kind; the config field is validated (> 0)."""
    assert DataConfig().max_member_bytes == 256 << 20
    samples = [{"__key__": f"s{i}", "jpg": jpeg((20 * i, 90, 30)), "txt": "a red circle"} for i in range(8)]
    samples[3]["txt"] = "a red circle " + "x" * 5000  # one over-large member (a 5 kB caption)
    write_tar_shards(samples, tmp_path, 100)
    cfg = DataConfig(image_size=16, max_text_len=8, num_samples=6, shuffle_buffer=0, num_workers=0,
                     max_member_bytes=4096)
    loader = TrainLoader(cfg, sp_tokenizer, 6, 0, 1, seed=0, shards=str(tmp_path))
    batch = next(iter(loader))
    loader.close()
    assert "s3" not in batch["__key__"]
    assert batch["skipped_by_kind"] == {MEMBER_TOO_LARGE: 1}
    monitor = BadInputMonitor(max_fraction=0.1, window=10)
    monitor.update(6, batch["skipped_by_kind"])  # 1 of 7: under the fraction of the window
    with pytest.raises(BadDataError, match=f"{MEMBER_TOO_LARGE}=2"):
        monitor.update(1, {MEMBER_TOO_LARGE: 1})

    for value in (0, -1):
        problems = config_problems({"data": {"max_member_bytes": value}})
        assert any(p.startswith(f"data.max_member_bytes: {value}") for p in problems), problems
    assert not [p for p in config_problems({"data": {"max_member_bytes": 1 << 30}}) if "max_member_bytes" in p]
