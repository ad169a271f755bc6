"""Audio and speech: a waveform through an audio encoder, then the shared resampler.

    media:
      audio: {max_items: 1, seconds: 1.0, sample_rate: 16000, encoder: conv, config: {hidden_size: 64}}

A sample's clip is a `wav` or `flac` member, read with soundfile (`pip install soundfile`, the `audio` extra; a
16-bit PCM `wav` also reads without it), mixed down to mono, resampled to `sample_rate` (linear interpolation:
the demo's sounds and speech have little energy near the new Nyquist frequency; resample beforehand where that
matters) and cut or zero-padded to `seconds`: item shape (seconds * sample_rate,). Bytes that do not decode are
skipped and counted (`undecodable_media`).

Encoders (`encoder`), both on Whisper's log-mel features (transformers' WhisperFeatureExtractor's mel filters and
scaling, computed in the model, on the device):
- `conv`: a small 1-D conv stack over the log-mel frames (stride 2 per layer after the first), for the demo;
- `whisper`: a Hugging Face Whisper encoder from `config` (WhisperConfig keys) or the local `path` (a saved
  WhisperModel or WhisperForConditionalGeneration; its encoder is kept). Whisper wants exactly
  2 * max_source_positions mel frames (10 ms each): `seconds` must match (30 s for released checkpoints).
Either ends in a linear map to the media width (the vision tower's) when its own width differs.
"""

from __future__ import annotations

import dataclasses
import io
import wave
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from mmscale.data.reading import UNDECODABLE_MEDIA, SampleError
from mmscale.media.base import Medium, MediumSection, register_medium

AUDIO_EXTS = ("wav", "flac")
ENCODERS = ("conv", "whisper")
HOP_SECONDS = 0.01  # Whisper's 10 ms mel frames (hop 160 at 16 kHz) and 25 ms windows
WINDOW_SECONDS = 0.025


@dataclasses.dataclass
class AudioSection(MediumSection):
    seconds: float = 1.0
    """Every clip is cut or zero-padded to this many seconds."""
    sample_rate: int = 16000
    """Clips are resampled to this rate (Hz) before the encoder."""
    encoder: str = "conv"
    """`conv` (a small conv stack, for the demo) or `whisper` (a Hugging Face Whisper encoder)."""
    path: str = ""
    """`whisper`: a local saved Whisper model (its encoder is used). Empty = build from `config`."""
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    """`conv`: {hidden_size: 64, layers: 3, n_mels: 40}; `whisper` (without `path`): WhisperConfig keys, e.g.
    {d_model: 64, encoder_layers: 2, encoder_attention_heads: 4, num_mel_bins: 40, max_source_positions: 50}."""
    train: bool = True
    """Train the audio encoder (False = frozen). Its map to the media width always trains."""


def read_audio(data: bytes, where: str) -> tuple[np.ndarray, int]:
    """(mono float32 samples, rate) of a wav/flac member; SampleError(undecodable_media) when it does not decode."""
    try:
        import soundfile
    except ImportError:
        soundfile = None
    try:
        if soundfile is not None:
            x, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
            return x.mean(axis=1), int(rate)
        with wave.open(io.BytesIO(data)) as w:  # 16-bit PCM wav without soundfile
            if w.getsampwidth() != 2:
                raise ValueError(f"{8 * w.getsampwidth()}-bit wav needs soundfile (pip install soundfile)")
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
            return pcm.reshape(-1, w.getnchannels()).mean(axis=1), w.getframerate()
    except Exception as e:  # soundfile's LibsndfileError, wave.Error, EOFError...
        hint = "" if soundfile is not None else " (flac and non-PCM wav need soundfile: pip install soundfile)"
        raise SampleError(f"{where}: undecodable audio: {e!r}"[:300] + hint, UNDECODABLE_MEDIA) from None


def fit_clip(x: np.ndarray, rate: int, sample_rate: int, seconds: float) -> np.ndarray:
    """`x` resampled from `rate` to `sample_rate` (linear interpolation) and cut or zero-padded to `seconds`."""
    if rate != sample_rate and len(x) > 1:
        n = max(1, round(len(x) * sample_rate / rate))
        x = np.interp(np.arange(n) * (rate / sample_rate), np.arange(len(x)), x).astype(np.float32)
    want = round(seconds * sample_rate)
    out = np.zeros(want, dtype=np.float32)
    out[: min(want, len(x))] = x[:want]
    return out


class LogMel(nn.Module):
    """(R, S) waveforms -> (R, n_mels, S // hop) log-mel features, as Whisper's feature extractor computes them
    (its mel filters; log10, floored 8 below each clip's maximum, (x + 4) / 4). Buffers only, nothing trains."""

    def __init__(self, sample_rate: int, n_mels: int):
        super().__init__()
        from transformers import WhisperFeatureExtractor

        self.n_fft, self.hop = round(WINDOW_SECONDS * sample_rate), round(HOP_SECONDS * sample_rate)
        fe = WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=sample_rate, hop_length=self.hop,
                                     n_fft=self.n_fft)
        self.register_buffer("mel_filters", torch.from_numpy(fe.mel_filters.T.astype(np.float32)), persistent=False)
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        x = wave.float()  # stft in fp32 whatever the model's dtype
        stft = torch.stft(x, self.n_fft, self.hop, window=self.window.float(), return_complex=True)
        power = (stft[..., :-1].abs() ** 2).contiguous()  # (R, F, frames)
        mel = self.mel_filters.float() @ power  # (R, n_mels, frames)
        log = mel.clamp(min=1e-10).log10()
        log = torch.maximum(log, log.amax(dim=(1, 2), keepdim=True) - 8.0)
        return (log + 4.0) / 4.0


class ConvAudioTower(nn.Module):
    """Log-mel frames -> a conv stack (stride 2 after the first layer) -> (R, P, hidden_size) tokens."""

    def __init__(self, sample_rate: int, hidden_size: int = 64, layers: int = 3, n_mels: int = 40):
        super().__init__()
        self.features = LogMel(sample_rate, n_mels)
        convs: list[nn.Module] = [nn.Conv1d(n_mels, hidden_size, 3, padding=1), nn.GELU()]
        for _ in range(layers - 1):
            convs += [nn.Conv1d(hidden_size, hidden_size, 3, stride=2, padding=1), nn.GELU()]
        self.convs = nn.Sequential(*convs)
        self.norm = nn.LayerNorm(hidden_size)
        self.hidden_size = hidden_size

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        feats = self.features(wave).to(self.convs[0].weight.dtype)
        return self.norm(self.convs(feats).transpose(1, 2))


class WhisperTower(nn.Module):
    """A Hugging Face Whisper encoder on the log-mel features: (R, S) -> (R, frames / 2, d_model)."""

    def __init__(self, sample_rate: int, encoder: nn.Module):
        super().__init__()
        self.features = LogMel(sample_rate, encoder.config.num_mel_bins)
        self.encoder = encoder
        self.hidden_size = encoder.config.d_model

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        feats = self.features(wave).to(self.encoder.conv1.weight.dtype)
        return self.encoder(input_features=feats).last_hidden_state


class AudioEncoder(nn.Module):
    """(R, S) clips -> (R, P, media width): the tower, then a linear map when the widths differ."""

    def __init__(self, tower: nn.Module, media_width: int):
        super().__init__()
        self.tower = tower
        self.proj = nn.Linear(tower.hidden_size, media_width) if tower.hidden_size != media_width else nn.Identity()

    def forward(self, values: torch.Tensor, vision: nn.Module) -> torch.Tensor:
        return self.proj(self.tower(values))


def whisper_encoder(section: AudioSection) -> nn.Module:
    from transformers import WhisperConfig, WhisperModel
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    if section.path:
        return WhisperModel.from_pretrained(section.path).get_encoder()
    return WhisperEncoder._from_config(WhisperConfig(**section.config))


@register_medium
class Audio(Medium):
    name = "audio"
    token = "<audio>"
    sample_key = "audio"
    members = "a wav or flac member"
    Section = AudioSection

    def item_shape(self) -> tuple[int, ...]:
        return (round(self.section.seconds * self.section.sample_rate),)

    @classmethod
    def claims(cls, member: str) -> bool:
        return member in AUDIO_EXTS

    def decode(self, raw: Mapping[str, Any], where: str) -> list[torch.Tensor]:
        data = next(raw[e] for e in AUDIO_EXTS if e in raw)
        x, rate = read_audio(data, where)
        if len(x) == 0:
            raise SampleError(f"{where}: audio with no samples", UNDECODABLE_MEDIA)
        s = self.section
        return [torch.from_numpy(fit_clip(x, rate, s.sample_rate, s.seconds))]

    @classmethod
    def build_encoder(cls, section: AudioSection, model_cfg: Any, media_width: int) -> nn.Module:
        if section.encoder == "whisper":
            tower: nn.Module = WhisperTower(section.sample_rate, whisper_encoder(section))
        else:
            tower = ConvAudioTower(section.sample_rate, **section.config)
        return AudioEncoder(tower, media_width)

    @classmethod
    def train_encoder(cls, section: AudioSection) -> bool:
        return bool(section.train)

    @classmethod
    def config_problems(cls, section: AudioSection, cfg: Any) -> list[str]:
        p = []
        if section.encoder not in ENCODERS:
            p.append(f"encoder: {section.encoder!r} is not one of {', '.join(map(repr, ENCODERS))}")
        if not (isinstance(section.sample_rate, int) and section.sample_rate >= 1000):
            p.append(f"sample_rate: {section.sample_rate!r} must be an integer >= 1000 (Hz)")
            return p
        if not (isinstance(section.seconds, (int, float)) and section.seconds > 0):
            p.append(f"seconds: {section.seconds!r} must be > 0")
            return p
        if section.encoder == "conv":
            allowed = {"hidden_size", "layers", "n_mels"}
            extra = sorted(set(section.config) - allowed)
            if extra:
                p.append(f"config: unknown key(s) {extra} for the conv encoder; it takes {sorted(allowed)}")
            if section.path:
                p.append(f"path: {section.path!r} is for encoder: whisper; the conv encoder is built from config")
        elif section.encoder == "whisper":
            frames = round(section.seconds / HOP_SECONDS)
            positions = section.config.get("max_source_positions")
            if section.path:
                from pathlib import Path

                cfg_file = Path(section.path) / "config.json"
                if not cfg_file.is_file():
                    p.append(f"path: {section.path!r} holds no config.json (a saved Whisper model's folder)")
                    return p
                import json

                positions = json.loads(cfg_file.read_text()).get("max_source_positions", 1500)
            elif positions is None:
                positions = 1500
            if 2 * positions != frames:
                p.append(f"seconds: {section.seconds} s gives {frames} mel frames, but this Whisper encoder takes "
                         f"exactly 2 * max_source_positions = {2 * positions}: set media.audio.seconds="
                         f"{2 * positions * HOP_SECONDS:g}")
        return p
