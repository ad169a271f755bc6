"""Stages 6-7 of the data's trip: a raw sample -> pixels and tokens (one sample at a time, inside a worker)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmscale.config import DataConfig
from mmscale.data.collate import IGNORE_INDEX
from mmscale.data.reading import SampleError
from mmscale.data.shards import IMAGE_EXTS
from mmscale.data.tokenizer import Tokenizer



def image_to_tensor(img: Image.Image, image_size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(3, S, S) float32: RGB, shorter side resized to S (bicubic), centre crop, (x / 255 - mean) / std."""
    img = img.convert("RGB")
    w, h = img.size
    scale = image_size / min(w, h)
    nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - image_size) // 2, (nh - image_size) // 2
    img = img.crop((left, top, left + image_size, top + image_size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1).div_(255.0)  # (3, S, S)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return x.sub_(m).div_(s)


def decode_sample(raw: dict[str, Any], image_size: int, mean: Sequence[float], std: Sequence[float]) -> dict[str, Any]:
    """Raw tar sample -> {"__key__", "images": [(3, S, S)], "caption": str, "class_label": int}; raises SampleError
    if unusable. `class_label` is the `.cls` member (an integer, as webdataset writes it), -100 without one; a
    sample with a label may have no caption (classification data)."""
    key = raw.get("__key__", "?")
    where = f"{key} in {raw.get('__url__', '?')}"
    label = IGNORE_INDEX
    if raw.get("cls") is not None:
        text = raw["cls"].decode("utf-8", errors="replace") if isinstance(raw["cls"], bytes) else str(raw["cls"])
        try:
            label = int(text.strip())
        except ValueError:
            raise SampleError(f"{where}: class label (.cls member) {text[:20]!r} is not an integer") from None
        if label < 0:
            raise SampleError(f"{where}: class label (.cls member) {label} is negative")
    caption = raw.get("txt")
    if caption is None and label == IGNORE_INDEX:
        raise SampleError(f"{where}: no caption (.txt member) and no class label (.cls member)")
    caption = "" if caption is None else caption
    caption = caption.decode("utf-8", errors="replace").strip() if isinstance(caption, bytes) else str(caption)
    if not caption and label == IGNORE_INDEX:
        raise SampleError(f"{where}: empty caption")
    data = next((raw[e] for e in IMAGE_EXTS if e in raw), None)
    if data is None:
        raise SampleError(f"{where}: no image member (one of {', '.join(IMAGE_EXTS)})")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decode now: a truncated or corrupt file raises here, not later
            pixels = image_to_tensor(img, image_size, mean, std)
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError...)
        raise SampleError(f"{where}: undecodable image: {e!r}") from None
    return {"__key__": key, "images": [pixels], "caption": caption, "class_label": label}


RAW_MEMBERS = ("txt", "cls", *IMAGE_EXTS)
"""The members a training batch passes on as `__raw__` (what a sample is made of, for a replay buffer)."""


def raw_members(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw`'s key and the members that make the sample (caption, label, image bytes), nothing decoded."""
    return {"__key__": raw.get("__key__", "?"), **{k: raw[k] for k in RAW_MEMBERS if k in raw}}


def decode_for_training(raw: dict[str, Any], cfg: DataConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """Stages 6-7 for one raw sample, as the training stream does them (a replayed sample goes through these)."""
    s = decode_sample(raw, cfg.image_size, cfg.image_mean, cfg.image_std)
    s["input_ids"] = caption_to_ids(s.pop("caption"), tokenizer, cfg.max_text_len)
    return s


def caption_to_ids(caption: str, tokenizer: Tokenizer, max_text_len: int) -> list[int]:
    """[<image>] + caption tokens + [eos]: at most 1 + max_text_len ids (the caption is truncated, eos kept)."""
    return [tokenizer.image_token_id] + tokenizer.encode(caption)[: max_text_len - 1] + [tokenizer.eos_id]
