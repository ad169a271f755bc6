"""Samples to a batch: pad images into slots, pad tokens to a fixed length, derive labels and the media index.

A sample (as the pipeline's tokenize stage leaves it)::

    {"__key__": str, "images": [Tensor (3, H, W), ...], "input_ids": [int, ...]}   # <image> tokens in the ids

The batch (every tensor shape is static, so every step compiles/allocates the same)::

    pixel_values    float32 (B, M, 3, H, W)  normalised; empty slots are zeros        M = max_images
    image_mask      bool    (B, M)           True where a slot holds a real image
    input_ids       int64   (B, L)           padded with pad_id                       L = seq_len
    attention_mask  int64   (B, L)           1 on real tokens
    labels          int64   (B, L)           input_ids, -100 on padding and on <image> tokens
    media_index     int64   (B, L)           media slot of the latest placeholder at or before token t, -1 before
                                             the first (images alone: the latest image's slot)
    {name}_values   float32 (B, Mk, ...)     each other medium's items (mmscale.media: video, audio)   Mk = max_items
    {name}_mask     bool    (B, Mk)
    {name}_slot     int64   (B, Mk)          with other media, every medium's (images' too, `image_slot`): the
                                             media slot of each item, placeholders numbered in text order; -1: none
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


def media_index_from_ids(input_ids: torch.Tensor, image_token_id: int | Sequence[int],
                         num_images: torch.Tensor) -> torch.Tensor:
    """(B, L) slot of the latest media placeholder (`<image>`, or any id of `image_token_id` when it is a list: every
    medium's) at or before each position; -1 before the first.

    Clamped to `num_images - 1` per row (B,) (the sample's real items of every medium), so a placeholder without an
    item behind it (e.g. one typed into a caption) points at the last real item, and a row without media is -1
    throughout.
    """
    ids = [image_token_id] if isinstance(image_token_id, int) else list(image_token_id)
    marks = torch.zeros_like(input_ids, dtype=torch.bool)
    for i in ids:
        marks |= input_ids == i
    index = torch.cumsum(marks, dim=1) - 1  # (B, L)
    return torch.minimum(index, (num_images - 1).unsqueeze(1))


def collate_samples(
    samples: Sequence[dict[str, Any]],
    *,
    pad_id: int,
    image_token_id: int,
    max_images: int,
    seq_len: int,
    media: Sequence[Any] = (),
    image_shape: tuple[int, int, int] | None = None,
) -> dict[str, Any]:
    """`media`: the other media (mmscale.media, bound): each adds its `{name}_values` and `{name}_mask`, and every
    medium (images too) its `{name}_slot`, the media slot of each item, numbered in the order of the placeholders
    in the text (-1 on padding). `image_shape`: (3, S, S), for a batch in which no sample has an image (else read
    from the first image)."""
    if not samples:
        raise ValueError("collate: no samples")
    shape = image_shape or next((tuple(s["images"][0].shape) for s in samples if s["images"]), None)
    if shape is None:
        raise ValueError("collate: no sample has an image; pass image_shape (3, S, S) for the empty image slots")
    c, h, w = shape
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
    marks = [image_token_id, *(m.token_id for m in media)]
    placeholder = torch.zeros_like(input_ids, dtype=torch.bool)
    for t in marks:
        placeholder |= input_ids == t
    labels = input_ids.masked_fill((attention_mask == 0) | placeholder, IGNORE_INDEX)
    num_media = image_mask.sum(dim=1)
    extra: dict[str, torch.Tensor] = {}
    if media:
        extra, counts = _media_slots(samples, input_ids, image_token_id, max_images, media)
        num_media = counts
    media_index = media_index_from_ids(input_ids, marks if media else image_token_id, num_media)
    return {
        "pixel_values": pixel_values,
        "image_mask": image_mask,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "media_index": media_index,
        **extra,
        # the `.cls` label of each sample, IGNORE_INDEX without one
        "class_labels": torch.tensor([s.get("class_label", IGNORE_INDEX) for s in samples], dtype=torch.int64),
        "num_skipped": torch.tensor(0, dtype=torch.int64),
        "__key__": [s["__key__"] for s in samples],
        **({"__raw__": [s["raw"] for s in samples]} if all("raw" in s for s in samples) else {}),
    }


def _media_slots(samples: Sequence[dict[str, Any]], input_ids: torch.Tensor, image_token_id: int, max_images: int,
                 media: Sequence[Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every medium's values, mask and slots, and the number of real items per sample (B,). The j-th item of a
    medium is its j-th placeholder in the text, and its slot is that placeholder's rank among all placeholders."""
    b = len(samples)
    kinds = [("image", image_token_id, max_images, "images")] + [(m.name, m.token_id, m.max_items, m.sample_key)
                                                                  for m in media]
    out: dict[str, torch.Tensor] = {}
    for m in media:
        out[m.values_key] = torch.zeros(b, m.max_items, *m.item_shape(), dtype=torch.float32)
        out[m.mask_key] = torch.zeros(b, m.max_items, dtype=torch.bool)
    slots = {name: torch.full((b, k), -1, dtype=torch.int64) for name, _, k, _ in kinds}
    counts = torch.zeros(b, dtype=torch.int64)
    by_id = {tid: name for name, tid, _, _ in kinds}
    for i, s in enumerate(samples):
        order = [by_id[t] for t in input_ids[i].tolist() if t in by_id]  # placeholders' kinds, in text order
        seen = {name: 0 for name, *_ in kinds}
        for rank, name in enumerate(order):
            j = seen[name]
            seen[name] += 1
            if j < slots[name].shape[1]:
                slots[name][i, j] = rank
        for m in media:
            items = s.get(m.sample_key, ())
            if len(items) > m.max_items:
                raise ValueError(f"sample {s['__key__']!r}: {len(items)} {m.name} items > media.{m.name}.max_items "
                                 f"({m.max_items})")
            for j, x in enumerate(items):
                if tuple(x.shape) != m.item_shape():
                    raise ValueError(f"sample {s['__key__']!r}: {m.name} item {j} has shape {tuple(x.shape)}, "
                                     f"expected {m.item_shape()}")
                out[m.values_key][i, j] = x
            out[m.mask_key][i, : len(items)] = True
        for name, _, _, key in kinds:
            n_items = len(s.get(key, ()))
            if seen[name] < n_items:
                raise ValueError(f"sample {s['__key__']!r}: {n_items} {name} item(s) but {seen[name]} placeholder(s) "
                                 f"in its text: each item needs its placeholder")
        counts[i] = sum(len(s.get(key, ())) for *_, key in kinds)
    for name, *_ in kinds:
        out[f"{name}_slot"] = slots[name]
    return out, counts
