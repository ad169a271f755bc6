"""Data side: shard writing, shard specs, the streaming loaders, collate and tokenizers, on real tar shards."""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmscale.config import ConfigError, DataConfig
from mmscale.job.preflight import load_config
from mmscale.data import (
    COLOURS,
    COUNTS,
    IGNORE_INDEX,
    SHAPE_PLURALS,
    SHAPES,
    SYNTHETIC_TASKS,
    EvalLoader,
    ShardSpecError,
    Tokenizer,
    TrainLoader,
    check_shard_spec,
    check_tokenizer_path,
    collate_samples,
    ensure_shapes_dataset,
    ensure_synthetic_dataset,
    image_to_tensor,
    load_tokenizer,
    make_counts_sample,
    make_shapes_dataset,
    make_synthetic_dataset,
    resolve_shards,
    synthetic_words,
    train_sentencepiece,
    write_tar_shards,
)
import mmscale.data.write_shards as write_shards_cli
from mmscale.data.tokenizer import IMAGE_TOKEN, captions_from_shards

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 32


def data_cfg(**kw) -> DataConfig:
    base = dict(image_size=IMAGE_SIZE, max_text_len=12, shuffle_buffer=16, num_workers=0, warn_every=100)
    base.update(kw)
    return DataConfig(**base)


def take(loader, n: int) -> list[dict]:
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    it.close()  # shuts the DataLoader workers down now
    return out


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- shard writer


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    """12 real images (sklearn's 8x8 handwritten digits, upscaled to 32x32): PNGs and JPEGs, with their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path_factory.mktemp("digits")
    (root / "img").mkdir()
    rows = []
    for i in range(12):
        pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
        img = Image.fromarray(pixels, mode="L").resize((32, 32), Image.Resampling.NEAREST).convert("RGB")
        name = f"img/digit_{i:02d}.{'png' if i % 2 == 0 else 'jpg'}"
        img.save(root / name, quality=95)
        rows.append({"image": name, "caption": f"a handwritten digit {digits.target[i]}"})
    return root, rows


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_write_shards_round_trip(digits_folder, tmp_path, fmt):
    root, rows = digits_folder
    pairs = tmp_path / f"pairs.{fmt}"
    if fmt == "jsonl":
        pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with pairs.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["image", "caption"])
            w.writeheader()
            w.writerows(rows)
    out = tmp_path / "shards"
    rc = write_shards_cli.main(
        ["--input", str(pairs), "--images", str(root), "--out", str(out), "--samples-per-shard", "5", "--prefix", "dig"]
    )
    assert rc == 0
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {"dig-000000.tar": 5, "dig-000001.tar": 5, "dig-000002.tar": 2}
    samples = {}
    for shard in resolve_shards(str(out)):
        samples.update(read_tar(Path(shard)))
    assert len(samples) == len(rows)
    for i, (key, sample) in enumerate(sorted(samples.items())):
        ext = "png" if i % 2 == 0 else "jpg"
        assert set(sample) == {ext, "txt"}
        assert sample["txt"].decode() == rows[i]["caption"]
        assert sample[ext] == (root / rows[i]["image"]).read_bytes()  # copied, not re-encoded
        decoded = np.asarray(Image.open(io.BytesIO(sample[ext])).convert("RGB"))
        expected = np.asarray(Image.open(root / rows[i]["image"]).convert("RGB"))
        np.testing.assert_array_equal(decoded, expected)


def test_write_shards_bad_rows(digits_folder, tmp_path, capsys):
    root, rows = digits_folder
    pairs = tmp_path / "pairs.jsonl"
    bad = rows[:3] + [{"image": "img/nope.jpg", "caption": "x"}, {"image": rows[0]["image"], "caption": "  "}]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in bad))
    args = ["--input", str(pairs), "--images", str(root), "--out", str(tmp_path / "s"), "--samples-per-shard", "2"]
    assert write_shards_cli.main(args) == 1
    err = capsys.readouterr().err
    assert "pairs.jsonl:4" in err and "nope.jpg" in err and "--skip-bad-rows" in err
    # the stopped run left its complete shard: a rerun into the same folder must say --overwrite (finding 10)
    assert write_shards_cli.main(args + ["--skip-bad-rows", "--overwrite"]) == 0
    captured = capsys.readouterr()
    assert "skipped 2 rows" in captured.out and "pairs.jsonl:5: empty caption" in captured.err
    assert sum(json.loads((tmp_path / "s" / "sizes.json").read_text()).values()) == 3


def test_write_shards_error_names_the_row(digits_folder, tmp_path):
    root, rows = digits_folder
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"image": "img/nope.jpg", "caption": "x"}) + "\n")
    samples = write_shards_cli.pairs_to_samples(pairs, root, skip_bad_rows=False, skipped=[])
    with pytest.raises(write_shards_cli.BadRowError, match=r"pairs.jsonl:2: image file .*nope.jpg.* does not exist"):
        list(samples)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_write_shards_failure_leaves_no_partial_shard_or_open_file(digits_folder, tmp_path):
    root, rows = digits_folder
    pairs = tmp_path / "pairs.jsonl"
    bad = rows[:7] + [{"image": "img/nope.jpg", "caption": "x"}] + rows[7:]  # line 8: inside the third shard of 3
    pairs.write_text("".join(json.dumps(r) + "\n" for r in bad))
    out = tmp_path / "shards"
    fds = open_fds()
    samples = write_shards_cli.pairs_to_samples(pairs, root, skip_bad_rows=False, skipped=[])
    with pytest.raises(write_shards_cli.BadRowError) as err:
        write_tar_shards(samples, out, 3)
    assert open_fds() == fds, "the shard being written is still open"  # `err` keeps the failed frames alive
    assert "pairs.jsonl:8" in str(err.value) and "nope.jpg" in str(err.value) and "--skip-bad-rows" in str(err.value)
    # The two complete shards stay, whole and recorded; nothing of the third, under any name.
    assert sorted(p.name for p in out.iterdir()) == ["sizes.json", "train-000000.tar", "train-000001.tar"]
    assert json.loads((out / "sizes.json").read_text()) == {"train-000000.tar": 3, "train-000001.tar": 3}
    assert len(read_tar(out / "train-000001.tar")) == 3

    args = ["--input", str(pairs), "--images", str(root), "--out", str(tmp_path / "cli"), "--samples-per-shard", "3"]
    assert write_shards_cli.main(args) == 1
    assert not list((tmp_path / "cli").glob("train-000002*"))

    # A sample the writer cannot encode: the error names it and the fix, and its shard is not left behind.
    samples = [{"__key__": f"k{i}", "txt": "a caption"} for i in range(5)]
    samples[4] = {"__key__": "k4", "jpg": None, "txt": "no image bytes"}
    with pytest.raises(ValueError, match=r"sample 4 \(key 'k4'\).*bytes or str") as err:
        write_tar_shards(samples, tmp_path / "enc", 3)
    assert open_fds() == fds
    assert sorted(p.name for p in (tmp_path / "enc").iterdir()) == ["sizes.json", "train-000000.tar"]


# ----------------------------------------------------------------------------------------------- shard specs


def test_resolve_shards_forms(shapes_shards, tmp_path):
    all_shards = sorted(str(p) for p in shapes_shards.glob("*.tar"))
    assert len(all_shards) == 8
    assert resolve_shards(str(shapes_shards)) == all_shards
    assert resolve_shards(f"{shapes_shards}/train-{{000000..000007}}.tar") == all_shards
    assert resolve_shards(f"{shapes_shards}/train-00000[0-2].tar") == all_shards[:3]
    listing = tmp_path / "shards.txt"
    listing.write_text(f"# two shards\n{all_shards[0]}\n\n{Path(all_shards[1]).name}  # relative to the list file\n")
    (tmp_path / Path(all_shards[1]).name).write_bytes(Path(all_shards[1]).read_bytes())
    assert resolve_shards(listing) == [all_shards[0], str(tmp_path / Path(all_shards[1]).name)]
    assert resolve_shards([all_shards[0], str(shapes_shards)]) == all_shards[:1] + all_shards

    with pytest.raises(ShardSpecError, match="no shard matches"):
        resolve_shards(f"{shapes_shards}/val-{{000000..000003}}.tar")
    with pytest.raises(ShardSpecError, match=r"3 of 11 shards do not exist"):
        resolve_shards(f"{shapes_shards}/train-{{000000..000010}}.tar")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ShardSpecError, match="no .tar files"):
        resolve_shards(tmp_path / "empty_dir")
    with pytest.raises(ShardSpecError, match="empty"):
        resolve_shards("")


def test_check_shard_spec(shapes_shards, tmp_path):
    assert check_shard_spec(str(shapes_shards), "data.train_shards", need_sizes=True) == []
    assert check_shard_spec(f"{shapes_shards}/train-{{000000..000007}}.tar", "data.train_shards") == []
    (none,) = check_shard_spec("x/{000..009}.tar", "data.train_shards")
    assert none.startswith("data.train_shards: ") and "'x/{000..009}.tar'" in none and "no shard matches" in none
    assert "expected a brace pattern like" in none  # the fix
    (some,) = check_shard_spec(f"{shapes_shards}/train-{{000000..000009}}.tar", "data.val_shards")
    assert some.startswith("data.val_shards: ") and "2 of 10 shards do not exist" in some and "fix the pattern" in some
    (tmp_path / "empty").mkdir()
    (empty,) = check_shard_spec(str(tmp_path / "empty"), "data.train_shards")
    assert "no .tar files" in empty and "write_shards" in empty
    unsized = tmp_path / "unsized"
    unsized.mkdir()
    (unsized / "a.tar").write_bytes((shapes_shards / "train-000000.tar").read_bytes())
    assert check_shard_spec(str(unsized), "data.train_shards") == []
    (nosizes,) = check_shard_spec(str(unsized), "data.train_shards", need_sizes=True)
    assert "1 of 1 shards have no sample count" in nosizes and "data.num_samples" in nosizes
    # Cheap enough for config validation: no torch (nor webdataset, which imports it) in a fresh interpreter.
    code = (
        "import sys; from mmscale.data.shards import check_shard_spec; "
        "from mmscale.data.tokenizer import check_tokenizer_path; "
        f"assert check_shard_spec({str(shapes_shards)!r}, 'f', need_sizes=True) == []; "
        "assert check_tokenizer_path('nope', 'f'); "
        "assert not {'torch', 'webdataset', 'transformers'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------------- synthetic data


def test_shapes_dataset_deterministic(shapes_shards, tmp_path):
    again = make_shapes_dataset(tmp_path / "a", 8, 8, IMAGE_SIZE, seed=0)
    other = make_shapes_dataset(tmp_path / "b", 8, 8, IMAGE_SIZE, seed=1)
    first = (shapes_shards / "train-000000.tar").read_bytes()
    assert (again / "train-000000.tar").read_bytes() == first
    assert (other / "train-000000.tar").read_bytes() != first
    made = ensure_shapes_dataset(tmp_path / "c", 8, 4, IMAGE_SIZE, seed=0)
    mtime = (made / "train-000001.tar").stat().st_mtime_ns
    assert ensure_shapes_dataset(tmp_path / "c", 8, 4, IMAGE_SIZE, seed=0) == made  # present: reused
    assert (made / "train-000001.tar").stat().st_mtime_ns == mtime
    ensure_shapes_dataset(tmp_path / "c", 4, 4, IMAGE_SIZE, seed=0)  # other arguments: replaced
    assert sorted(p.name for p in made.glob("*.tar")) == ["train-000000.tar"]
    assert json.loads((made / "sizes.json").read_text()) == {"train-000000.tar": 4}
    for sample in read_tar(shapes_shards / "train-000000.tar").values():
        words = sample["txt"].decode().split()
        assert words[0] == "a" and words[1] in COLOURS and words[2] in SHAPES
        assert words[-3] == "a" and words[-2] in COLOURS and words[-1] in SHAPES
        assert Image.open(io.BytesIO(sample["jpg"])).size == (IMAGE_SIZE, IMAGE_SIZE)


def _blobs(png: bytes) -> list[np.ndarray]:
    """The pixels (N, 3) of each 8-connected blob that stands out from the light grey background."""
    from scipy import ndimage

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    ink = np.abs(rgb - 245).max(axis=-1) > 100  # background (245, 245, 245); every colour differs by >= 200
    labels, n = ndimage.label(ink, structure=np.ones((3, 3)))
    return [rgb[labels == i] for i in range(1, n + 1)]


def _parse_counts_caption(caption: str) -> tuple[int, str, str]:
    count, colour, shape = caption.split()  # the grammar: "{count} {colour} {shape, plural unless one}"
    n = COUNTS.index(count) + 1
    assert colour in COLOURS
    assert shape == (SHAPES if n == 1 else SHAPE_PLURALS)[SHAPES.index(shape.removesuffix("s"))]
    return n, colour, shape.removesuffix("s")


@pytest.mark.parametrize("image_size", [32, 64])
def test_counts_images_hold_the_count(tmp_path, image_size):
    """Decoded from a png shard, each image has exactly N separate blobs, of one colour and one size."""
    from mmscale.data.synthetic import _RGB

    out = make_synthetic_dataset(tmp_path, 64, 64, image_size, seed=3, image_format="png", task="counts")
    seen = set()
    for sample in read_tar(out / "train-000000.tar").values():
        n, colour, shape = _parse_counts_caption(sample["txt"].decode())
        seen.add(n)
        blobs = _blobs(sample["png"])
        assert len(blobs) == n, sample["txt"]
        for blob in blobs:  # the blob's own colour: its most saturated pixels (the edges blend into the background)
            core = blob[np.abs(blob - 245).max(axis=-1) > 180]
            assert np.abs(core.mean(axis=0) - _RGB[colour]).max() < 25, (sample["txt"], core.mean(axis=0))
        areas = [len(b) for b in blobs]
        assert max(areas) - min(areas) <= 0.25 * max(areas) + 2, (sample["txt"], areas)  # one kind, one size
    assert seen == {1, 2, 3, 4}


def test_counts_task_deterministic_and_uniform(tmp_path):
    img, caption = make_counts_sample(5, IMAGE_SIZE, seed=0)
    again, caption_again = make_counts_sample(5, IMAGE_SIZE, seed=0)
    assert caption == caption_again and img.tobytes() == again.tobytes()
    assert [make_counts_sample(i, 8, 1)[1] for i in range(20)] != [make_counts_sample(i, 8, 0)[1] for i in range(20)]
    a = make_synthetic_dataset(tmp_path / "a", 8, 8, IMAGE_SIZE, seed=0, task="counts")
    b = make_synthetic_dataset(tmp_path / "b", 8, 8, IMAGE_SIZE, seed=0, task="counts")
    assert (a / "train-000000.tar").read_bytes() == (b / "train-000000.tar").read_bytes()
    assert (a / "train-000000.tar").read_bytes() != (make_shapes_dataset(tmp_path / "c", 8, 8, IMAGE_SIZE) /
                                                      "train-000000.tar").read_bytes()
    # Count, colour and shape uniform and independent: all 96 combinations, each count near a quarter.
    drawn = [_parse_counts_caption(make_counts_sample(i, 8, seed=0)[1]) for i in range(2000)]
    assert len(set(drawn)) == len(COUNTS) * len(COLOURS) * len(SHAPES)
    for n in range(1, 5):
        assert 400 < sum(d[0] == n for d in drawn) < 600
    with pytest.raises(ValueError, match="unknown synthetic task 'count'; known: shapes, counts"):
        make_synthetic_dataset(tmp_path / "d", 8, task="count")


def test_ensure_synthetic_dataset_switches_task(tmp_path):
    """One folder, one split: another task replaces it, and the stale stamp cannot bring the old one back."""
    ensure_shapes_dataset(tmp_path, 8, 4, IMAGE_SIZE)
    assert (tmp_path / "train.shapes.json").is_file()  # the stamp name earlier runs wrote: they are reused
    ensure_synthetic_dataset(tmp_path, 8, 4, IMAGE_SIZE, task="counts")
    assert not (tmp_path / "train.shapes.json").exists() and (tmp_path / "train.counts.json").is_file()
    assert all(_parse_counts_caption(c) for c in captions_from_shards(str(tmp_path)))
    ensure_shapes_dataset(tmp_path, 8, 4, IMAGE_SIZE)
    assert [c.split()[0] for c in captions_from_shards(str(tmp_path))] == ["a"] * 8
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"train-000000.tar": 4, "train-000001.tar": 4}


def test_synthetic_task_config_field(tmp_path):
    assert DataConfig().synthetic_task == "shapes" and SYNTHETIC_TASKS == ("shapes", "counts")
    assert load_config(None, ["output_dir=x", "data.synthetic_train_samples=8", "data.synthetic_task=counts"],
                       check_paths=False).data.synthetic_task == "counts"
    with pytest.raises(ConfigError) as e:
        load_config(None, ["output_dir=x", "data.synthetic_train_samples=8", "data.synthetic_task=count"])
    assert e.value.problems == ["data.synthetic_task: 'count' is not one of 'shapes', 'counts'"]
    with pytest.raises(ConfigError) as e:  # a task for your own shards would be silently ignored
        load_config(None, ["output_dir=x", "data.train_shards=s.tar", "data.synthetic_task=counts"], check_paths=False)
    assert e.value.problems == ["data.synthetic_task: 'counts' applies only to generated data, but data.train_shards "
                                "('s.tar') names your own shards; drop one of the two"]
    # a run's resolved config.yaml (the generated shards named, synthetic_train_samples kept) loads back
    resolved = load_config(None, ["output_dir=x", "data.train_shards=s.tar", "data.synthetic_train_samples=8",
                                  "data.synthetic_task=counts"], check_paths=False)
    assert resolved.data.synthetic_task == "counts"
    cfg = load_config(ROOT / "configs" / "demo-finetune.yaml", check_paths=False)  # the shipped fine-tune
    assert cfg.data.synthetic_task == "counts" and cfg.data.tokenizer == "runs/demo/data/tokenizer.model"
    assert cfg.model.init_from == "runs/demo" and cfg.callbacks[0].name == "qlora"


# ----------------------------------------------------------------------------------------------- loaders


def test_two_ranks_two_workers_see_each_sample_once(shapes_shards, sp_tokenizer):
    cfg = data_cfg(num_workers=2)
    all_keys = set()
    for shard in resolve_shards(str(shapes_shards)):
        all_keys |= set(read_tar(Path(shard)))
    epochs: list[list[str]] = [[], []]
    for rank in range(2):
        loader = TrainLoader(cfg, sp_tokenizer, 4, rank, 2, seed=7, shards=str(shapes_shards))
        assert loader.steps_per_epoch == 64 // (4 * 2)
        batches = take(loader, 2 * loader.steps_per_epoch)
        assert loader.state_dict()["epoch"] == 2 and loader.state_dict()["batch_in_epoch"] == 0
        for i, b in enumerate(batches):
            epochs[i // loader.steps_per_epoch] += b["__key__"]
    for keys in epochs:
        assert len(keys) == len(set(keys)) == len(all_keys)
        assert set(keys) == all_keys
    assert epochs[0] != epochs[1]  # the epoch reshuffles


def test_fewer_shards_than_slots_splits_samples(shapes_val_shards, sp_tokenizer):
    cfg = data_cfg(num_workers=2)  # 2 shards < 2 ranks x 2 workers: sample-level split
    keys = []
    for rank in range(2):
        loader = TrainLoader(cfg, sp_tokenizer, 2, rank, 2, seed=0, shards=str(shapes_val_shards))
        keys += [k for b in take(loader, loader.steps_per_epoch) for k in b["__key__"]]
    assert len(keys) == len(set(keys)) == 16


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory):
    """5 shards of 7, 3, 9, 5 and 6 samples (30) in one folder with one sizes.json."""
    root = tmp_path_factory.mktemp("uneven")
    start = 0
    for prefix, n in zip("abcde", (7, 3, 9, 5, 6)):
        make_shapes_dataset(root, n, n, 16, seed=3, prefix=prefix, first_index=start)
        start += n
    return root


@pytest.mark.parametrize("num_workers", [0, 2])
def test_equal_steps_per_rank_with_uneven_shards(uneven_shards, sp_tokenizer, num_workers):
    cfg = data_cfg(num_workers=num_workers, image_size=16)
    counts = []
    for rank in range(2):
        loader = TrainLoader(cfg, sp_tokenizer, 2, rank, 2, seed=0, shards=str(uneven_shards))
        assert loader.steps_per_epoch == 30 // (2 * 2)
        batches = take(loader, 2 * loader.steps_per_epoch + 1)
        assert all(b["input_ids"].shape[0] == 2 for b in batches)
        assert loader.state_dict()["epoch"] == 2 and loader.state_dict()["batch_in_epoch"] == 1
        counts.append(len(batches))
    assert counts[0] == counts[1]


def _corrupt_shards(root: Path) -> set[str]:
    """Shard c0: 4 good samples, a garbage JPEG, a sample with no caption, one with an empty caption.
    Shard c1: 5 samples, truncated inside its 3rd. Returns the keys of the 6 usable samples."""
    good = make_shapes_dataset(root / "src", 9, 9, 16, seed=5)
    src = list(read_tar(good / "train-000000.tar").items())
    samples = [{"__key__": k, **v} for k, v in src[:4]]
    samples.append({"__key__": "bad_jpeg", "jpg": b"\xff\xd8\xff\xe0 this is not a jpeg", "txt": "a red circle"})
    samples.append({"__key__": "no_caption", "jpg": src[4][1]["jpg"]})
    samples.append({"__key__": "empty_caption", "jpg": src[4][1]["jpg"], "txt": "   "})
    write_tar_shards(samples, root / "shards", 100, prefix="c0")
    write_tar_shards([{"__key__": k, **v} for k, v in src[4:]], root / "shards", 100, prefix="c1")
    broken = root / "shards" / "c1-000000.tar"
    data = broken.read_bytes()
    with tarfile.open(broken) as tar:
        offsets = [m.offset_data for m in tar]
    broken.write_bytes(data[: offsets[4] + 100])  # members: 0.jpg 0.txt 1.jpg 1.txt 2.jpg <- cut inside
    good_keys = {k for k, _ in src[:4]} | {k for k, _ in src[4:6]}
    return good_keys


def test_corrupt_samples_are_skipped_and_counted(tmp_path, sp_tokenizer, caplog):
    good_keys = _corrupt_shards(tmp_path)
    shards = str(tmp_path / "shards")
    # 6 usable samples; 4 skips: garbage JPEG, no caption, empty caption, the truncated tar (its cut sample dropped).
    cfg = data_cfg(image_size=16, num_samples=6, shuffle_buffer=0, warn_every=2)
    loader = TrainLoader(cfg, sp_tokenizer, 1, 0, 1, seed=0, shards=shards)
    with caplog.at_level("WARNING", logger="mmscale.data.pipeline"):
        batches = take(loader, 18)  # three epochs: the run goes on
    for epoch in range(3):
        assert sorted(k for b in batches[6 * epoch : 6 * epoch + 6] for k in b["__key__"]) == sorted(good_keys)
    # Skips are counted when the reader passes them: all 4 in the first pass over the data, 12 at most in 3 epochs.
    assert 4 <= loader.num_skipped == sum(int(b["num_skipped"]) for b in batches) <= 12
    for reason in ("bad_jpeg in", "no_caption in", "empty_caption in", "broken tar"):
        assert reason in caplog.text
    warnings = [r for r in caplog.records if "corrupt sample(s)" in r.getMessage()]
    assert 2 <= len(warnings) <= 1 + loader.num_skipped // 2  # rate limited: the first skip, then every 2nd

    # 8 samples from 6 usable ones: the eval loader wraps around, reading every corrupt sample exactly once.
    evaluator = EvalLoader(cfg, sp_tokenizer, 2, 0, 1, shards=shards, max_batches=4)
    keys = [k for b in evaluator for k in b["__key__"]]
    assert keys == sorted(good_keys) + sorted(good_keys)[:2]
    assert evaluator.num_skipped == 4


def test_resume_matches_uninterrupted_run(shapes_shards, sp_tokenizer):
    cfg = data_cfg(num_workers=2)

    def loader():
        return TrainLoader(cfg, sp_tokenizer, 4, 1, 2, seed=3, shards=str(shapes_shards))

    steps = loader().steps_per_epoch  # 8
    reference = take(loader(), steps + 5)
    assert [b["__key__"] for b in take(loader(), 3)] == [b["__key__"] for b in reference[:3]]  # deterministic
    for stop in (3, steps):  # mid-epoch with an odd stop (worker relabelling), and at an epoch boundary
        first = loader()
        take(first, stop)
        sd = first.state_dict()
        assert (sd["epoch"], sd["batch_in_epoch"]) == divmod(stop, steps)
        resumed = loader()
        resumed.load_state_dict(json.loads(json.dumps(sd)))  # checkpoints store it as JSON
        for got, want in zip(take(resumed, steps + 5 - stop), reference[stop:], strict=True):
            assert got["__key__"] == want["__key__"]
            for name in ("pixel_values", "input_ids", "labels", "media_index", "image_mask", "attention_mask"):
                torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
        assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["batch_in_epoch"] == 5


def test_resume_refuses_other_settings(shapes_shards, sp_tokenizer):
    def loader(world_size=2, seed=3, **kw):
        return TrainLoader(data_cfg(**kw), sp_tokenizer, 4, 0, world_size, seed=seed, shards=str(shapes_shards))

    sd = json.loads(json.dumps(loader(num_workers=2).state_dict()))  # as a checkpoint stores it
    sd["batch_in_epoch"] = 3
    assert loader(num_workers=2).resume_problems(sd) == []
    # another worker count or world size resumes (tests/test_data_resume.py): not refused any more
    assert loader(num_workers=1).resume_problems(sd) == []
    assert loader(num_workers=2, world_size=1).resume_problems(sd) == []
    (seed,) = loader(num_workers=2, seed=4).resume_problems(sd)
    assert seed.startswith("data position: seed was 3 at the checkpoint, is 4 now; ") and "train.seed=3" in seed
    with pytest.raises(ValueError, match=r"(?s)epoch 0 batch 3.*resume with train\.seed=3"):
        loader(num_workers=2, seed=4).load_state_dict(sd)
    (block,) = loader(num_workers=2, shuffle_buffer=8).resume_problems(sd)  # positions count blocks of 16
    assert "shuffle_buffer was 16 at the checkpoint, is 8 now" in block and "data.shuffle_buffer=16" in block
    problems = loader(num_workers=2, num_samples=36).resume_problems(sd)  # 8 steps per epoch become 4
    assert [p.split(" was ")[0] for p in problems] == ["data position: samples_per_epoch",
                                                       "data position: steps_per_epoch"]
    assert "data.num_samples=64" in problems[0]
    old_checkpoint = {k: sd[k] for k in ("epoch", "batch_in_epoch", "num_skipped")}  # without the settings
    resumed = loader(num_workers=1)
    resumed.load_state_dict(old_checkpoint)
    assert resumed.state_dict()["batch_in_epoch"] == 3
    # a checkpoint from before the raw positions resumes on its own layout only
    legacy = {k: v for k, v in sd.items() if k not in ("workers", "plan", "rank")}
    assert loader(num_workers=2).resume_problems(legacy) == []
    (moved,) = loader(num_workers=1).resume_problems(legacy)
    assert "no per-worker raw positions" in moved and "resume on 2 rank(s) with data.num_workers=2" in moved


def test_eval_loader_is_finite_and_repeatable(shapes_val_shards, sp_tokenizer):
    cfg = data_cfg(num_workers=2)
    shards = str(shapes_val_shards)
    loaders = [EvalLoader(cfg, sp_tokenizer, 2, r, 2, shards=shards, max_batches=3) for r in range(2)]
    assert [len(x) for x in loaders] == [3, 3]
    first = [b["__key__"] for b in loaders[0]]
    assert len(first) == 3 and [b["__key__"] for b in loaders[0]] == first
    keys = [k for ld in loaders for b in ld for k in b["__key__"]]
    assert len(set(keys)) == len(keys) == 12
    big = EvalLoader(cfg, sp_tokenizer, 2, 0, 2, shards=str(shapes_val_shards), max_batches=100)
    assert len(big) == 16 // (2 * 2)


def test_batch_contract(shapes_shards, sp_tokenizer):
    cfg = data_cfg(max_images=2)
    b = take(TrainLoader(cfg, sp_tokenizer, 3, 0, 1, seed=0, shards=str(shapes_shards)), 1)[0]
    L = 1 + cfg.max_text_len
    assert b["pixel_values"].shape == (3, 2, 3, IMAGE_SIZE, IMAGE_SIZE) and b["pixel_values"].dtype == torch.float32
    assert b["image_mask"].tolist() == [[True, False]] * 3
    assert (b["pixel_values"][:, 1] == 0).all()
    for name in ("input_ids", "attention_mask", "labels", "media_index"):
        assert b[name].shape == (3, L) and b[name].dtype == torch.int64, name
    assert b["num_skipped"].shape == () and b["num_skipped"].dtype == torch.int64
    assert len(b["__key__"]) == 3
    tok = sp_tokenizer
    for ids, am in zip(b["input_ids"].tolist(), b["attention_mask"].tolist()):
        n = sum(am)
        assert ids[0] == tok.image_token_id and ids[n - 1] == tok.eos_id and set(ids[n:]) <= {tok.pad_id}
        words = tok.decode(ids[1:]).split()
        assert words[1] in COLOURS and words[2] in SHAPES


def test_collate_masks_and_media_index():
    img, pad, image, eos = torch.ones(3, 4, 4), 0, 9, 2
    samples = [
        {"__key__": "one", "images": [img], "input_ids": [image, 5, 6, eos]},
        {"__key__": "two", "images": [img, 2 * img], "input_ids": [5, image, 6, image, 7, eos]},
        {"__key__": "none", "images": [], "input_ids": [5, 6, eos]},
        {"__key__": "extra_token", "images": [img], "input_ids": [image, 5, image, eos]},
    ]
    b = collate_samples(samples, pad_id=pad, image_token_id=image, max_images=2, seq_len=7)
    assert b["pixel_values"].shape == (4, 2, 3, 4, 4)
    assert b["image_mask"].tolist() == [[True, False], [True, True], [False, False], [True, False]]
    assert torch.equal(b["pixel_values"][1, 1], 2 * img) and (b["pixel_values"][0, 1] == 0).all()
    assert b["input_ids"][0].tolist() == [image, 5, 6, eos, pad, pad, pad]
    assert b["attention_mask"][1].tolist() == [1, 1, 1, 1, 1, 1, 0]
    I = IGNORE_INDEX
    assert b["labels"][0].tolist() == [I, 5, 6, eos, I, I, I]
    assert b["labels"][1].tolist() == [5, I, 6, I, 7, eos, I]
    assert b["media_index"][0].tolist() == [0] * 7
    assert b["media_index"][1].tolist() == [-1, 0, 0, 1, 1, 1, 1]
    assert b["media_index"][2].tolist() == [-1] * 7
    assert b["media_index"][3].tolist() == [0] * 7  # clamped: a second <image> token but one real image
    with pytest.raises(ValueError, match="images > max_images"):
        collate_samples(samples[1:2], pad_id=pad, image_token_id=image, max_images=1, seq_len=7)


def test_image_to_tensor_resizes_shorter_side_and_centre_crops():
    arr = np.zeros((20, 40, 3), dtype=np.uint8)  # H=20, W=40: left quarter red, the rest blue
    arr[:, :10] = (255, 0, 0)
    arr[:, 10:] = (0, 0, 255)
    x = image_to_tensor(Image.fromarray(arr), 10, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    assert x.shape == (3, 10, 10)
    torch.testing.assert_close(x[:, 5, 5], torch.tensor([-1.0, -1.0, 1.0]))  # the red quarter is cropped away
    assert x.min() >= -1 and x.max() <= 1


# ----------------------------------------------------------------------------------------------- tokenizers


def test_sentencepiece_tokenizer(sp_tokenizer, tmp_path):
    tok = sp_tokenizer
    specials = [tok.pad_id, tok.bos_id, tok.eos_id, tok.image_token_id]
    assert len(set(specials)) == 4 and all(0 <= i < tok.vocab_size for i in specials)
    text = "a red circle left of a blue square"
    ids = tok.encode(text)
    assert not set(ids) & set(specials) and tok.decode(ids) == text
    for word in (*COLOURS, *SHAPES):
        assert len(tok.encode(word)) == 1, word  # word-level: the lead's per-word loss sees whole words
    again = load_tokenizer(tok.save(tmp_path / "tok"))
    assert again.encode(text) == ids and again.vocab_size == tok.vocab_size
    assert load_tokenizer(tmp_path / "tok").image_token_id == tok.image_token_id  # a folder with tokenizer.model
    unpickled = pickle.loads(pickle.dumps(tok))  # DataLoader workers under spawn
    assert unpickled.encode(text) == ids


def test_sentencepiece_subword_model_and_foreign_model(tmp_path):
    import sentencepiece as spm

    texts = [f"the {w} jumps over a lazy dog number {i}" for i, w in enumerate(["fox", "cat", "wolf", "bird"] * 15)]
    with pytest.raises(ValueError, match=r"vocab_size \(20\) is below"):
        train_sentencepiece(texts, tmp_path / "sub", vocab_size=20)
    path = train_sentencepiece(texts, tmp_path / "sub", vocab_size=60)  # 71 words + 5 specials > 60: unigram
    tok = load_tokenizer(path)
    assert tok.decode(tok.encode("the lady bat")) == "the lady bat"  # unseen words, spelled in pieces
    # A model trained elsewhere without pad or <image>: both become extra ids past its vocabulary.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(tmp_path / "foreign"), vocab_size=60, minloglevel=2,
        hard_vocab_limit=False,
    )
    foreign = load_tokenizer(tmp_path / "foreign.model")
    n = spm.SentencePieceProcessor(model_file=str(tmp_path / "foreign.model")).get_piece_size()
    assert {foreign.pad_id, foreign.image_token_id} == {n, n + 1} and foreign.vocab_size == n + 2
    assert foreign.decode([foreign.image_token_id] + foreign.encode("the dog")) == IMAGE_TOKEN + "the dog"


def test_hf_tokenizer(tmp_path):
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "</s>", "a", "red", "blue", "circle", "square"]
    raw = RawTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="</s>").save_pretrained(tmp_path / "hf")
    tok = load_tokenizer(tmp_path / "hf")
    assert tok.backend == "hf" and tok.eos_id == 1
    specials = [tok.pad_id, tok.bos_id, tok.eos_id, tok.image_token_id]
    assert len(set(specials)) == 4 and max(specials) < tok.vocab_size == len(words) + 3  # + <pad>, <s>, <image>
    ids = tok.encode("a red circle")
    assert ids == [2, 3, 5] and tok.decode(ids + [tok.eos_id, tok.pad_id]) == "a red circle"
    again = load_tokenizer(tok.save(tmp_path / "saved"))
    assert again.image_token_id == tok.image_token_id and again.vocab_size == tok.vocab_size
    assert isinstance(pickle.loads(pickle.dumps(tok)), Tokenizer)


def test_check_tokenizer_path(sp_tokenizer, tmp_path):
    fix = "give a sentencepiece .model file or a Hugging Face tokenizer folder"
    model = sp_tokenizer.save(tmp_path / "sp")  # sp/tokenizer.model
    assert check_tokenizer_path(str(model), "data.tokenizer") == []
    assert check_tokenizer_path(str(tmp_path / "sp"), "data.tokenizer") == []
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "tokenizer_config.json").write_text("{}")
    assert check_tokenizer_path(str(tmp_path / "hf"), "data.tokenizer") == []
    assert check_tokenizer_path("", "data.tokenizer") == [f"data.tokenizer: empty; {fix}"]
    assert check_tokenizer_path(str(tmp_path / "nope"), "data.tokenizer") == [
        f"data.tokenizer: {str(tmp_path / 'nope')!r} does not exist; {fix}"
    ]
    (tmp_path / "garbage.model").write_text("not a protobuf")
    (bad,) = check_tokenizer_path(str(tmp_path / "garbage.model"), "data.tokenizer")
    assert "garbage.model' is not a loadable sentencepiece model" in bad and bad.endswith(fix)
    with pytest.raises(Exception):  # what the check spares the ranks
        load_tokenizer(tmp_path / "garbage.model")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "spm.model").write_bytes(model.read_bytes())
    (other,) = check_tokenizer_path(str(tmp_path / "other"), "data.tokenizer")
    assert f"holds spm.model; give the file itself: data.tokenizer={tmp_path / 'other' / 'spm.model'}" in other
    (tmp_path / "bare").mkdir()
    (bare,) = check_tokenizer_path(str(tmp_path / "bare"), "data.tokenizer")
    assert "holding neither tokenizer.json/tokenizer_config.json" in bare and bare.endswith(fix)


def test_tokenizer_cli(shapes_shards, tmp_path):
    from mmscale.data.tokenizer import main

    pattern = f"{shapes_shards}/train-{{000000..000001}}.tar"
    assert main(["--shards", pattern, "--out", str(tmp_path / "t"), "--vocab-size", "64"]) == 0
    tok = load_tokenizer(tmp_path / "t.model")
    assert tok.decode(tok.encode("a red circle")) == "a red circle"


# ----------------------------------------------------------------------------------------------- fine-tuning data


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    """prepare_data of a small shapes job (what the demo pretraining makes): (output_dir, tokenizer path)."""
    from mmscale.job.build import prepare_data

    out = tmp_path_factory.mktemp("shapes_run")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"output_dir={out}", "data.synthetic_train_samples=32",
                                                      "data.synthetic_val_samples=16"])
    train, _, tok = prepare_data(cfg, rank=0)
    assert all(c.startswith("a ") for c in captions_from_shards(train))
    return out, tok


def test_generated_tokenizer_spells_every_task(shapes_run):
    """The tokenizer made for the shapes task holds every word of every task as one known piece, so a fine-tune
    on counts can reuse it (and the word-loss probe can measure any of them)."""
    from mmscale.evaluation.image_use import word_token_ids

    tok = load_tokenizer(shapes_run[1])
    words = synthetic_words()
    assert set(words) >= {*COUNTS, *COLOURS, *SHAPES, *SHAPE_PLURALS, "a", "left", "of", "right", "above", "below"}
    assert tok.unknown_words(words) == []
    assert len(word_token_ids(tok, list(words))) == len(words)  # one piece each, mid-caption, all distinct
    assert all(len(tok.encode(w)) == 1 for w in words)
    for task in SYNTHETIC_TASKS:
        for c in captions_from_shards(str(make_synthetic_dataset(shapes_run[0] / task, 64, 64, 8, task=task))):
            ids = tok.encode(c)
            assert len(ids) == len(c.split()) and tok.decode(ids) == c  # whole words, none unknown


def test_finetune_data_reuses_the_pretraining_tokenizer(shapes_run, sp_tokenizer, tmp_path):
    from mmscale.job.build import prepare_data

    overrides = [f"output_dir={tmp_path / 'ft'}", "data.synthetic_train_samples=16", "data.synthetic_val_samples=16",
                 "data.synthetic_task=counts", f"data.tokenizer={shapes_run[1]}"]
    train, val, tok = prepare_data(load_config(ROOT / "configs" / "tiny.yaml", overrides), rank=0)
    assert tok == shapes_run[1] and not (tmp_path / "ft" / "data" / "tokenizer.model").exists()
    for shards in (train, val):
        assert all(_parse_counts_caption(c) for c in captions_from_shards(shards))
    # A tokenizer trained on shapes captions alone (e.g. a demo run made before the counts task) cannot spell them:
    # refused with the config, before any process group starts.
    old = sp_tokenizer.save(tmp_path / "old")
    overrides[-1] = f"data.tokenizer={old}"
    with pytest.raises(ConfigError, match=r"data.tokenizer: '.*old/tokenizer.model' cannot spell the counts task's "
                                          r"words \['one', 'two', 'three', 'four', 'circles', 'squares', 'triangles', "
                                          r"'diamonds'\]"):
        load_config(ROOT / "configs" / "tiny.yaml", overrides)


def test_word_loss_on_count_words(shapes_run, tmp_path):
    """word_loss on a word set is image_use's loss on that set; a count word is one token per caption."""
    from mmscale.evaluation.image_use import image_use, word_loss, word_token_ids
    from mmscale.model import PRESETS, build_model

    torch.manual_seed(0)
    tok = load_tokenizer(shapes_run[1])
    shards = make_synthetic_dataset(tmp_path, 12, 12, IMAGE_SIZE, seed=1, task="counts")
    loader = EvalLoader(data_cfg(max_text_len=8), tok, 4, 0, 1, shards=str(shards), max_batches=3)
    batches = list(loader)
    loader.close()
    model = build_model(PRESETS["tiny"](), vocab_size=tok.vocab_size).eval()
    # In "three red circles" the count is the first mention of a count-or-colour word, the colour the second.
    probe = image_use(model, batches, {"both": word_token_ids(tok, [*COUNTS, *COLOURS])})["both"]
    assert probe["tokens"] == 24 and probe["first_mention"]["tokens"] == 12  # one count, one colour per caption
    assert word_loss(model, batches, tok, [*COUNTS, *COLOURS]) == pytest.approx(probe["loss_true_images"], rel=1e-6)
    count_probe = probe["first_mention"]
    assert word_loss(model, batches, tok, COUNTS) == pytest.approx(count_probe["loss_true_images"], rel=1e-6)
    assert word_loss(model, batches, tok, COUNTS, shuffle_images=True) == pytest.approx(
        count_probe["loss_shuffled_images"], rel=1e-6)
    objects = (*COLOURS, *SHAPES, *SHAPE_PLURALS)
    assert 0 < word_loss(model, batches, tok, objects) < 2 * np.log(tok.vocab_size)
    with pytest.raises(ValueError, match="no tokens of"):
        word_loss(model, batches, tok, ["left"])  # not a counts word
