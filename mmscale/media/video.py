"""Video: a clip's frames through the image tower, a learned time embedding per frame, then the shared resampler
(Flamingo, Alayrac et al. 2022, section 2.1: the resampler attends to every frame's patches at once).

    media:
      video: {max_items: 1, frames: 8}

A sample's clip is either numbered frame members (`frame_000.png`, `frame_001.jpg`, ... in number order) or one
video file (`mp4`, `webm`, `mkv`, `avi`, `mov`) decoded with PyAV (`pip install av`, the `video` extra). Its frames
are sampled uniformly to `frames` (repeating frames of a shorter clip), each decoded as an image is (RGB, shorter
side resized to `data.image_size`, centre crop, normalised): item shape (frames, 3, S, S). A clip with fewer than
`min_frames` decodable frames, or bytes that do not decode, is skipped and counted (`undecodable_media`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from mmscale.data.decode import image_to_tensor, load_image
from mmscale.data.reading import UNDECODABLE_MEDIA, SampleError
from mmscale.media.base import Medium, MediumSection, register_medium

FRAME_MEMBER = re.compile(r"^frame_(\d+)\.(png|jpg|jpeg|webp|bmp)$")
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")


@dataclasses.dataclass
class VideoSection(MediumSection):
    frames: int = 8
    """Frames per clip: a clip's frames are sampled uniformly to this many; each gets its own learned time
    embedding (part of the model: fixed once a run starts)."""
    min_frames: int = 2
    """A clip with fewer decodable frames is skipped and counted as `undecodable_media` (1: still images pass)."""
    max_decoded_frames: int = 1024
    """A video file's frames decoded at most (the first this many): a long clip cannot exhaust a worker's memory."""


def sample_indices(available: int, wanted: int) -> list[int]:
    """`wanted` frame indices spread uniformly over `available` frames (first and last included; a shorter clip's
    frames repeat)."""
    if wanted == 1:
        return [available // 2]
    return [int(round(x)) for x in np.linspace(0, available - 1, wanted)]


class VideoEncoder(nn.Module):
    """(R, T, 3, H, W) clips -> (R, T*P, D) resampler inputs: every frame through the vision tower, plus the learned
    embedding of its time step."""

    def __init__(self, frames: int, width: int):
        super().__init__()
        self.time_embed = nn.Parameter(torch.randn(frames, width) * 0.02)

    def forward(self, values: torch.Tensor, vision: nn.Module) -> torch.Tensor:
        R, T = values.shape[:2]
        frozen = not any(p.requires_grad for p in vision.parameters())
        with torch.no_grad() if frozen else contextlib.nullcontext():
            feats = vision.encode_images(values.flatten(0, 1))  # (R*T, P, D)
        feats = feats.unflatten(0, (R, T)) + self.time_embed[:T, None, :].to(feats.dtype)  # (R, T, P, D)
        return feats.flatten(1, 2)


@register_medium
class Video(Medium):
    name = "video"
    token = "<video>"
    sample_key = "videos"
    members = "frame_NNN.png/jpg members or one " + "/".join(VIDEO_EXTS) + " member"
    Section = VideoSection

    def item_shape(self) -> tuple[int, ...]:
        s = self.data.image_size
        return (self.section.frames, 3, s, s)

    @classmethod
    def claims(cls, member: str) -> bool:
        return member in VIDEO_EXTS or FRAME_MEMBER.match(member) is not None

    def _frames(self, raw: Mapping[str, Any], where: str) -> list:
        d = self.data
        numbered = sorted((int(m.group(1)), k) for k in raw if (m := FRAME_MEMBER.match(k)))
        if numbered:
            try:
                return [load_image(raw[k], d.max_image_pixels) for _, k in numbered]
            except SampleError as e:
                raise SampleError(f"{where}: video frame: {e}", UNDECODABLE_MEDIA) from None
        data = next(raw[e] for e in VIDEO_EXTS if e in raw)
        try:
            import av
        except ImportError:
            raise SampleError(f"{where}: a video file member needs PyAV to decode: pip install av (or "
                              "mmscale[video])", UNDECODABLE_MEDIA) from None
        frames = []
        try:
            with av.open(io.BytesIO(data)) as container:
                for frame in container.decode(video=0):
                    img = frame.to_image()
                    if img.width * img.height > d.max_image_pixels:
                        raise SampleError(f"{where}: video frames of {img.width}x{img.height} pixels exceed "
                                          f"data.max_image_pixels ({d.max_image_pixels})", UNDECODABLE_MEDIA)
                    frames.append(img)
                    if len(frames) >= self.section.max_decoded_frames:
                        break
        except SampleError:
            raise
        except Exception as e:  # PyAV raises its own error types for corrupt or unknown containers
            raise SampleError(f"{where}: undecodable video: {e!r}"[:300], UNDECODABLE_MEDIA) from None
        return frames

    def decode(self, raw: Mapping[str, Any], where: str) -> list[torch.Tensor]:
        frames = self._frames(raw, where)
        if len(frames) < self.section.min_frames:
            raise SampleError(f"{where}: video with {len(frames)} frame(s), fewer than media.video.min_frames "
                              f"({self.section.min_frames})", UNDECODABLE_MEDIA)
        d = self.data
        picked = [image_to_tensor(frames[i], d.image_size, d.image_mean, d.image_std)
                  for i in sample_indices(len(frames), self.section.frames)]
        return [torch.stack(picked)]  # (T, 3, S, S)

    @classmethod
    def build_encoder(cls, section: VideoSection, model_cfg: Any, media_width: int) -> nn.Module:
        return VideoEncoder(section.frames, media_width)

    @classmethod
    def config_problems(cls, section: VideoSection, cfg: Any) -> list[str]:
        p = []
        if not (isinstance(section.frames, int) and section.frames >= 1):
            p.append(f"frames: {section.frames!r} must be an integer >= 1")
        elif not (isinstance(section.min_frames, int) and 1 <= section.min_frames):
            p.append(f"min_frames: {section.min_frames!r} must be an integer >= 1")
        if isinstance(section.max_decoded_frames, int) and section.max_decoded_frames < 1:
            p.append(f"max_decoded_frames: {section.max_decoded_frames} must be >= 1")
        return p
