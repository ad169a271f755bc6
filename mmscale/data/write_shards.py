"""Turn (image file, caption) pairs into WebDataset tar shards.

    python -m mmscale.data.write_shards --input pairs.jsonl --images DIR --out shards/ --samples-per-shard 500

The input is a JSONL file (`{"image": "rel/path.jpg", "caption": "..."}` per line) or a CSV file with the header
`image,caption`; image paths are taken relative to `--images`. Each sample becomes `{key}.{ext}` plus `{key}.txt`,
keys numbered in input order. Any image PIL opens is accepted (whatever its file name's suffix):
- JPEG (grey or RGB), PNG (8-bit), WebP and GIF, which every browser and image library shows as they are, are copied
  byte for byte (`.jpg`, `.png`, `.webp`, `.gif`; the EXIF orientation stays in the file and training applies it);
- everything else is re-encoded in RGB exactly as training would see it (mmscale.data.decode.load_image: EXIF
  orientation applied, transparency on white, 16-bit scaled to 8 bits): CMYK JPEGs as JPEG (quality 95: already
  lossy photos, which PNG would make several times larger), the rest (TIFF, BMP, 16-bit PNG, ...) as PNG, lossless,
  since such files are usually scans, screenshots or measurements whose exact pixels matter.

A row whose image file is missing, cannot be opened by PIL or is over `--max-image-pixels`, or whose caption is
missing, null, not text or empty, stops the run with an error naming the row, unless `--skip-bad-rows` is given:
then such rows are skipped, counted, and the count is printed at the end. A stopped run leaves no part of the shard
it was writing; the complete shards before it stay, recorded in sizes.json.

An `--out` that already holds shards of the same `--prefix` is refused: a new run would replace only as many as it
writes and the older ones, still in the folder and in sizes.json, would be read with it. `--overwrite` deletes them
(and their sizes.json entries) first; shards of other prefixes (a validation split beside the training one) stay.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from mmscale.data.decode import DEFAULT_MAX_PIXELS, load_image
from mmscale.data.reading import SampleError
from mmscale.data.shards import existing_shards, remove_shards, write_tar_shards

log = logging.getLogger(__name__)

_COPIED = {"JPEG": ("jpg", ("L", "RGB")), "MPO": ("jpg", ("L", "RGB")), "WEBP": ("webp", None), "GIF": ("gif", None),
           "PNG": ("png", ("1", "L", "LA", "P", "RGB", "RGBA"))}
"""PIL format -> (member extension, the modes copied as they are; None: all): what browsers show as it is."""
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class BadRowError(ValueError):
    pass


def read_pairs(path: str | Path) -> Iterator[tuple[str, str, object]]:
    """(row description, image path, caption) for each row of a JSONL or CSV pairs file. The caption is as the row
    gives it: None when the key is missing or null, possibly not a str in JSONL (`pairs_to_samples` refuses both)."""
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
                    image, caption = row["image"], row.get("caption")  # no caption: a bad row, not a bad file
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                    raise BadRowError(
                        f"{path}:{lineno}: expected a JSON object with keys image and caption ({e!r})"
                    ) from None
                yield f"{path}:{lineno}", "" if image is None else str(image).strip(), caption


def image_member(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str, bytes, bool]:
    """(member extension, bytes, re-encoded?) of an image file's bytes, as the module doc says; SampleError
    (UNDECODABLE_IMAGE, IMAGE_TOO_LARGE) when PIL cannot open and decode it or it has more than `max_pixels`."""
    rgb = load_image(data, max_pixels)  # decodes every pixel: a file training could not use is refused here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # load_image has checked the size
        with Image.open(io.BytesIO(data)) as img:
            fmt, mode = img.format, img.mode
    ext, modes = _COPIED.get(fmt, (None, None))
    sixteen_bit_png = fmt == "PNG" and data.startswith(_PNG_SIGNATURE) and data[24:25] == b"\x10"  # IHDR bit depth
    if ext is not None and (modes is None or mode in modes) and not sixteen_bit_png:
        return ext, data, False
    out = io.BytesIO()
    if fmt in ("JPEG", "MPO"):
        rgb.save(out, format="JPEG", quality=95)
        return "jpg", out.getvalue(), True
    rgb.save(out, format="PNG")
    return "png", out.getvalue(), True


def pairs_to_samples(
    pairs_file: str | Path,
    images_dir: str | Path,
    skip_bad_rows: bool,
    skipped: list[str],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    reencoded: list[str] | None = None,
):
    """Samples for `write_shards`; bad rows raise BadRowError, or are appended to `skipped` if `skip_bad_rows`.
    Images are copied or re-encoded by `image_member`; the rows of re-encoded ones are appended to `reencoded`."""
    images_dir = Path(images_dir)
    index = 0
    for where, image, caption in read_pairs(pairs_file):
        image_path = images_dir / image
        problem = None
        if not image:
            problem = "no image path"
        elif not image_path.is_file():
            problem = f"image file {str(image_path)!r} does not exist"
        elif caption is None:  # (str(None) would store the caption "None")
            problem = "no caption (missing or null)"
        elif not isinstance(caption, str):
            problem = f"caption {caption!r} is not text"
        elif not caption.strip():
            problem = "empty caption"
        else:
            try:
                ext, data, converted = image_member(image_path.read_bytes(), max_pixels)
            except SampleError as e:  # not an image PIL decodes, or over the pixel limit
                problem = f"image {image!r}: {e}"
            except OSError as e:  # e.g. no read permission
                problem = f"image file {str(image_path)!r} cannot be read: {e}"
        if problem is not None:
            if not skip_bad_rows:
                raise BadRowError(f"{where}: {problem} (pass --skip-bad-rows to skip such rows)")
            skipped.append(f"{where}: {problem}")
            continue
        if converted and reencoded is not None:
            reencoded.append(f"{where}: {image} -> .{ext}")
        yield {"__key__": f"{index:09d}", ext: data, "txt": caption.strip()}
        index += 1


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a bad value is a usage error, exit 2, naming the flag)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="pairs file: .jsonl ({image, caption} per line) or .csv")
    parser.add_argument("--images", required=True, help="folder the image paths in --input are relative to")
    parser.add_argument("--out", required=True, help="output folder for the shards and sizes.json")
    parser.add_argument("--samples-per-shard", type=_positive_int, default=500, help="samples per shard (>= 1)")
    parser.add_argument("--prefix", default="train", help="shard names: {prefix}-000000.tar, ...")
    parser.add_argument(
        "--overwrite", action="store_true",
        help="delete the shards of this --prefix that --out already holds (and their sizes.json entries) first; "
             "without it such an --out is refused",
    )
    parser.add_argument(
        "--skip-bad-rows", action="store_true",
        help="skip (and count) rows with a missing, undecodable or too large image, or a missing, null or empty "
             "caption",
    )
    parser.add_argument(
        "--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS,
        help="refuse images with more pixels (training skips them: data.max_image_pixels)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for flag, path, is_ok in (("--input", args.input, Path.is_file), ("--images", args.images, Path.is_dir)):
        if not is_ok(Path(path)):  # checked before --overwrite deletes anything
            print(f"error: {flag} {path}: no such {'file' if flag == '--input' else 'folder'}", file=sys.stderr)
            return 1
    old = existing_shards(args.out, args.prefix)
    if old and not args.overwrite:
        print(f"error: {args.out} already holds {len(old)} shard(s) named {args.prefix}-NNNNNN.tar (e.g. {old[0]}); "
              f"a new run would replace only as many as it writes and leave the rest mixed in (in the folder and in "
              f"sizes.json). Pass --overwrite to delete them first, or give another --out or --prefix",
              file=sys.stderr)
        return 1
    if old:
        remove_shards(args.out, args.prefix)
        print(f"--overwrite: deleted {len(old)} earlier shard(s) {args.prefix}-NNNNNN.tar from {args.out}",
              file=sys.stderr)
    skipped: list[str] = []
    reencoded: list[str] = []
    try:
        sizes = write_tar_shards(
            pairs_to_samples(args.input, args.images, args.skip_bad_rows, skipped, args.max_image_pixels, reencoded),
            args.out,
            args.samples_per_shard,
            prefix=args.prefix,
        )
    except (BadRowError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        kept = existing_shards(args.out, args.prefix)
        if kept:
            print(f"note: the {len(kept)} complete shard(s) written before it stay in {args.out}; run again with "
                  f"--overwrite to replace them", file=sys.stderr)
        return 1
    for line in skipped[:10]:
        print(f"skipped {line}", file=sys.stderr)
    if reencoded:
        print(f"re-encoded {len(reencoded)} image(s) no browser shows as they are, e.g. {reencoded[0]}",
              file=sys.stderr)
    print(f"wrote {sum(sizes.values())} samples into {len(sizes)} shards in {args.out}; skipped {len(skipped)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
