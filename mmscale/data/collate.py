"""Samples to a batch: pad images into slots, pad tokens to a fixed length, derive labels and the media index.

A sample (as the pipeline's tokenize stage leaves it)::

    {"__key__": str, "images": [Tensor (3, H, W), ...], "input_ids": [int, ...]}   # <image> tokens in the ids

The batch (every tensor shape is static, so every step compiles/allocates the same)::

    pixel_values    float32 (B, M, 3, H, W)  normalised; empty slots are zeros        M = max_images
    image_mask      bool    (B, M)           True where a slot holds a real image
    input_ids       int64   (B, L)           padded with pad_id                       L = seq_len
    attention_mask  int64   (B, L)           1 on real tokens
    labels          int64   (B, L)           input_ids, -100 on padding and on <image> tokens
    media_index     int64   (B, L)           slot of the latest image at or before token t, -1 before the first
    num_skipped     int64   ()               filled in by the pipeline
    __key__         list[str]
    __raw__         list[dict]           training batches: each sample's raw members (image bytes, caption, label)

The model shifts internally: position t predicts labels[:, t + 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

IGNORE_INDEX = -100


def media_index_from_ids(input_ids: torch.Tensor, image_token_id: int, num_images: torch.Tensor) -> torch.Tensor:
    """(B, L) slot of the latest `<image>` token at or before each position; -1 before the first.

    Clamped to `num_images - 1` per row (B,), so an `<image>` token without a real image behind it (e.g. one typed
    into a caption) points at the last real image, and a row without images is -1 throughout.
    """
    index = torch.cumsum(input_ids == image_token_id, dim=1) - 1  # (B, L)
    return torch.minimum(index, (num_images - 1).unsqueeze(1))


def collate_samples(
    samples: Sequence[dict[str, Any]],
    *,
    pad_id: int,
    image_token_id: int,
    max_images: int,
    seq_len: int,
) -> dict[str, Any]:
    if not samples:
        raise ValueError("collate: no samples")
    c, h, w = samples[0]["images"][0].shape
    b = len(samples)
    pixel_values = torch.zeros(b, max_images, c, h, w, dtype=torch.float32)
    image_mask = torch.zeros(b, max_images, dtype=torch.bool)
    input_ids = torch.full((b, seq_len), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros(b, seq_len, dtype=torch.int64)
    for i, s in enumerate(samples):
        images, ids = s["images"], s["input_ids"]
        if len(images) > max_images:
            raise ValueError(f"sample {s['__key__']!r}: {len(images)} images > max_images ({max_images})")
        if len(ids) > seq_len:
            raise ValueError(f"sample {s['__key__']!r}: {len(ids)} tokens > seq_len ({seq_len})")
        for j, img in enumerate(images):
            if img.shape != (c, h, w):
                raise ValueError(
                    f"sample {s['__key__']!r}: image {j} has shape {tuple(img.shape)}, expected {(c, h, w)}"
                )
            pixel_values[i, j] = img
        image_mask[i, : len(images)] = True
        input_ids[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.int64)
        attention_mask[i, : len(ids)] = 1
    labels = input_ids.masked_fill((attention_mask == 0) | (input_ids == image_token_id), IGNORE_INDEX)
    media_index = media_index_from_ids(input_ids, image_token_id, image_mask.sum(dim=1))
    return {
        "pixel_values": pixel_values,
        "image_mask": image_mask,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "media_index": media_index,
        # the `.cls` label of each sample, IGNORE_INDEX without one
        "class_labels": torch.tensor([s.get("class_label", IGNORE_INDEX) for s in samples], dtype=torch.int64),
        "num_skipped": torch.tensor(0, dtype=torch.int64),
        "__key__": [s["__key__"] for s in samples],
        **({"__raw__": [s["raw"] for s in samples]} if all("raw" in s for s in samples) else {}),
    }
