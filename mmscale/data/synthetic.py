"""The demo datasets: synthetic coloured shapes with captions that only the image can complete. Two tasks.

    python -m mmscale.data.synthetic --out data/shapes --num-samples 2000 --samples-per-shard 250 [--task counts]

`shapes` (the demo's pretraining task): two coloured shapes per image. Each caption reads
`a {colour} {shape} {relation} a {colour} {shape}`, e.g. "a red circle left of a blue square". Colours, shapes
and the relation are drawn uniformly and independently per sample, so the colour and shape words cannot be
predicted from the text before them: only by looking at the image (the article is always "a", even before
"orange": "an" would leak the colour). A model that uses the image gets a lower loss on those words than one fed
shuffled images; `COLOURS` and `SHAPES` list the words to measure.

`counts` (a task the demo never sees, for fine-tuning): 1 to 4 shapes of one colour and one kind, none
overlapping (each in its own cell of a 3x3 grid, jittered inside it). Each caption reads
`{count} {colour} {shape}` with the shape singular after "one" and plural (`SHAPE_PLURALS`: the shape + "s")
after the others, e.g. "one red circle", "three blue squares". The count (`COUNTS`: one, two, three, four),
the colour and the shape are drawn uniformly and independently, so the count word comes first with nothing before
it but the image, and the colour and shape words cannot be guessed from the count.

`synthetic_words()` lists every word of every task's captions: a tokenizer trained for one task (mmscale adds
that list to the training text) spells the other's captions too, so a fine-tune on `counts` can reuse the
pretraining's tokenizer.

Generation is deterministic: sample i depends only on (task, seed, i), and the tar files are byte-identical
across runs.
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
COUNTS: tuple[str, ...] = ("one", "two", "three", "four")  # COUNTS[n - 1] names n
SHAPE_PLURALS: tuple[str, ...] = tuple(f"{s}s" for s in SHAPES)  # in SHAPES' order
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


def make_counts_sample(index: int, image_size: int, seed: int) -> tuple[Image.Image, str]:
    """Image and caption of counts sample `index` (a pure function of its arguments): `COUNTS[n - 1]` shapes."""
    rng = random.Random(f"mmscale-counts-{seed}-{index}")
    n = rng.randint(1, len(COUNTS))
    colour, shape = rng.choice(COLOURS), rng.choice(SHAPES)

    big = image_size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), _BACKGROUND)
    draw = ImageDraw.Draw(img)
    # One shape per cell of a 3x3 grid: a shape reaches at most r from its centre (see _draw_shape) and the
    # jitter keeps it `margin` inside its cell, so neighbours stay >= 2 * margin apart (about 2 px at 32 px).
    cell, margin = big / 3, 0.03 * big
    r = rng.uniform(0.09, 0.12) * big
    jitter = cell / 2 - r - margin
    for c in sorted(rng.sample(range(9), n)):
        cx = (c % 3 + 0.5) * cell + rng.uniform(-jitter, jitter)
        cy = (c // 3 + 0.5) * cell + rng.uniform(-jitter, jitter)
        _draw_shape(draw, shape, cx, cy, r, _RGB[colour])
    img = img.resize((image_size, image_size), Image.Resampling.LANCZOS)
    return img, f"{COUNTS[n - 1]} {colour} {shape if n == 1 else SHAPE_PLURALS[SHAPES.index(shape)]}"


_SAMPLERS = {"shapes": make_shapes_sample, "counts": make_counts_sample}
SYNTHETIC_TASKS: tuple[str, ...] = tuple(_SAMPLERS)


def _check_task(task: str) -> None:
    if task not in _SAMPLERS:
        raise ValueError(f"unknown synthetic task {task!r}; known: {', '.join(SYNTHETIC_TASKS)}")


def synthetic_words(task: str | None = None) -> tuple[str, ...]:
    """Every word `task`'s captions can contain (every task's when None), each once, in a fixed order."""
    if task is not None:
        _check_task(task)
    words = {
        "shapes": ("a", *COLOURS, *SHAPES, *(w for r in RELATIONS for w in r.split())),
        "counts": (*COUNTS, *COLOURS, *SHAPES, *SHAPE_PLURALS),
    }
    return tuple(dict.fromkeys(w for t in (SYNTHETIC_TASKS if task is None else [task]) for w in words[t]))


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=95)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


def make_synthetic_dataset(
    out_dir: str | Path,
    num_samples: int,
    samples_per_shard: int = 500,
    image_size: int = 64,
    seed: int = 0,
    prefix: str = "train",
    image_format: str = "jpg",
    first_index: int = 0,
    task: str = "shapes",
) -> Path:
    """Write `num_samples` samples of `task` (`SYNTHETIC_TASKS`) as shards `{out_dir}/{prefix}-000000.tar`, ...
    plus `sizes.json`.

    `image_format` is `jpg` (quality 95) or `png`. Samples are numbered from `first_index`: give a held-out split
    the same seed and `first_index=num_train_samples`, or a different seed. Returns `out_dir`.
    """
    _check_task(task)
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    make_sample = _SAMPLERS[task]

    def samples():
        for i in range(first_index, first_index + num_samples):
            img, caption = make_sample(i, image_size, seed)
            yield {"__key__": f"{prefix}{i:09d}", image_format: _encode(img, image_format), "txt": caption}

    write_tar_shards(samples(), out_dir, samples_per_shard, prefix=prefix)
    return Path(out_dir)


def ensure_synthetic_dataset(
    out_dir: str | Path,
    num_samples: int,
    samples_per_shard: int = 500,
    image_size: int = 64,
    seed: int = 0,
    prefix: str = "train",
    first_index: int = 0,
    task: str = "shapes",
) -> Path:
    """`make_synthetic_dataset` unless `out_dir` already holds exactly this split (same task and arguments);
    returns `out_dir`.

    For the trainer: rank 0 calls it on every (re)start; a resumed run finds its data and reuses it. A split made
    with other arguments or another task is replaced (its `{prefix}-*.tar` files are deleted first). The split's
    stamp is `{prefix}.{task}.json` (the shapes task's, `train.shapes.json`, is the one earlier versions wrote).
    """
    _check_task(task)
    out = Path(out_dir)
    params = dict(num_samples=num_samples, samples_per_shard=samples_per_shard, image_size=image_size, seed=seed,
                  first_index=first_index)
    stamp = out / f"{prefix}.{task}.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        return out
    for t in SYNTHETIC_TASKS:  # no task's stamp may outlive the files it describes
        (out / f"{prefix}.{t}.json").unlink(missing_ok=True)
    for old in out.glob(f"{prefix}-*.tar"):
        old.unlink()
    sizes_file = out / SIZES_FILE
    if sizes_file.is_file():  # drop the old split's entries
        sizes = {k: v for k, v in json.loads(sizes_file.read_text()).items() if not k.startswith(f"{prefix}-")}
        sizes_file.write_text(json.dumps(sizes, indent=1) + "\n")
    make_synthetic_dataset(out, num_samples, samples_per_shard, image_size, seed, prefix, first_index=first_index,
                           task=task)
    stamp.write_text(json.dumps(params) + "\n")  # last: an interrupted generation is redone
    return out


def make_shapes_dataset(out_dir: str | Path, num_samples: int, *args, **kwargs) -> Path:
    """`make_synthetic_dataset` of the shapes task (same arguments, without `task`)."""
    return make_synthetic_dataset(out_dir, num_samples, *args, task="shapes", **kwargs)


def ensure_shapes_dataset(out_dir: str | Path, num_samples: int, *args, **kwargs) -> Path:
    """`ensure_synthetic_dataset` of the shapes task (same arguments, without `task`)."""
    return ensure_synthetic_dataset(out_dir, num_samples, *args, task="shapes", **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a synthetic demo dataset as WebDataset shards.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--task", choices=SYNTHETIC_TASKS, default="shapes", help="see the module doc")
    parser.add_argument("--num-samples", type=int, required=True)
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefix", default="train")
    parser.add_argument("--format", choices=("jpg", "png"), default="jpg")
    parser.add_argument("--first-index", type=int, default=0, help="number of the first sample (for held-out splits)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = make_synthetic_dataset(
        args.out, args.num_samples, args.samples_per_shard, args.image_size, args.seed, args.prefix, args.format,
        args.first_index, task=args.task,
    )
    print(f"wrote {args.num_samples} samples to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
