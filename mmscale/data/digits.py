"""Real handwritten digits as classification shards: scikit-learn's digits (1,797 scans of 8x8 pixels, 16 grey
levels, from the UCI optical recognition dataset, shipped inside the package: no download).

    python -m mmscale.data.digits --out data/digits --image-size 32 [--classes 0 1] [--samples-per-shard 200]

Each sample is a PNG (the scan scaled up, grey on RGB) and its label as a `.cls` member, the way webdataset writes
class labels; no caption. The split is fixed: every fifth scan of each digit (in the package's order) is held out
for validation, so the two splits never share a scan and each digit has a fifth of its scans there. Needs
scikit-learn (`pip install scikit-learn`, in the `test` extra).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Iterable

from PIL import Image

from mmscale.data.shards import write_tar_shards


def _scans():
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the digits come with scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    return d.images, d.target


def digit_png(scan, image_size: int) -> bytes:
    """One 8x8 scan (values 0..16) as a PNG of image_size x image_size, dark ink on white like paper."""
    grey = (255 - scan * (255 / 16)).round().clip(0, 255).astype("uint8")
    img = Image.fromarray(grey, mode="L").resize((image_size, image_size), Image.Resampling.BICUBIC).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_digits_shards(out_dir: str | Path, split: str = "train", classes: Iterable[int] | None = None,
                        image_size: int = 32, samples_per_shard: int = 200) -> int:
    """Write the `split` ("train": 4 of every 5 scans of each digit, "val": the fifth) of the digits in `classes`
    (all ten by default) as shards `{out_dir}/{split}-000000.tar`, ... with `sizes.json`. Returns the number of
    samples."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    images, targets = _scans()
    keep = set(range(10) if classes is None else classes)
    bad = sorted(c for c in keep if not 0 <= c <= 9)
    if bad:
        raise ValueError(f"classes must be digits 0-9, got {bad}")
    seen: dict[int, int] = {}  # scans of each digit so far: every fifth of each digit is held out (stratified)
    index = []
    for i, t in enumerate(int(t) for t in targets):
        seen[t] = seen.get(t, 0) + 1
        if (seen[t] % 5 == 0) == (split == "val") and t in keep:
            index.append(i)
    if not index:
        raise ValueError(f"no {split} scans of classes {sorted(keep)}")

    def samples():
        for i in index:
            yield {"__key__": f"digit{i:05d}", "png": digit_png(images[i], image_size), "cls": str(int(targets[i]))}

    write_tar_shards(samples(), out_dir, samples_per_shard, prefix=split)
    return len(index)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--classes", type=int, nargs="*", default=None, help="digits to keep (default: all ten)")
    p.add_argument("--samples-per-shard", type=int, default=200)
    args = p.parse_args(argv)
    for split in ("train", "val"):
        n = write_digits_shards(Path(args.out) / split, split, args.classes, args.image_size, args.samples_per_shard)
        print(f"{split}: {n} samples under {Path(args.out) / split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
