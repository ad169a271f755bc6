"""The demo dataset: two coloured shapes per image, captioned with their colours, kinds and relation.

    python -m mmscale.data.synthetic --out data/shapes --num-samples 2000 --samples-per-shard 250

Each caption reads `a {colour} {shape} {relation} a {colour} {shape}`, e.g. "a red circle left of a blue square".
Colours, shapes and the relation are drawn uniformly and independently per sample, so the colour and shape words
cannot be predicted from the text before them: only by looking at the image (the article is always "a", even
before "orange": "an" would leak the colour). A model that uses the image gets a lower loss on those words than
one fed shuffled images; `COLOURS` and `SHAPES` list the words to measure.

Generation is deterministic: sample i depends only on (seed, i), and the tar files are byte-identical across runs.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from mmscale.data.shards import SIZES_FILE, write_tar_shards

_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
COLOURS: tuple[str, ...] = tuple(_RGB)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
_BACKGROUND = (245, 245, 245)
_SUPERSAMPLE = 4  # draw large, then downsample: anti-aliased edges


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def make_shapes_sample(index: int, image_size: int, seed: int) -> tuple[Image.Image, str]:
    """Image and caption of sample `index` (a pure function of its arguments)."""
    rng = random.Random(f"mmscale-shapes-{seed}-{index}")
    c1, c2 = rng.choice(COLOURS), rng.choice(COLOURS)
    s1, s2 = rng.choice(SHAPES), rng.choice(SHAPES)
    relation = rng.choice(RELATIONS)

    big = image_size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), _BACKGROUND)
    draw = ImageDraw.Draw(img)
    # Shape 1 sits in one half of the image, shape 2 in the other; the relation picks the halves.
    r1, r2 = (rng.uniform(0.13, 0.2) * big for _ in range(2))
    along1, along2 = rng.uniform(0.22, 0.28) * big, rng.uniform(0.72, 0.78) * big  # first half, second half
    across1, across2 = rng.uniform(0.3, 0.7) * big, rng.uniform(0.3, 0.7) * big
    if relation in ("right of", "below"):
        along1, along2 = along2, along1
    if relation in ("left of", "right of"):
        p1, p2 = (along1, across1), (along2, across2)
    else:
        p1, p2 = (across1, along1), (across2, along2)
    _draw_shape(draw, s1, *p1, r1, _RGB[c1])
    _draw_shape(draw, s2, *p2, r2, _RGB[c2])
    img = img.resize((image_size, image_size), Image.Resampling.LANCZOS)
    return img, f"a {c1} {s1} {relation} a {c2} {s2}"


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=95)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


def make_shapes_dataset(
    out_dir: str | Path,
    num_samples: int,
    samples_per_shard: int = 500,
    image_size: int = 64,
    seed: int = 0,
    prefix: str = "train",
    image_format: str = "jpg",
    first_index: int = 0,
) -> Path:
    """Write `num_samples` shape samples as shards `{out_dir}/{prefix}-000000.tar`, ... plus `sizes.json`.

    `image_format` is `jpg` (quality 95) or `png`. Samples are numbered from `first_index`: give a held-out split
    the same seed and `first_index=num_train_samples`, or a different seed. Returns `out_dir`.
    """
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")

    def samples():
        for i in range(first_index, first_index + num_samples):
            img, caption = make_shapes_sample(i, image_size, seed)
            yield {"__key__": f"{prefix}{i:09d}", image_format: _encode(img, image_format), "txt": caption}

    write_tar_shards(samples(), out_dir, samples_per_shard, prefix=prefix)
    return Path(out_dir)


def ensure_shapes_dataset(
    out_dir: str | Path,
    num_samples: int,
    samples_per_shard: int = 500,
    image_size: int = 64,
    seed: int = 0,
    prefix: str = "train",
    first_index: int = 0,
) -> Path:
    """`make_shapes_dataset` unless `out_dir` already holds exactly this split (same arguments); returns `out_dir`.

    For the trainer: rank 0 calls it on every (re)start; a resumed run finds its data and reuses it. A split made
    with other arguments is replaced (its `{prefix}-*.tar` files are deleted first).
    """
    out = Path(out_dir)
    params = dict(num_samples=num_samples, samples_per_shard=samples_per_shard, image_size=image_size, seed=seed,
                  first_index=first_index)
    stamp = out / f"{prefix}.shapes.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        return out
    for old in out.glob(f"{prefix}-*.tar"):
        old.unlink()
    sizes_file = out / SIZES_FILE
    if sizes_file.is_file():  # drop the old split's entries
        sizes = {k: v for k, v in json.loads(sizes_file.read_text()).items() if not k.startswith(f"{prefix}-")}
        sizes_file.write_text(json.dumps(sizes, indent=1) + "\n")
    make_shapes_dataset(out, num_samples, samples_per_shard, image_size, seed, prefix, first_index=first_index)
    stamp.write_text(json.dumps(params) + "\n")  # last: an interrupted generation is redone
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the coloured-shapes demo dataset as WebDataset shards.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-samples", type=int, required=True)
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefix", default="train")
    parser.add_argument("--format", choices=("jpg", "png"), default="jpg")
    parser.add_argument("--first-index", type=int, default=0, help="number of the first sample (for held-out splits)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = make_shapes_dataset(
        args.out, args.num_samples, args.samples_per_shard, args.image_size, args.seed, args.prefix, args.format,
        args.first_index,
    )
    print(f"wrote {args.num_samples} samples to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
