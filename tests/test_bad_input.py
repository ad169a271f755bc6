"""Bad input: every kind is skipped and counted by its kind while the good samples around it survive; the bad-input
threshold; every image mode PIL opens decodes to the RGB a user expects; the pixel limit; the shard writer's formats.

Real tar shards, real image bytes made with PIL, the real sentencepiece tokenizer (conftest's `sp_tokenizer`).
"""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mmscale.data.write_shards as write_shards_cli
from mmscale.config import ConfigError, DataConfig
from mmscale.job.preflight import config_from_dict
from mmscale.data import TrainLoader, write_tar_shards
from mmscale.data.decode import decode_for_training, decode_sample, image_to_tensor, load_image
from mmscale.data.reading import (
    BAD_ENCODING, BAD_LABEL, BROKEN_TAR, EMPTY_CAPTION, IMAGE_TOO_LARGE, MISSING_CAPTION, MISSING_IMAGE,
    NETWORK_RETRY, UNDECODABLE_IMAGE, UNREADABLE_SHARD, BadDataError, BadInputMonitor, SampleError, SkipCounter,
    tar_samples,
)

MEAN, STD = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]  # image_to_tensor then gives x / 255


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def solid_jpeg(colour: tuple[int, int, int], size: int = 16) -> bytes:
    return encode(Image.new("RGB", (size, size), colour), "JPEG", quality=95)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB pixels, with (almost) no pixel data: a decompression bomb's
    header. Decoding it would need width * height * 3 bytes, and fail on the missing data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def rgb(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


# ----------------------------------------------------------------------------------------------- each kind, counted


def _bad_input_shards(root: Path) -> tuple[list[str], list[str]]:
    """Shards mixing good samples with one of each kind of bad input, plus a deleted shard and a directory in the
    list. Returns (the shard list, the good keys in reading order)."""
    good = {f"good{i}": {"jpg": solid_jpeg((40 * i, 200, 30)), "txt": "a red circle"} for i in range(6)}
    samples = [
        {"__key__": "good0", **good["good0"]},
        {"__key__": "garbage_image", "jpg": b"\xff\xd8\xff\xe0 not a jpeg at all", "txt": "a red circle"},
        {"__key__": "good1", **good["good1"]},
        {"__key__": "bomb", "png": png_claiming(100_000, 100_000), "txt": "a red circle"},
        {"__key__": "no_image", "txt": "a red circle"},
        {"__key__": "good2", **good["good2"]},
        {"__key__": "no_caption", "jpg": good["good0"]["jpg"]},
        {"__key__": "blank_caption", "jpg": good["good0"]["jpg"], "txt": " \n "},
        {"__key__": "latin1_caption", "jpg": good["good0"]["jpg"], "txt": "a red caf\xe9".encode("latin-1")},
        {"__key__": "word_label", "jpg": good["good0"]["jpg"], "cls": "seven"},
        {"__key__": "negative_label", "jpg": good["good0"]["jpg"], "cls": "-3"},
        {"__key__": "good3", **good["good3"]},
    ]
    write_tar_shards(samples, root, 100, prefix="mixed")
    write_tar_shards([{"__key__": f"good{i}", **good[f"good{i}"]} for i in (4, 5)] +
                     [{"__key__": "cut", **good["good0"]}], root, 100, prefix="cut")
    cut = root / "cut-000000.tar"
    data = cut.read_bytes()
    with tarfile.open(cut) as tar:
        offsets = [m.offset_data for m in tar]
    cut.write_bytes(data[: offsets[4] + 100])  # members: good4.jpg good4.txt good5.jpg good5.txt cut.jpg <- cut inside
    write_tar_shards([{"__key__": "gone", **good["good0"]}], root, 100, prefix="gone")
    (root / "a_directory.tar").mkdir()
    shards = [str(root / n) for n in ("mixed-000000.tar", "gone-000000.tar", "cut-000000.tar", "a_directory.tar")]
    return shards, ["good0", "good1", "good2", "good3", "good4", "good5"]


def test_each_kind_of_bad_input_is_skipped_and_counted_by_its_kind(tmp_path, sp_tokenizer):
    shards, good_keys = _bad_input_shards(tmp_path)
    os.remove(shards[1])  # listed, then deleted: as if removed after the run started
    cfg = DataConfig(image_size=16, max_text_len=8)
    counter, kept = SkipCounter(), []
    for raw in tar_samples(shards, counter):  # what the training stream does with them
        try:
            kept.append(decode_for_training(raw, cfg, sp_tokenizer)["__key__"])
        except SampleError as e:
            counter.skip(str(e), e.kind)
    assert kept == good_keys
    assert counter.take_kinds() == {
        UNDECODABLE_IMAGE: 1, IMAGE_TOO_LARGE: 1, MISSING_IMAGE: 1, MISSING_CAPTION: 1, EMPTY_CAPTION: 1,
        BAD_ENCODING: 1, BAD_LABEL: 2, BROKEN_TAR: 1, UNREADABLE_SHARD: 2,
    }
    assert counter.take_kinds() == {}  # since the last call
    count, reasons = counter.take()
    assert count == 11 and len(reasons) == SkipCounter.MAX_REASONS
    assert "garbage_image in" in reasons[0] and "undecodable image" in reasons[0]
    assert "bomb in" in reasons[1] and "too large" in reasons[1]

    # The non-UTF-8 caption names the byte (it used to be replaced silently and trained on).
    with pytest.raises(SampleError, match=r"latin1_caption.*not UTF-8.*byte 9") as e:
        latin1 = "a red caf\xe9".encode("latin-1")
        decode_sample({"__key__": "latin1_caption", "jpg": solid_jpeg((0, 0, 0)), "txt": latin1}, 16, MEAN, STD)
    assert e.value.kind == BAD_ENCODING


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_shard_without_read_permission_is_skipped_and_counted(tmp_path, sp_tokenizer):
    write_tar_shards([{"__key__": "k", "jpg": solid_jpeg((1, 2, 3)), "txt": "a red circle"}], tmp_path, 10)
    shard = tmp_path / "train-000000.tar"
    shard.chmod(0)
    counter = SkipCounter()
    assert list(tar_samples([str(shard)], counter)) == []
    assert counter.take_kinds() == {UNREADABLE_SHARD: 1}
    assert "Permission" in counter.take()[1][0]


def test_the_run_goes_on_past_a_shard_deleted_after_it_started(tmp_path, sp_tokenizer):
    shards, good_keys = _bad_input_shards(tmp_path)
    cfg = DataConfig(image_size=16, max_text_len=8, num_samples=6, shuffle_buffer=0, num_workers=0)
    loader = TrainLoader(cfg, sp_tokenizer, 2, 0, 1, seed=0, shards=str(tmp_path))  # every .tar of the folder
    os.remove(shards[1])
    it = iter(loader)
    batches = [next(it) for _ in range(6)]  # two epochs
    it.close()
    keys = [k for b in batches for k in b["__key__"]]
    assert sorted(keys[:6]) == sorted(keys[6:]) == good_keys
    assert loader.num_skipped >= 11


# ----------------------------------------------------------------------------------------------- the threshold


def test_bad_input_monitor_fires_above_the_fraction_with_its_message():
    monitor = BadInputMonitor(max_fraction=0.1, window=100)
    for _ in range(10):  # 4 bad of 100: below
        monitor.update(9, {UNDECODABLE_IMAGE: 1} if _ % 3 == 0 else {})
    assert monitor.seen == 100 - 10 + 4 and monitor.bad == 4
    for _ in range(20):  # network retries are no bad input, however many
        monitor.update(10, {NETWORK_RETRY: 5})
    assert monitor.bad == 0 and monitor.fraction == 0  # the old batches left the window
    monitor.update(80, {MISSING_CAPTION: 6, UNDECODABLE_IMAGE: 4})  # 10 of the last 100: not more than 10%
    with pytest.raises(BadDataError) as e:
        monitor.update(9, {UNDECODABLE_IMAGE: 1})  # 11 bad in the last 100 batches' samples
    msg = str(e.value)
    for part in ("11 of the last", "data.max_bad_fraction=0.1", "data.bad_window=100", "missing_caption=6",
                 "undecodable_image=5", "clean the data", "raise data.max_bad_fraction"):
        assert part in msg, (part, msg)


def test_bad_input_monitor_fires_early_on_all_bad_data_and_never_at_fraction_one():
    monitor = BadInputMonitor(max_fraction=0.05, window=1000)
    monitor.update(8, {BROKEN_TAR: 1, UNREADABLE_SHARD: 40})  # 41 bad: 4.1% of a window not yet full
    with pytest.raises(BadDataError, match=r"51 of the last 59 samples.*unreadable_shard=50, broken_tar=1"):
        monitor.update(0, {UNREADABLE_SHARD: 10})  # 51 > 5% of 1000: no need to wait for 1000 samples
    never = BadInputMonitor(max_fraction=1.0, window=10)
    for _ in range(5):
        never.update(0, {UNDECODABLE_IMAGE: 8})
    assert never.fraction == 1.0
    with pytest.raises(ValueError, match="max_bad_fraction"):
        BadInputMonitor(max_fraction=1.5, window=10)


def test_new_data_fields_are_checked():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"data": {"synthetic_train_samples": 8, "max_image_pixels": 0, "max_bad_fraction": 1.5,
                                   "bad_window": 0, "http_retries": -1, "http_backoff_s": -0.5}})
    problems = "\n".join(e.value.problems)
    for field in ("data.max_image_pixels: 0", "data.max_bad_fraction: 1.5", "data.bad_window: 0",
                  "data.http_retries: -1", "data.http_backoff_s: -0.5"):
        assert field in problems, (field, problems)
    with pytest.raises(ConfigError, match=r"data.max_image_pixels: 10000000000 is above what PIL opens"):
        config_from_dict({"data": {"synthetic_train_samples": 8, "max_image_pixels": 10**10}})
    cfg = config_from_dict({"data": {"synthetic_train_samples": 8, "max_bad_fraction": 0.2, "allow_pipe": True}})
    assert cfg.data.max_bad_fraction == 0.2 and cfg.data.allow_pipe


# ----------------------------------------------------------------------------------------------- image modes


def test_16bit_grey_keeps_its_ramp():
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)
    data = encode(Image.fromarray(np.tile(ramp, (4, 1))), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = rgb(load_image(data))
    expected = np.round(ramp / 257).astype(int)  # 65535 -> 255
    np.testing.assert_array_equal(out[0, :, 0], expected)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert len(np.unique(out[0, :, 0])) == 256  # PIL's convert("L") clips: all but the first value would be 255
    # image_to_tensor's other callers (inference, documents) pass opened images: they get the same
    x = image_to_tensor(Image.open(io.BytesIO(data)), 4, MEAN, STD)  # the centre 4 x 4 of the ramp: mid grey
    assert x.equal(image_to_tensor(load_image(data), 4, MEAN, STD))
    assert 0.49 < float(x.min()) and float(x.max()) < 0.51  # clipped, it would be 1.0 (white)


def test_transparency_becomes_white():
    rgba = np.zeros((4, 8, 4), dtype=np.uint8)
    rgba[:, :4] = (200, 0, 0, 0)  # fully transparent: its colour must not show (nor black)
    rgba[:, 4:6] = (0, 0, 255, 255)
    rgba[:, 6:] = (0, 0, 0, 128)  # half-transparent black on white: mid grey
    out = rgb(load_image(encode(Image.fromarray(rgba, mode="RGBA"), "PNG")))
    assert (out[:, :4] == 255).all()
    assert (out[:, 4:6] == (0, 0, 255)).all()
    assert (np.abs(out[:, 6:] - 127) <= 1).all()

    alpha = np.tile([0, 255], (4, 2)).astype(np.uint8)  # odd columns transparent
    la = Image.fromarray(np.stack([np.full((4, 4), 30, np.uint8), alpha], -1), "LA")
    out = rgb(load_image(encode(la, "PNG")))
    assert (out[:, 0::2] == 255).all() and (out[:, 1::2] == 30).all()

    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 0, 200, 0])  # index 0 black (transparent), index 1 green
    pal.paste(1, (2, 0, 4, 4))
    for fmt in ("PNG", "GIF"):
        out = rgb(load_image(encode(pal, fmt, transparency=0)))
        assert (out[:, :2] == 255).all(), fmt
        assert (out[:, 2:] == (0, 200, 0)).all(), fmt

    grey_key = encode(Image.new("L", (2, 2), 7), "PNG", transparency=7)  # a transparent grey value (tRNS)
    assert (rgb(load_image(grey_key)) == 255).all()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied(fmt):
    stored = np.zeros((8, 16, 3), dtype=np.uint8)  # as stored: 16 wide, left half red, right half blue
    stored[:, :8] = (255, 0, 0)
    stored[:, 8:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": a phone held upright
    data = encode(Image.fromarray(stored), fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    out = rgb(load_image(data))
    assert out.shape == (16, 8, 3)  # upright: 8 wide, 16 high
    top, bottom = out[2:6].reshape(-1, 3).mean(0), out[10:14].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 50, top  # the left (red) half comes out on top
    assert bottom[2] > 200 and bottom[0] < 50, bottom


def test_cmyk_grey_and_other_modes():
    cyan = rgb(load_image(encode(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), "JPEG", quality=95)))
    assert (np.abs(cyan - (0, 255, 255)) <= 8).all(), cyan[0, 0]
    black = rgb(load_image(encode(Image.new("CMYK", (8, 8), (0, 0, 0, 255)), "TIFF")))
    assert (black == 0).all()
    assert (rgb(load_image(encode(Image.new("L", (4, 4), 100), "PNG"))) == 100).all()
    assert (rgb(load_image(encode(Image.new("1", (4, 4), 1), "BMP"))) == 255).all()
    f = Image.fromarray(np.full((4, 4), 0.5, np.float32), mode="F")  # a float TIFF in 0..1
    assert (np.abs(rgb(load_image(encode(f, "TIFF"))) - 128) <= 1).all()
    ycc = Image.new("RGB", (4, 4), (10, 120, 240)).convert("YCbCr")
    assert (np.abs(rgb(load_image(encode(ycc, "JPEG", quality=100))) - (10, 120, 240)) <= 6).all()


def test_pixel_limit_refuses_a_bomb_before_decoding_it(monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor does PIL's own DecompressionBombWarning leak out
        with pytest.raises(SampleError, match="too large") as e:
            load_image(png_claiming(100_000, 100_000))
        assert e.value.kind == IMAGE_TOO_LARGE
        # Under PIL's own warning threshold: only our limit stands between the header and 243 MB of pixels.
        # Decoding would fail on the missing pixel data (UNDECODABLE_IMAGE); refused first, it is IMAGE_TOO_LARGE.
        with pytest.raises(SampleError, match=r"9000x9000 = 81000000 pixels > data.max_image_pixels \(50000000\)") as e:
            load_image(png_claiming(9000, 9000), max_pixels=50_000_000)
        assert e.value.kind == IMAGE_TOO_LARGE
        with pytest.raises(SampleError) as e:  # (a small one under the limit is decoded: and fails)
            load_image(png_claiming(300, 300), max_pixels=50_000_000)
        assert e.value.kind == UNDECODABLE_IMAGE
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # PIL's global guard off: ours still holds
    t0 = time.perf_counter()
    with pytest.raises(SampleError, match=r"100000x100000 = 10000000000 pixels") as e:
        load_image(png_claiming(100_000, 100_000), max_pixels=50_000_000)
    assert e.value.kind == IMAGE_TOO_LARGE and time.perf_counter() - t0 < 1
    photo = solid_jpeg((10, 20, 30), size=64)
    assert load_image(photo, max_pixels=64 * 64).size == (64, 64)
    with pytest.raises(SampleError, match="4096 pixels > data.max_image_pixels \\(4095\\)"):
        load_image(photo, max_pixels=64 * 64 - 1)
    with pytest.raises(SampleError, match=r"bomb in shard.tar: image too large") as e:
        decode_sample({"__key__": "bomb", "__url__": "shard.tar", "png": png_claiming(9000, 9000), "txt": "x"},
                      16, MEAN, STD, max_pixels=1_000_000)
    assert e.value.kind == IMAGE_TOO_LARGE


def test_a_long_thin_image_is_resized_at_the_cost_of_its_output():
    # 1 x 400000: resizing the whole image first would make a 32 x 12.8 M intermediate (1.2 GB)
    strip = np.zeros((400_000, 1, 3), dtype=np.uint8)
    strip[:] = (0, 255, 0)
    t0 = time.perf_counter()
    x = image_to_tensor(Image.fromarray(strip), 32, MEAN, STD)
    assert x.shape == (3, 32, 32) and time.perf_counter() - t0 < 2
    assert np.allclose(x[:, 16, 16].numpy(), (0, 1, 0))


# ----------------------------------------------------------------------------------------------- the shard writer


def _read_members(out: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def test_writer_copies_browser_formats_and_reencodes_the_rest(tmp_path, capsys):
    images = tmp_path / "img"
    images.mkdir()
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (24, 32, 4), dtype=np.uint8), mode="RGBA")
    ramp16 = Image.fromarray(np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (24, 1)))
    files = {  # name: (bytes, expected member extension, copied unchanged?)
        "photo.jpg": (encode(photo, "JPEG", quality=90), "jpg", True),
        "alpha.png": (encode(rgba, "PNG"), "png", True),
        "anim.gif": (encode(photo.convert("P"), "GIF"), "gif", True),
        "pic.webp": (encode(photo, "WEBP"), "webp", True),
        "misnamed.png": (encode(photo, "JPEG", quality=90), "jpg", True),  # JPEG bytes behind a .png name
        "scan.tif": (encode(photo, "TIFF"), "png", False),
        "old.bmp": (encode(photo, "BMP"), "png", False),
        "deep.png": (encode(ramp16, "PNG"), "png", False),
        "print.jpg": (encode(Image.new("CMYK", (32, 24), (255, 0, 0, 0)), "JPEG", quality=95), "jpg", False),
    }
    rows = []
    for name, (data, _, _) in files.items():
        (images / name).write_bytes(data)
        rows.append({"image": name, "caption": f"a picture {name}"})
    (images / "garbage.jpg").write_bytes(b"this is text, not an image")
    (images / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    bad = [{"image": "garbage.jpg", "caption": "x"}, {"image": "bomb.png", "caption": "y"}]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows + bad))
    args = ["--input", str(pairs), "--images", str(images), "--out", str(tmp_path / "out")]

    assert write_shards_cli.main(args) == 1
    err = capsys.readouterr().err
    assert "pairs.jsonl:10: image 'garbage.jpg': undecodable image" in err and "--skip-bad-rows" in err

    assert write_shards_cli.main(args + ["--skip-bad-rows"]) == 0
    captured = capsys.readouterr()
    assert "skipped 2 rows" in captured.out and "re-encoded 4 image(s)" in captured.err
    assert "pairs.jsonl:11: image 'bomb.png': image too large" in captured.err
    samples = _read_members(tmp_path / "out")
    assert len(samples) == len(files)
    for i, (name, (data, ext, copied)) in enumerate(files.items()):
        sample = samples[f"{i:09d}"]
        assert set(sample) == {ext, "txt"}, name
        assert (sample[ext] == data) == copied, name
        stored = Image.open(io.BytesIO(sample[ext]))
        if not copied:
            assert stored.mode == "RGB", name  # what any reader shows, not only mmscale's decoder
        expected, got = rgb(load_image(data)), rgb(load_image(sample[ext]))
        tolerance = 0 if copied or ext == "png" else 8  # PNG re-encodes are lossless; JPEG ones nearly so
        assert np.abs(expected - got).max() <= tolerance, name
    # the 16-bit ramp survived as a ramp, and the CMYK print as cyan
    deep = rgb(Image.open(io.BytesIO(samples["000000007"]["png"])))
    assert len(np.unique(deep[0, :, 0])) == 32 and deep[0, -1, 0] == 255
    assert (np.abs(rgb(Image.open(io.BytesIO(samples["000000008"]["jpg"]))) - (0, 255, 255)) <= 8).all()


def _shards_with_bad_images(root: Path, every: int) -> Path:
    """The tiny shapes data (4 shards x 64, 32 px) with every `every`-th sample's image replaced by garbage."""
    from mmscale.data.reading import SkipCounter, tar_samples
    from mmscale.data.shards import resolve_shards
    from mmscale.data.synthetic import make_shapes_dataset

    clean = make_shapes_dataset(root / "clean", 256, samples_per_shard=64, image_size=32, seed=7, prefix="train")
    samples = []
    for i, raw in enumerate(tar_samples(resolve_shards(str(clean)), SkipCounter())):
        sample = {k: v for k, v in raw.items() if k != "__url__"}
        if i % every == 0:
            sample["jpg"] = b"this is not a jpeg"
        samples.append(sample)
    write_tar_shards(samples, root / "bad", samples_per_shard=64)
    return root / "bad"


@pytest.mark.slow
def test_too_much_bad_input_stops_every_rank_with_the_kinds_and_less_is_counted_in_the_metrics(tmp_path):
    """2 ranks (ZeRO-3) on shards where every 4th image is garbage: with data.max_bad_fraction=0.1 both ranks stop
    together (exit 2, no hang) naming the kind; with 0.5 the run completes and metrics.jsonl counts the skips by
    kind."""
    from test_training import ROOT, launch

    from mmscale.data.tokenizer import captions_from_shards, train_sentencepiece

    bad = _shards_with_bad_images(tmp_path, every=4)
    tok = train_sentencepiece(captions_from_shards(str(bad)), tmp_path / "tok", vocab_size=64)
    common = ["--config", "configs/tiny.yaml", f"data.train_shards={bad}", f"data.tokenizer={tok}",
              "train.max_steps=6", "data.bad_window=32", "deepspeed.collective_timeout_s=60"]
    r = launch(ROOT / "launchers/train.py", [*common, f"output_dir={tmp_path / 'strict'}",
                                             "data.max_bad_fraction=0.1"], nprocs=2, check=False, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-6000:]
    assert "bad input:" in out and "undecodable_image=" in out and "data.max_bad_fraction" in out, out[-6000:]
    launch(ROOT / "launchers/train.py", [*common, f"output_dir={tmp_path / 'lenient'}", "data.max_bad_fraction=0.5"],
           nprocs=2, timeout=300)
    records = [json.loads(x) for x in (tmp_path / "lenient/metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "loss" in r][-1]
    # 48 samples used in 6 steps; a quarter of what is read is garbage: ~16 met on the way (the shuffle decides)
    assert 6 <= last["data_skipped_undecodable_image"] == last["data_skipped"] <= 30, last
