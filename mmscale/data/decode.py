"""Stages 6-7 of the data's trip: a raw sample -> pixels and tokens (one sample at a time, inside a worker).

Images: `load_image` opens every format PIL opens and returns what a user sees, in RGB: the EXIF orientation
applied, transparency composited on white, 16-bit greys scaled (not clipped) to 8 bits, CMYK converted; an image
over `data.max_image_pixels` is refused from its header, before its pixels are decoded. Every unusable sample raises
a SampleError with its kind (mmscale.data.reading), which the stream counts and skips.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from mmscale.config import DataConfig
from mmscale.data.collate import IGNORE_INDEX
from mmscale.data.reading import (
    BAD_ENCODING, BAD_LABEL, EMPTY_CAPTION, IMAGE_TOO_LARGE, MISSING_CAPTION, MISSING_IMAGE, UNDECODABLE_IMAGE,
    SampleError, refuse_oversized,
)
from mmscale.data.shards import IMAGE_EXTS
from mmscale.data.tokenizer import Tokenizer

DEFAULT_MAX_PIXELS = DataConfig().max_image_pixels
_EXIF_ORIENTATION = 0x0112
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def load_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image in `data` (any format PIL opens), decoded, as `to_rgb` makes it; raises SampleError of kind
    IMAGE_TOO_LARGE when it has more than `max_pixels` pixels (`data.max_image_pixels`; checked from the header,
    before decoding) and UNDECODABLE_IMAGE when PIL cannot open or decode it."""
    try:
        with warnings.catch_warnings():
            # PIL warns from its own global limit (Image.MAX_IMAGE_PIXELS); `max_pixels` decides, just below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # over twice PIL's global limit: PIL refuses before we can look
        raise SampleError(f"image too large: {e}", IMAGE_TOO_LARGE) from None
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, SyntaxError, ValueError...)
        raise SampleError(f"undecodable image: {e!r}"[:300], UNDECODABLE_IMAGE) from None
    with img:
        w, h = img.size
        if w * h > max_pixels:
            raise SampleError(
                f"image too large: {w}x{h} = {w * h} pixels > data.max_image_pixels ({max_pixels})", IMAGE_TOO_LARGE
            )
        try:
            img.load()  # decode now: a truncated or corrupt file raises here, not later
            return to_rgb(img)
        except Exception as e:
            raise SampleError(f"undecodable image: {e!r}"[:300], UNDECODABLE_IMAGE) from None


def to_rgb(img: Image.Image) -> Image.Image:
    """`img` as a user sees it, in mode RGB (an RGB image without EXIF rotation is returned as is).

    - EXIF orientation applied (a phone's portrait photo comes out upright);
    - transparency (RGBA, LA, palette or grey/RGB with a transparent colour) composited on white, not on the black
      that PIL's `convert("RGB")` leaves under transparent pixels;
    - 16-bit greys (I;16, and I, taken as 16-bit) scaled to 8 bits, not clipped at 255; float greys (F) read as
      0..1 when no value exceeds 1, else as 0..255;
    - CMYK, YCbCr, LAB, HSV, 1-bit... converted by PIL (CMYK without its colour profile: pure cyan comes out
      (0, 255, 255)).
    """
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block: the pixels are still good
        orientation = 1
    if orientation in range(2, 9):
        img = ImageOps.exif_transpose(img)
    if img.mode == "RGB":
        return img
    if img.mode in _WIDE_GREY_MODES:
        img = _wide_grey_to_8bit(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("LA").convert("RGBA") if img.mode == "La" else img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        white.alpha_composite(rgba)
        return white.convert("RGB")
    return img.convert("RGB")


def _wide_grey_to_8bit(img: Image.Image) -> Image.Image:
    """An I;16/I/F image as L (or LA, keeping a transparent grey value as alpha)."""
    a = np.asarray(img)
    if img.mode == "F":
        a = np.nan_to_num(a.astype(np.float64))
        a = a * 255 if a.size and a.max() <= 1 else a
        out = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    else:
        wide = np.clip(a.astype(np.int64), 0, 65535)
        out = ((wide + 128) // 257).astype(np.uint8)  # round(v * 255 / 65535)
    grey = Image.fromarray(out, mode="L")
    transparent = img.info.get("transparency")
    if isinstance(transparent, int) and img.mode != "F":
        alpha = np.where(a == transparent, 0, 255).astype(np.uint8)
        return Image.merge("LA", (grey, Image.fromarray(alpha, mode="L")))
    return grey


def image_to_tensor(img: Image.Image, image_size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(3, S, S) float32: `to_rgb(img)`, shorter side resized to S (bicubic), centre crop, (x / 255 - mean) / std."""
    img = to_rgb(img)
    w, h = img.size
    scale = image_size / min(w, h)
    nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
    left, top = (nw - image_size) // 2, (nh - image_size) // 2
    if (nw, nh) != (w, h):
        # Resizes only the source region of the centre square: the pixels of resizing the whole image and then
        # cropping (to +-1/255, float rounding), at the cost of the output alone, so a 1 x 10^7 strip cannot
        # become an S x 10^7 S intermediate.
        sx, sy = w / nw, h / nh
        box = (left * sx, top * sy, (left + image_size) * sx, (top + image_size) * sy)
        img = img.resize((image_size, image_size), Image.Resampling.BICUBIC, box=box)
    else:
        img = img.crop((left, top, left + image_size, top + image_size))
    # channels first while still 8-bit, made contiguous: the float math and the collate's copy then run over
    # contiguous memory (on the permuted view they cost 1.4x and 10x); (x / 255 - mean) / std as one multiply-add
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous().float()  # (3, S, S)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return x.mul_(1.0 / (255.0 * std_t)).sub_(torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) / std_t)


def _utf8(value: Any, where: str, what: str, kind: str) -> str:
    if not isinstance(value, bytes):
        return str(value)
    try:
        return value.decode("utf-8-sig")  # (-sig: a leading byte-order mark is no part of the text)
    except UnicodeDecodeError as e:
        raise SampleError(
            f"{where}: {what} is not UTF-8 ({e.reason} at byte {e.start}: {value[e.start:e.start + 4]!r})", kind
        ) from None


def decode_sample(
    raw: dict[str, Any],
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    num_classes: int = 0,
    media: Sequence[Any] = (),
    text_only: bool = False,
) -> dict[str, Any]:
    """Raw tar sample -> {"__key__", "images": [(3, S, S)], "caption": str, "class_label": int, and each medium's
    items under its `sample_key`}; raises SampleError (with its kind) if unusable. `class_label` is the `.cls` member
    (an integer, as webdataset writes it), -100 without one; a sample with a label may have no caption
    (classification data). A label must be in [0, `num_classes`) (`model.num_classes`; 0: no head, no upper
    bound): one outside would make the loss index out of range, on one rank. The image is the first member of
    IMAGE_EXTS present, opened by `load_image` (`max_pixels`: `data.max_image_pixels`). `media`: the other media
    (mmscale.media, bound to their config), each decoding its own members when the sample has them. A sample with
    no media member at all is a text-only sample when `text_only` (`data.text_only`), else skipped."""
    key = raw.get("__key__", "?")
    where = f"{key} in {raw.get('__url__', '?')}"
    refuse_oversized(raw, where)
    label = IGNORE_INDEX
    if raw.get("cls") is not None:
        text = _utf8(raw["cls"], where, "class label (.cls member)", BAD_LABEL)
        try:
            label = int(text.strip())
        except ValueError:
            raise SampleError(
                f"{where}: class label (.cls member) {text[:20]!r} is not an integer", BAD_LABEL
            ) from None
        if label < 0:
            raise SampleError(f"{where}: class label (.cls member) {label} is negative", BAD_LABEL)
        if num_classes > 0 and label >= num_classes:
            raise SampleError(
                f"{where}: class label (.cls member) {label} is not below model.num_classes ({num_classes})", BAD_LABEL
            )
    caption = raw.get("txt")
    if caption is None and label == IGNORE_INDEX:
        raise SampleError(f"{where}: no caption (.txt member) and no class label (.cls member)", MISSING_CAPTION)
    caption = "" if caption is None else _utf8(caption, where, "caption (.txt member)", BAD_ENCODING).strip()
    if not caption and label == IGNORE_INDEX:
        raise SampleError(f"{where}: empty caption", EMPTY_CAPTION)
    out: dict[str, Any] = {"__key__": key, "images": [], "caption": caption, "class_label": label}
    for m in media:
        if m.present(raw):
            out[m.sample_key] = m.decode(raw, where)
    data = next((raw[e] for e in IMAGE_EXTS if e in raw), None)
    if data is None:
        if len(out) == 4 and not text_only:  # no medium either
            others = "".join(f"; {m.name}: {m.members}" for m in media)
            raise SampleError(f"{where}: no image member (one of {', '.join(IMAGE_EXTS)}){others}; set "
                              f"data.text_only=true to train on text-only samples", MISSING_IMAGE)
        return out
    try:
        img = load_image(data, max_pixels)
    except SampleError as e:
        raise SampleError(f"{where}: {e}", e.kind) from None
    out["images"] = [image_to_tensor(img, image_size, mean, std)]
    return out


def raw_members(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw`'s key and its members (caption, label, image bytes, other media's members...), nothing decoded; not the
    reader's own entries (`__url__`...)."""
    from mmscale.data.interleaved import document_members, is_document

    if is_document(raw):  # its .json and numbered image members (0.jpg, 1.png...)
        return document_members(raw)
    return {"__key__": raw.get("__key__", "?"),
            **{k: v for k, v in raw.items() if not k.startswith("__")}}


def decode_for_training(
    raw: dict[str, Any], cfg: DataConfig, tokenizer: Tokenizer, num_classes: int = 0, media: Sequence[Any] = ()
) -> dict[str, Any]:
    """Stages 6-7 for one raw sample, as the training stream does them (a replayed sample goes through these).
    `num_classes`: `model.num_classes`, the bound on class labels (0: none). `media`: the other media, bound
    (mmscale.media.bind_media); the text starts with the placeholder of each item: the image's, then the others'
    in their registration order."""
    from mmscale.data.interleaved import decode_document, is_document  # (it imports this module)

    refuse_oversized(raw, f"{raw.get('__key__', '?')} in {raw.get('__url__', '?')}")
    if is_document(raw):  # an interleaved image-text document: several images at their places in the text
        return decode_document(raw, cfg, tokenizer)
    s = decode_sample(raw, cfg.image_size, cfg.image_mean, cfg.image_std, cfg.max_image_pixels, num_classes, media,
                      cfg.text_only)
    marks = [tokenizer.image_token_id] * len(s["images"])
    for m in media:
        marks += [m.token_id] * len(s.get(m.sample_key, ()))
    s["input_ids"] = caption_to_ids(s.pop("caption"), tokenizer, cfg.max_text_len, marks)
    return s


def caption_to_ids(caption: str, tokenizer: Tokenizer, max_text_len: int,
                   placeholders: Sequence[int] | None = None) -> list[int]:
    """placeholders + caption tokens + [eos]: at most 1 + max_text_len ids (the caption is truncated, eos kept).
    `placeholders`: the ids marking the sample's media, in slot order; None: one `<image>`; [] for a text-only
    sample."""
    marks = [tokenizer.image_token_id] if placeholders is None else list(placeholders)
    return marks + tokenizer.encode(caption)[: max(0, 1 + max_text_len - len(marks) - 1)] + [tokenizer.eos_id]
