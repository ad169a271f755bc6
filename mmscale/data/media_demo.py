"""Demo data for media other than images: short videos, beeps and spoken digits, with captions that only the
clip can complete. Three tasks.

    python -m mmscale.data.media_demo --task video --out data/video --num-samples 2000 --val-samples 200 [--mp4]
    python -m mmscale.data.media_demo --task audio --out data/audio --num-samples 2000 --val-samples 200
    python -m mmscale.data.media_demo --task speech --out data/speech --num-samples 2000 --val-samples 200 \\
        --voices en,en-us,en+m3 --val-voices en-gb,en+f4

`video`: one coloured shape (the colours and shapes of `mmscale.data.synthetic`) moving left, right, up or down
(`DIRECTIONS`) at a constant speed across `frames` frames of `size` x `size` pixels on a plain background. Each
caption reads `a {colour} {shape} moves {direction}`, e.g. "a red circle moves left". The start position (x and y
each uniform over the same central range) and the speed are drawn independently of the direction, so every frame
alone has the same distribution whatever the direction: only the order of the frames tells it. Members:
`frame_000.png`, `frame_001.png`, ... (or, with `mp4=True`, one `mp4` member encoded with PyAV at `VIDEO_FPS`
frames per second, yuv420p; `pip install av`), `txt` and `json` ({"colour", "shape", "direction", "frames",
"size"}).

`audio`: 1 to 4 beeps (`COUNTS`), all low (`PITCH_HZ["low"]`, 440 Hz) or all high (1760 Hz), sines with short
fades and a little noise, in a clip of `seconds` at `sample_rate` (16-bit PCM mono); beep lengths, gaps, start
time and loudness are jittered. Each caption reads `{count} {pitch} beep(s)`: "one low beep", "three high beeps".
Count and pitch are drawn uniformly and independently. Members: `wav`, `txt` and `json` ({"count", "pitch",
"frequency", "onsets" (seconds), "durations" (seconds)}).

`speech`: 1 to 3 digits (`DIGITS`, "zero" to "nine") spoken by `espeak-ng` (a system binary: `apt-get install
espeak-ng`) with a voice and a speed (words per minute) drawn from the given lists, so that train and validation
can use disjoint voices (held-out voices: `--val-voices`). The caption is the words spoken, e.g. "three seven".
Members: `wav` (espeak's own rate, 22050 Hz mono 16-bit: the trainer resamples), `txt` and `json` ({"voice",
"speed", "digits": [3, 7]}). Clips longer than `--seconds` are left whole (the trainer cuts or pads); the maker
warns when many are.

`write_media_demo` (and the CLI) writes `{out}/train-000000.tar`, ..., `{out}/val-000000.tar`, ... with the
`sizes.json` the shard writer keeps, and a sentencepiece tokenizer `{out}/tokenizer.model` trained on the captions
and every word of the task (`media_words(task)`), with the task's placeholder (`<video>`, or `<audio>` for audio
and speech: `MEDIA_TOKENS`) as a piece.

Generation is deterministic: sample i depends only on (task, seed, i) (and, for speech, on the voice and speed
lists it draws from); video and audio shards are byte-identical across runs.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import random
import shutil
import subprocess
import sys
import tempfile
import wave
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mmscale.data.shards import SIZES_FILE, remove_shards, write_tar_shards
from mmscale.data.synthetic import _BACKGROUND, _RGB, _SUPERSAMPLE, COLOURS, COUNTS, SHAPES, _draw_shape

log = logging.getLogger(__name__)

MEDIA_TASKS: tuple[str, ...] = ("video", "audio", "speech")
MEDIA_TOKENS: dict[str, str] = {"video": "<video>", "audio": "<audio>", "speech": "<audio>"}

DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
_DIRECTION_STEP: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
VIDEO_FPS = 8

PITCHES: tuple[str, ...] = ("low", "high")
PITCH_HZ: dict[str, float] = {"low": 440.0, "high": 1760.0}

DIGITS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPEECH_VOICES: tuple[str, ...] = ("en-us", "en+m3", "en+f2", "en-us+m7")
"""Default voices of the speech task (train and, unless others are given, validation). Not `en`: espeak-ng
renders it byte for byte as `en-gb`, a held-out voice."""
HELD_OUT_VOICES: tuple[str, ...] = ("en-gb", "en+f4")
"""Voices disjoint from `SPEECH_VOICES`, for a held-out-voice validation split (`--val-voices en-gb,en+f4`)."""
SPEECH_SPEEDS: tuple[int, ...] = (130, 150, 170, 190)
"""Default speeds (words per minute) of the speech task."""
SPEECH_RATE = 22050  # espeak-ng's output rate

_DEFAULT_SECONDS = {"audio": 1.0, "speech": 2.0}


def _check_task(task: str) -> None:
    if task not in MEDIA_TASKS:
        raise ValueError(f"unknown media task {task!r}; known: {', '.join(MEDIA_TASKS)}")


def media_words(task: str) -> tuple[str, ...]:
    """Every word `task`'s captions can contain, each once, in a fixed order."""
    _check_task(task)
    words = {
        "video": ("a", *COLOURS, *SHAPES, "moves", *DIRECTIONS),
        "audio": (*COUNTS, *PITCHES, "beep", "beeps"),
        "speech": DIGITS,
    }[task]
    return tuple(dict.fromkeys(words))


# ----------------------------------------------------------------------------------------------------- video


def _video_frames(index: int, seed: int, frames: int, size: int) -> tuple[list[Image.Image], dict]:
    """The frames and ground truth of video sample `index` (a pure function of its arguments)."""
    if frames < 2:
        raise ValueError(f"frames must be >= 2 (the direction shows only across frames), got {frames}")
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    rng = random.Random(f"mmscale-video-{seed}-{index}")
    colour, shape, direction = rng.choice(COLOURS), rng.choice(SHAPES), rng.choice(DIRECTIONS)
    big = size * _SUPERSAMPLE
    # Start x and y are drawn from the same range whatever the direction, and the travel stays inside the frame
    # from any start: 0.36 - 0.24 - r >= 0 and 0.64 + 0.24 + r <= 1 with r <= 0.12.
    r = rng.uniform(0.09, 0.12) * big
    x0, y0 = rng.uniform(0.36, 0.64) * big, rng.uniform(0.36, 0.64) * big
    travel = rng.uniform(0.18, 0.24) * big
    dx, dy = _DIRECTION_STEP[direction]
    step = travel / (frames - 1)
    out = []
    for f in range(frames):
        img = Image.new("RGB", (big, big), _BACKGROUND)
        _draw_shape(ImageDraw.Draw(img), shape, x0 + dx * step * f, y0 + dy * step * f, r, _RGB[colour])
        out.append(img.resize((size, size), Image.Resampling.LANCZOS))
    truth = {"colour": colour, "shape": shape, "direction": direction, "frames": frames, "size": size}
    return out, truth


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _import_av():
    try:
        import av
    except ImportError as e:
        raise ImportError(
            "mp4 video needs PyAV, an optional dependency: pip install av (or write PNG frames: leave out --mp4)"
        ) from e
    return av


def encode_mp4(frames: Sequence[Image.Image], fps: int = VIDEO_FPS) -> bytes:
    """The RGB `frames` (even width and height) as an mp4 (mpeg4 or libx264, yuv420p) encoded with PyAV."""
    av = _import_av()
    w, h = frames[0].size
    if w % 2 or h % 2:
        raise ValueError(f"mp4 (yuv420p) needs an even frame size, got {w}x{h}")
    codec = next((c for c in ("mpeg4", "libx264") if c in av.codecs_available), None)
    if codec is None:
        raise RuntimeError("this PyAV build has neither the mpeg4 nor the libx264 encoder; write PNG frames instead")
    buf = io.BytesIO()
    # bitexact: no encoder version strings, so the same frames give the same bytes.
    with av.open(buf, mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.thread_count = 1
        if codec == "mpeg4":
            stream.options = {"qscale": "2", "flags": "+bitexact"}
        else:
            stream.options = {"crf": "12", "flags": "+bitexact"}
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_image(img.convert("RGB"))):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def make_video_sample(index: int, seed: int, frames: int = 8, size: int = 32, mp4: bool = False) -> dict:
    """Members of video sample `index`: `frame_000.png`, ... (or `mp4`), `txt`, `json` (ground truth)."""
    imgs, truth = _video_frames(index, seed, frames, size)
    caption = f"a {truth['colour']} {truth['shape']} moves {truth['direction']}"
    if mp4:
        members: dict = {"mp4": encode_mp4(imgs)}
    else:
        members = {f"frame_{f:03d}.png": _png(img) for f, img in enumerate(imgs)}
    members["txt"] = caption
    members["json"] = json.dumps(truth, sort_keys=True)
    return members


# ----------------------------------------------------------------------------------------------------- audio


def _wav_bytes(samples: np.ndarray, sample_rate: int) -> bytes:
    """Mono float samples in [-1, 1] as a 16-bit PCM wav."""
    pcm = np.clip(np.round(samples * 32767.0), -32768, 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def make_audio_sample(index: int, seed: int, seconds: float = 1.0, sample_rate: int = 16000) -> dict:
    """Members of audio sample `index`: `wav`, `txt`, `json` (ground truth: count, pitch, onsets...)."""
    if sample_rate < 4 * max(PITCH_HZ.values()):
        raise ValueError(f"sample_rate must be >= {4 * max(PITCH_HZ.values()):.0f} Hz, got {sample_rate}")
    if seconds < 0.4:
        raise ValueError(f"seconds must be >= 0.4 (four beeps must fit), got {seconds}")
    rng = random.Random(f"mmscale-audio-{seed}-{index}")
    count = rng.randint(1, len(COUNTS))
    pitch = rng.choice(PITCHES)
    freq = PITCH_HZ[pitch] * rng.uniform(0.97, 1.03)
    # Lengths in units of seconds / 4.5: four longest beeps and three longest gaps take 3.55 units (0.79 s of 1 s).
    unit = seconds / 4.5
    durations = [rng.uniform(0.35, 0.55) * unit for _ in range(count)]
    gaps = [rng.uniform(0.28, 0.45) * unit for _ in range(count - 1)]
    margin = 0.02 * seconds
    start = rng.uniform(margin, seconds - margin - sum(durations) - sum(gaps))
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    noise = np.random.default_rng(rng.getrandbits(64)).normal(0.0, 0.004, n)
    signal = noise
    onsets = []
    fade = 0.005
    at = start
    for i, dur in enumerate(durations):
        amp = rng.uniform(0.3, 0.6)
        phase = rng.uniform(0, 2 * math.pi)
        local = t - at
        inside = (local >= 0) & (local < dur)
        env = np.clip(np.minimum(local, dur - local) / fade, 0.0, 1.0)
        env = 0.5 - 0.5 * np.cos(np.pi * env)  # raised-cosine fades
        signal = signal + np.where(inside, amp * env * np.sin(2 * np.pi * freq * local + phase), 0.0)
        onsets.append(round(at, 6))
        at += dur + (gaps[i] if i < len(gaps) else 0.0)
    word = "beep" if count == 1 else "beeps"
    truth = {"count": count, "pitch": pitch, "frequency": round(freq, 3), "onsets": onsets,
             "durations": [round(d, 6) for d in durations]}
    return {"wav": _wav_bytes(signal, sample_rate), "txt": f"{COUNTS[count - 1]} {pitch} {word}",
            "json": json.dumps(truth, sort_keys=True)}


# ----------------------------------------------------------------------------------------------------- speech


def _espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise FileNotFoundError(
            "the speech task needs the espeak-ng binary on PATH: apt-get install espeak-ng (or brew install espeak-ng)"
        )
    return exe


def make_speech_sample(index: int, seed: int, voices: Sequence[str] = SPEECH_VOICES,
                       speeds: Sequence[int] = SPEECH_SPEEDS) -> dict:
    """Members of speech sample `index`: `wav` (espeak-ng's 22050 Hz), `txt` (the digit words), `json` ({"voice",
    "speed", "digits"}). The digits, the voice (from `voices`) and the speed (from `speeds`) depend only on
    (seed, index) and the lists."""
    voices, speeds = list(voices), [int(s) for s in speeds]
    if not voices or not speeds:
        raise ValueError("the speech task needs at least one voice and one speed")
    exe = _espeak()
    rng = random.Random(f"mmscale-speech-{seed}-{index}")
    digits = [rng.randrange(len(DIGITS)) for _ in range(rng.randint(1, 3))]
    voice, speed = rng.choice(voices), rng.choice(speeds)
    text = " ".join(DIGITS[d] for d in digits)
    with tempfile.TemporaryDirectory(prefix="mmscale-speech-") as tmp:
        path = Path(tmp) / "out.wav"
        proc = subprocess.run([exe, "-v", voice, "-s", str(speed), "-w", str(path), text],
                              capture_output=True, text=True)
        if proc.returncode != 0 or not path.is_file():
            raise RuntimeError(
                f"espeak-ng -v {voice} -s {speed} failed (exit {proc.returncode}): {proc.stderr.strip()}; check "
                f"the voice exists (espeak-ng --voices)"
            )
        with wave.open(str(path), "rb") as w:  # rewritten: a clean header, mono 16-bit at espeak's rate
            if w.getsampwidth() != 2 or w.getnchannels() != 1:
                raise RuntimeError(f"espeak-ng wrote {w.getnchannels()} channel(s) of {w.getsampwidth()} bytes")
            rate, pcm = w.getframerate(), w.readframes(w.getnframes())
    if not pcm or not np.frombuffer(pcm, "<i2").any():
        raise RuntimeError(f"espeak-ng -v {voice} wrote silence for {text!r}; check the voice (espeak-ng --voices)")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    truth = {"voice": voice, "speed": speed, "digits": digits}
    return {"wav": buf.getvalue(), "txt": text, "json": json.dumps(truth, sort_keys=True)}


def wav_seconds(wav_bytes: bytes) -> float:
    """Length of a wav in seconds."""
    with wave.open(io.BytesIO(wav_bytes), "rb") as w:
        return w.getnframes() / w.getframerate()


# ----------------------------------------------------------------------------------------------------- writing


def _csv(value: str | Sequence | None, cast=str) -> list | None:
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    out = [cast(str(v).strip()) for v in items if str(v).strip()]
    if not out:
        raise ValueError(f"empty list: {value!r}")
    return out


def write_media_demo(
    task: str,
    out: str | Path,
    num_samples: int,
    val_samples: int = 0,
    samples_per_shard: int = 500,
    seed: int = 0,
    frames: int = 8,
    size: int = 32,
    mp4: bool = False,
    seconds: float | None = None,
    sample_rate: int = 16000,
    voices: Sequence[str] | str | None = None,
    val_voices: Sequence[str] | str | None = None,
    speeds: Sequence[int] | str | None = None,
    val_speeds: Sequence[int] | str | None = None,
    tokenizer_vocab_size: int = 64,
) -> dict:
    """Write `task`'s train split (`num_samples`, samples 0..), its val split (`val_samples`, numbered after the
    train ones; none when 0) and a tokenizer into `out`. Earlier `train-*`/`val-*` shards in `out` are removed.

    `seconds`: the audio clip length (default 1.0), or for speech the length over which clips are counted in a
    warning (default 2.0). `voices`/`speeds` (lists or comma strings): the speech train split's; `val_voices`/
    `val_speeds`: the val split's (default: the train ones). Returns {"train": [shard paths], "val": [...],
    "sizes": path, "tokenizer": path}.
    """
    from mmscale.data.tokenizer import train_sentencepiece

    _check_task(task)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if val_samples < 0:
        raise ValueError(f"val_samples must be >= 0, got {val_samples}")
    if seconds is None:
        seconds = _DEFAULT_SECONDS.get(task, 1.0)
    if task == "video" and mp4:
        _import_av()
        if size % 2:
            raise ValueError(f"--mp4 needs an even --size (yuv420p), got {size}")
    voices = _csv(voices) or list(SPEECH_VOICES)
    speeds = _csv(speeds, int) or list(SPEECH_SPEEDS)
    val_voices = _csv(val_voices) or voices
    val_speeds = _csv(val_speeds, int) or speeds
    if task == "speech":
        _espeak()

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    captions: list[str] = []
    too_long = {"n": 0, "of": 0}

    def sample(i: int, split: str) -> dict:
        if task == "video":
            return make_video_sample(i, seed, frames, size, mp4)
        if task == "audio":
            return make_audio_sample(i, seed, seconds, sample_rate)
        s = make_speech_sample(i, seed, *((voices, speeds) if split == "train" else (val_voices, val_speeds)))
        too_long["of"] += 1
        too_long["n"] += wav_seconds(s["wav"]) > seconds
        return s

    def samples(split: str, first: int, n: int):
        for i in range(first, first + n):
            members = sample(i, split)
            captions.append(members["txt"])
            yield {"__key__": f"{split}{i:09d}", **members}

    result: dict = {"train": [], "val": []}
    for split, first, n in (("train", 0, num_samples), ("val", num_samples, val_samples)):
        remove_shards(out, split)
        if n == 0:
            continue
        sizes = write_tar_shards(samples(split, first, n), out, samples_per_shard, prefix=split)
        for name, count in sizes.items():
            print(f"wrote {out / name} ({count} {task} samples)")
            result[split].append(out / name)
    result["sizes"] = out / SIZES_FILE
    print(f"wrote {result['sizes']}")
    if task == "speech" and too_long["n"] > 0.05 * too_long["of"]:
        print(f"warning: {too_long['n']} of {too_long['of']} speech clips are longer than {seconds:g} s (the trainer "
              f"cuts them); raise --seconds or use faster --speeds", file=sys.stderr)
    words = media_words(task)
    result["tokenizer"] = train_sentencepiece([*captions, *words], out / "tokenizer", tokenizer_vocab_size,
                                              extra_symbols=(MEDIA_TOKENS[task],))
    print(f"wrote {result['tokenizer']}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a media demo dataset (video, audio or speech) as WebDataset shards plus a tokenizer."
    )
    parser.add_argument("--task", choices=MEDIA_TASKS, required=True, help="see the module doc")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-samples", type=int, required=True, help="train samples")
    parser.add_argument("--val-samples", type=int, default=0, help="validation samples (numbered after train)")
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    video = parser.add_argument_group("video")
    video.add_argument("--frames", type=int, default=8)
    video.add_argument("--size", type=int, default=32, help="frame width and height in pixels")
    video.add_argument("--mp4", action="store_true", help="one mp4 member instead of PNG frames (pip install av)")
    audio = parser.add_argument_group("audio and speech")
    audio.add_argument("--seconds", type=float, default=None,
                       help="audio: clip length (default 1.0); speech: warn when many clips are longer (default 2.0)")
    audio.add_argument("--sample-rate", type=int, default=16000, help="audio only (speech keeps espeak's 22050)")
    speech = parser.add_argument_group("speech")
    speech.add_argument("--voices", default=",".join(SPEECH_VOICES), help="comma list of espeak-ng voices (train)")
    speech.add_argument("--val-voices", default=None, help="comma list for validation (default: --voices)")
    speech.add_argument("--speeds", default=",".join(map(str, SPEECH_SPEEDS)),
                        help="comma list of words per minute (train)")
    speech.add_argument("--val-speeds", default=None, help="comma list for validation (default: --speeds)")
    parser.add_argument("--tokenizer-vocab-size", type=int, default=64)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        write_media_demo(
            args.task, args.out, args.num_samples, args.val_samples, args.samples_per_shard, args.seed,
            frames=args.frames, size=args.size, mp4=args.mp4, seconds=args.seconds, sample_rate=args.sample_rate,
            voices=args.voices, val_voices=args.val_voices, speeds=args.speeds, val_speeds=args.val_speeds,
            tokenizer_vocab_size=args.tokenizer_vocab_size,
        )
    except (ImportError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
