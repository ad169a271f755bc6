"""Turn (image file, caption) pairs into WebDataset tar shards.

    python -m mmscale.data.write_shards --input pairs.jsonl --images DIR --out shards/ --samples-per-shard 500

The input is a JSONL file (`{"image": "rel/path.jpg", "caption": "..."}` per line) or a CSV file with the header
`image,caption`; image paths are taken relative to `--images`. Each sample becomes `{key}.jpg` (or `.png`, after
the image file's own suffix; the bytes are copied, not re-encoded) plus `{key}.txt`, keys numbered in input order.

A row whose image file is missing or whose caption is empty stops the run with an error naming the row, unless
`--skip-bad-rows` is given: then such rows are skipped, counted, and the count is printed at the end. A stopped run
leaves no part of the shard it was writing; the complete shards before it stay, recorded in sizes.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from mmscale.data.shards import write_tar_shards

log = logging.getLogger(__name__)

_SUFFIX_TO_EXT = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


class BadRowError(ValueError):
    pass


def read_pairs(path: str | Path) -> Iterator[tuple[str, str, str]]:
    """(row description, image path, caption) for each row of a JSONL or CSV pairs file."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"image", "caption"} <= set(reader.fieldnames):
                raise BadRowError(
                    f"{path}: the CSV header must name the columns image,caption; got {reader.fieldnames}"
                )
            for row in reader:  # line numbers: the header is line 1
                yield f"{path}:{reader.line_num}", (row["image"] or "").strip(), (row["caption"] or "")
    else:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    image, caption = row["image"], row["caption"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise BadRowError(
                        f"{path}:{lineno}: expected a JSON object with keys image and caption ({e!r})"
                    ) from None
                yield f"{path}:{lineno}", str(image).strip(), str(caption)


def pairs_to_samples(pairs_file: str | Path, images_dir: str | Path, skip_bad_rows: bool, skipped: list[str]):
    """Samples for `write_shards`; bad rows raise BadRowError, or are appended to `skipped` if `skip_bad_rows`."""
    images_dir = Path(images_dir)
    index = 0
    for where, image, caption in read_pairs(pairs_file):
        image_path = images_dir / image
        problem = None
        if not image:
            problem = "no image path"
        elif not image_path.is_file():
            problem = f"image file {str(image_path)!r} does not exist"
        elif not caption.strip():
            problem = "empty caption"
        elif image_path.suffix.lower() not in _SUFFIX_TO_EXT:
            problem = f"image {image!r}: unsupported suffix (expected one of {', '.join(_SUFFIX_TO_EXT)})"
        if problem is not None:
            if not skip_bad_rows:
                raise BadRowError(f"{where}: {problem} (pass --skip-bad-rows to skip such rows)")
            skipped.append(f"{where}: {problem}")
            continue
        ext = _SUFFIX_TO_EXT[image_path.suffix.lower()]
        yield {"__key__": f"{index:09d}", ext: image_path.read_bytes(), "txt": caption.strip()}
        index += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="pairs file: .jsonl ({image, caption} per line) or .csv")
    parser.add_argument("--images", required=True, help="folder the image paths in --input are relative to")
    parser.add_argument("--out", required=True, help="output folder for the shards and sizes.json")
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--prefix", default="train", help="shard names: {prefix}-000000.tar, ...")
    parser.add_argument(
        "--skip-bad-rows", action="store_true", help="skip (and count) rows with a missing image or empty caption"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    skipped: list[str] = []
    try:
        sizes = write_tar_shards(
            pairs_to_samples(args.input, args.images, args.skip_bad_rows, skipped),
            args.out,
            args.samples_per_shard,
            prefix=args.prefix,
        )
    except (BadRowError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for line in skipped[:10]:
        print(f"skipped {line}", file=sys.stderr)
    print(f"wrote {sum(sizes.values())} samples into {len(sizes)} shards in {args.out}; skipped {len(skipped)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
