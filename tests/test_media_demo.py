"""The media demo makers (`mmscale.data.media_demo`): what the clips show matches their captions."""

from __future__ import annotations

import io
import json
import shutil
import sys
import tarfile
import wave

import numpy as np
import pytest
from PIL import Image

from mmscale.data import media_demo as md
from mmscale.data.synthetic import COLOURS, COUNTS, SHAPES

_BG = np.array([245, 245, 245], dtype=np.float64)
HAS_ESPEAK = shutil.which("espeak-ng") is not None


def _centroid(rgb: np.ndarray, floor: float = 0.0) -> tuple[float, float]:
    """(x, y) of the pixels that differ from the background, weighted by how much."""
    w = np.abs(rgb.astype(np.float64) - _BG).sum(axis=-1)
    w = np.maximum(w - floor, 0.0)
    assert w.sum() > 0, "no shape in the frame"
    ys, xs = np.indices(w.shape)
    return float((xs * w).sum() / w.sum()), float((ys * w).sum() / w.sum())


def _png_frames(members: dict) -> list[np.ndarray]:
    names = sorted(k for k in members if k.startswith("frame_") and k.endswith(".png"))
    assert names == [f"frame_{i:03d}.png" for i in range(len(names))]
    return [np.asarray(Image.open(io.BytesIO(members[n])).convert("RGB")) for n in names]


def _check_motion(frames: list[np.ndarray], direction: str, floor: float = 0.0, tol: float = 0.0) -> None:
    pts = np.array([_centroid(f, floor) for f in frames])
    axis, sign = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1)}[direction]
    along, across = sign * pts[:, axis], pts[:, 1 - axis]
    steps = np.diff(along)
    assert (steps > -tol).all(), f"{direction}: centroid not monotone along the axis: {pts.tolist()}"
    assert along[-1] - along[0] > 3.0, f"{direction}: moved only {along[-1] - along[0]:.2f} px: {pts.tolist()}"
    assert np.ptp(across) < 0.6 + tol, f"{direction}: drifted across the axis: {pts.tolist()}"


def _caption_parts(caption: str) -> tuple[str, str, str]:
    words = caption.split()
    assert len(words) == 5 and words[0] == "a" and words[3] == "moves", caption
    assert words[1] in COLOURS and words[2] in SHAPES and words[4] in md.DIRECTIONS, caption
    return words[1], words[2], words[4]


# ----------------------------------------------------------------------------------------------------- video


def test_video_shape_moves_in_the_captioned_direction():
    seen = set()
    for i in range(24):
        s = md.make_video_sample(i, seed=3)
        colour, shape, direction = _caption_parts(s["txt"])
        assert json.loads(s["json"]) == {"colour": colour, "shape": shape, "direction": direction, "frames": 8,
                                         "size": 32}
        frames = _png_frames(s)
        assert len(frames) == 8 and frames[0].shape == (32, 32, 3)
        _check_motion(frames, direction)
        seen.add(direction)
    assert seen == set(md.DIRECTIONS)
    frames = _png_frames(md.make_video_sample(5, seed=3, frames=5, size=48))
    assert len(frames) == 5 and frames[0].shape == (48, 48, 3)


def test_video_first_frame_does_not_tell_the_direction():
    starts: dict[str, list[tuple[float, float]]] = {d: [] for d in md.DIRECTIONS}
    for i in range(200):
        s = md.make_video_sample(i, seed=0, frames=2)
        starts[_caption_parts(s["txt"])[2]].append(_centroid(_png_frames(s)[0]))
    for d in md.DIRECTIONS:
        assert len(starts[d]) >= 25, {k: len(v) for k, v in starts.items()}
    left, right = np.array(starts["left"]), np.array(starts["right"])
    up, down = np.array(starts["up"]), np.array(starts["down"])
    # Start x of "left" and "right" clips (start y of "up" and "down") come from one range: they overlap widely.
    for a, b in ((left[:, 0], right[:, 0]), (up[:, 1], down[:, 1]), (left[:, 0], up[:, 0])):
        lo, hi = max(a.min(), b.min()), min(a.max(), b.max())
        assert hi - lo > 0.6 * (max(a.max(), b.max()) - min(a.min(), b.min())), (a, b)
        assert abs(a.mean() - b.mean()) < 1.5


def test_video_is_deterministic():
    a, b = md.make_video_sample(7, seed=1), md.make_video_sample(7, seed=1)
    assert a == b
    assert md.make_video_sample(8, seed=1) != a
    assert md.make_video_sample(7, seed=2) != a


def test_video_mp4_decodes_to_the_frames():
    av = pytest.importorskip("av", reason="PyAV is not installed (pip install av)")
    seen = set()
    for i in range(8):
        s = md.make_video_sample(i, seed=4, mp4=True)
        assert not any(k.startswith("frame_") for k in s)
        direction = _caption_parts(s["txt"])[2]
        with av.open(io.BytesIO(s["mp4"])) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == 8 and frames[0].shape == (32, 32, 3)
        _check_motion(frames, direction, floor=40.0, tol=0.3)
        seen.add(direction)
    assert len(seen) >= 3
    assert md.make_video_sample(0, seed=4, mp4=True)["mp4"] == md.make_video_sample(0, seed=4, mp4=True)["mp4"]
    with pytest.raises(ValueError, match="even"):
        md.make_video_sample(0, seed=4, size=33, mp4=True)


def test_video_mp4_without_pyav_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    with pytest.raises(ImportError, match="pip install av"):
        md.make_video_sample(0, seed=0, mp4=True)


# ----------------------------------------------------------------------------------------------------- audio


def _read_wav(data: bytes) -> tuple[np.ndarray, int]:
    with wave.open(io.BytesIO(data), "rb") as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2
        rate = w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64) / 32768.0
    return x, rate


def _count_beeps(x: np.ndarray, rate: int) -> int:
    hop = rate // 200  # 5 ms windows
    env = np.sqrt(np.mean(x[: len(x) // hop * hop].reshape(-1, hop) ** 2, axis=1))
    on = env > 0.1
    return int(on[0]) + int(np.sum(on[1:] & ~on[:-1]))


def test_audio_beeps_match_the_caption():
    seen = set()
    for i in range(40):
        s = md.make_audio_sample(i, seed=2)
        words = s["txt"].split()
        assert len(words) == 3 and words[0] in COUNTS and words[1] in md.PITCHES, s["txt"]
        count, pitch = COUNTS.index(words[0]) + 1, words[1]
        assert words[2] == ("beep" if count == 1 else "beeps")
        x, rate = _read_wav(s["wav"])
        assert rate == 16000 and len(x) == 16000
        assert _count_beeps(x, rate) == count, s["txt"]
        spectrum = np.abs(np.fft.rfft(x))
        peak = np.fft.rfftfreq(len(x), 1 / rate)[spectrum.argmax()]
        assert (peak < 1000) == (pitch == "low"), (s["txt"], peak)
        truth = json.loads(s["json"])
        assert truth["count"] == count and truth["pitch"] == pitch
        seen.add((count, pitch))
    assert len(seen) == 8, seen  # every count with both pitches
    assert md.make_audio_sample(3, seed=2) == md.make_audio_sample(3, seed=2)
    assert md.make_audio_sample(3, seed=2)["wav"] != md.make_audio_sample(4, seed=2)["wav"]
    x, rate = _read_wav(md.make_audio_sample(0, seed=0, seconds=2.0, sample_rate=8000)["wav"])
    assert rate == 8000 and len(x) == 16000


# ----------------------------------------------------------------------------------------------------- speech


@pytest.mark.skipif(not HAS_ESPEAK, reason="espeak-ng is not on PATH (apt-get install espeak-ng)")
def test_speech_sample_speaks_digits():
    voices, speeds = ["en", "en-us+m7"], [140, 180]
    for i in range(3):
        s = md.make_speech_sample(i, seed=0, voices=voices, speeds=speeds)
        words = s["txt"].split()
        assert 1 <= len(words) <= 3 and all(w in md.DIGITS for w in words), s["txt"]
        truth = json.loads(s["json"])
        assert truth["voice"] in voices and truth["speed"] in speeds
        assert [md.DIGITS[d] for d in truth["digits"]] == words
        x, rate = _read_wav(s["wav"])
        assert rate == 22050 and 0.2 < len(x) / rate < 4.0
        assert np.sqrt(np.mean(x**2)) > 0.01  # speech, not silence
    assert md.make_speech_sample(1, 0, voices, speeds) == md.make_speech_sample(1, 0, voices, speeds)
    assert json.loads(md.make_speech_sample(1, 0, ["en-gb"], [150])["json"])["voice"] == "en-gb"


def test_speech_without_espeak_names_the_install(monkeypatch):
    monkeypatch.setattr(md.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="apt-get install espeak-ng"):
        md.make_speech_sample(0, 0)


# ----------------------------------------------------------------------------------------------------- CLI


def _read_shards(paths) -> list[dict]:
    samples: dict[str, dict] = {}
    for p in paths:
        with tarfile.open(p) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return list(samples.values())


def _check_tokenizer(out, captions: list[str], token: str) -> None:
    import sentencepiece as spm

    from mmscale.data.tokenizer import load_tokenizer

    tok = load_tokenizer(out / "tokenizer.model")
    words = sorted({w for c in captions for w in c.split()})
    assert tok.unknown_words(words) == []
    for c in captions:
        assert tok.decode(tok.encode(c)) == c
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert sp.piece_to_id(token) not in (sp.unk_id(), -1)
    assert sp.id_to_piece(sp.piece_to_id(token)) == token


def test_cli_video(tmp_path, capsys):
    out = tmp_path / "video"
    assert md.main(["--task", "video", "--out", str(out), "--num-samples", "12", "--val-samples", "4",
                    "--samples-per-shard", "5"]) == 0
    printed = capsys.readouterr().out
    train = sorted(out.glob("train-*.tar"))
    val = sorted(out.glob("val-*.tar"))
    assert [p.name for p in train] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [p.name for p in val] == ["val-000000.tar"]
    assert json.loads((out / "sizes.json").read_text()) == {
        "train-000000.tar": 5, "train-000001.tar": 5, "train-000002.tar": 2, "val-000000.tar": 4}
    for p in [*train, *val, out / "sizes.json", out / "tokenizer.model"]:
        assert str(p) in printed
    samples = _read_shards(train) + _read_shards(val)
    assert len(samples) == 16
    for s in samples:
        assert sorted(s) == [f"frame_{i:03d}.png" for i in range(8)] + ["json", "txt"]
    captions = [s["txt"].decode() for s in samples]
    _check_tokenizer(out, captions, "<video>")
    # every word the task can produce is spelled, not only the ones these 16 captions used
    from mmscale.data.tokenizer import load_tokenizer
    assert load_tokenizer(out / "tokenizer.model").unknown_words(md.media_words("video")) == []


def test_cli_audio_is_byte_identical_across_runs(tmp_path):
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run
        assert md.main(["--task", "audio", "--out", str(out), "--num-samples", "6", "--val-samples", "3",
                        "--seed", "5"]) == 0
        outs.append(out)
    for name in ("train-000000.tar", "val-000000.tar"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()
    samples = _read_shards([outs[0] / "train-000000.tar", outs[0] / "val-000000.tar"])
    assert len(samples) == 9 and all(sorted(s) == ["json", "txt", "wav"] for s in samples)
    _check_tokenizer(outs[0], [s["txt"].decode() for s in samples], "<audio>")


@pytest.mark.skipif(not HAS_ESPEAK, reason="espeak-ng is not on PATH (apt-get install espeak-ng)")
def test_cli_speech_held_out_voices(tmp_path):
    out = tmp_path / "speech"
    assert md.main(["--task", "speech", "--out", str(out), "--num-samples", "4", "--val-samples", "3",
                    "--voices", "en,en+m3", "--speeds", "150,170", "--val-voices", "en-gb", "--val-speeds", "140"]) == 0
    train, val = _read_shards(sorted(out.glob("train-*.tar"))), _read_shards(sorted(out.glob("val-*.tar")))
    assert len(train) == 4 and len(val) == 3
    for s in train:
        truth = json.loads(s["json"])
        assert truth["voice"] in ("en", "en+m3") and truth["speed"] in (150, 170)
    for s in val:
        assert json.loads(s["json"])["voice"] == "en-gb" and json.loads(s["json"])["speed"] == 140
    assert all(sorted(s) == ["json", "txt", "wav"] for s in train + val)
    _check_tokenizer(out, [s["txt"].decode() for s in train + val], "<audio>")
