"""Interleaved image-text documents (OBELICS / MMC4 style): several images at their places in the text.

    python -m mmscale.data.interleaved write --input docs.jsonl --images DIR --out shards/ --samples-per-shard 500
    python -m mmscale.data.interleaved synthetic --out data/docs --num-docs 200     # docs.jsonl + images/ to write

Input: a JSONL file, one document per line, in either form (image paths relative to `--images`):

    OBELICS  {"texts": ["intro", null, "after image 0"], "images": [null, "a/0.jpg", null]}
             parallel lists: each position holds a text or an image (the other is null)
    MMC4     {"text_list": ["s0", "s1"], "image_info": [{"image_name": "a/0.jpg", "matched_text_index": 1}]}
             an image goes right before the sentence it is matched to (OpenFlamingo's order)

A shard sample is `{key}.json` (the document, OBELICS form, each image named by its member) plus one member per image
in document order, `{key}.0.jpg`, `{key}.1.png`, ... (bytes copied, not re-encoded; WebDataset splits at the first
dot, so they are the members `0.jpg`, `1.png` of sample `{key}`):

    {"texts": ["intro", null, "after image 0"], "images": [null, "0.jpg", null]}

A row that is not a document, names a missing file or a URL, or has no text or no image stops the run with an error
naming its line, unless `--skip-bad-rows`: then it is skipped and counted (`mmscale/data/write_shards.py`'s rules).

Decoding (`decode_document`, stages 6-7 of the data's trip for a document; `decode_for_training` sends a document
here): texts and `<image>` tokens in document order, eos last, at most `1 + data.max_text_len` ids (the batch's
sequence length), at most `data.max_images` images. An image beyond `max_images`, or whose `<image>` token would fall
past the truncation, is dropped with its token, so a sample's `<image>` tokens and images always match one to one and
the collate's media index (the latest `<image>` token at or before each token) names the right slot.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from mmscale.config import DataConfig
from mmscale.data.collate import IGNORE_INDEX
from mmscale.data.decode import image_to_tensor, load_image  # decode.py imports this module only in a function
from mmscale.data.reading import BAD_ENCODING, EMPTY_CAPTION, MISSING_IMAGE, OTHER, SampleError
from mmscale.data.shards import IMAGE_EXTS, write_tar_shards
from mmscale.data.tokenizer import Tokenizer
from mmscale.data.write_shards import BadRowError

log = logging.getLogger(__name__)

DOCUMENT_MEMBER = "json"
"""The member holding a document's structure."""
_SUFFIX_TO_EXT = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
_URL_PREFIXES = ("http://", "https://", "s3://", "gs://", "data:")

Item = tuple[str, str]
"""("text", str) or ("image", path or member name): one position of a document."""


# ----------------------------------------------------------------------------------------------- input documents


def document_items(doc: Any) -> list[Item]:
    """A JSONL document (OBELICS or MMC4 form) -> its positions in order; raises BadRowError naming the problem.

    Empty and whitespace-only texts are dropped; at least one text and one image must remain.
    """
    if not isinstance(doc, Mapping):
        raise BadRowError(f"expected a JSON object, got {type(doc).__name__}; {_FORMS}")
    if "texts" in doc or "images" in doc:
        items = _obelics_items(doc)
    elif "text_list" in doc or "image_info" in doc:
        items = _mmc4_items(doc)
    else:
        raise BadRowError(f"keys {sorted(doc)[:6]} are neither form; {_FORMS}")
    items = [(kind, v.strip() if kind == "text" else v) for kind, v in items if kind == "image" or v.strip()]
    if not any(kind == "text" for kind, _ in items):
        raise BadRowError("no text (every text is empty or null)")
    if not any(kind == "image" for kind, _ in items):
        raise BadRowError("no image")
    return items


_FORMS = ('give {"texts": [...], "images": [...]} (OBELICS: parallel lists, a text or an image at each position) or '
          '{"text_list": [...], "image_info": [{"image_name": ..., "matched_text_index": i}]} (MMC4)')


def _obelics_items(doc: Mapping) -> list[Item]:
    texts, images = doc.get("texts"), doc.get("images")
    if not isinstance(texts, list) or not isinstance(images, list):
        raise BadRowError(f"texts and images must both be lists, got {type(texts).__name__} and "
                          f"{type(images).__name__}; {_FORMS}")
    if len(texts) != len(images):
        raise BadRowError(f"texts ({len(texts)}) and images ({len(images)}) differ in length; they are parallel "
                          f"lists with a text or an image (the other null) at each position")
    items: list[Item] = []
    for i, (text, image) in enumerate(zip(texts, images)):
        if (text is None) == (image is None):
            held = "both a text and an image" if text is not None else "neither a text nor an image"
            raise BadRowError(f"position {i} holds {held}; put exactly one of them there, the other null")
        if text is not None and not isinstance(text, str):
            raise BadRowError(f"texts[{i}] is a {type(text).__name__}, expected a string or null")
        if image is not None and not isinstance(image, str):
            raise BadRowError(f"images[{i}] is a {type(image).__name__}, expected a path or null")
        items.append(("text", text) if text is not None else ("image", image))
    return items


def _mmc4_items(doc: Mapping) -> list[Item]:
    texts, infos = doc.get("text_list"), doc.get("image_info")
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise BadRowError(f"text_list must be a list of strings; {_FORMS}")
    if not isinstance(infos, list):
        raise BadRowError(f"image_info must be a list of {{image_name, matched_text_index}}; {_FORMS}")
    before: dict[int, list[str]] = {}
    for j, info in enumerate(infos):
        name = info.get("image_name") if isinstance(info, Mapping) else None
        index = info.get("matched_text_index") if isinstance(info, Mapping) else None
        if not isinstance(name, str) or not isinstance(index, int) or isinstance(index, bool):
            raise BadRowError(f"image_info[{j}] must be {{\"image_name\": str, \"matched_text_index\": int}}, "
                              f"got {str(info)[:80]}")
        if not 0 <= index < len(texts):
            raise BadRowError(f"image_info[{j}] ({name!r}): matched_text_index {index} is outside text_list "
                              f"(0..{len(texts) - 1})")
        before.setdefault(index, []).append(name)
    return [item for i, text in enumerate(texts) for item in [*(("image", n) for n in before.get(i, [])),
                                                                ("text", text)]]


def read_documents(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(where, document or BadRowError) for each non-blank line of a JSONL file; `where` is `path:line`."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{lineno}", BadRowError(f"not JSON ({e})")


def document_sample(key: str, doc: Any, images_dir: str | Path) -> dict[str, Any]:
    """One document -> a shard sample {"__key__", "json", "0.jpg", ...}; raises BadRowError naming the problem."""
    items = document_items(doc)
    images_dir = Path(images_dir)
    sample: dict[str, Any] = {"__key__": key}
    texts: list[str | None] = []
    members: list[str | None] = []
    for kind, value in items:
        if kind == "text":
            texts.append(value)
            members.append(None)
            continue
        if value.startswith(_URL_PREFIXES):
            raise BadRowError(f"image {value!r} is a URL; download the images first and give paths relative to "
                              f"--images")
        path = images_dir / value
        ext = _SUFFIX_TO_EXT.get(path.suffix.lower())
        if ext is None:
            raise BadRowError(f"image {value!r}: unsupported suffix (expected one of {', '.join(_SUFFIX_TO_EXT)})")
        if not path.is_file():
            raise BadRowError(f"image file {str(path)!r} does not exist")
        member = f"{sum(m is not None for m in members)}.{ext}"
        sample[member] = path.read_bytes()
        texts.append(None)
        members.append(member)
    sample[DOCUMENT_MEMBER] = json.dumps({"texts": texts, "images": members}, ensure_ascii=False).encode("utf-8")
    return sample


def documents_to_samples(documents: Iterable[tuple[str, Any]], images_dir: str | Path,
                         skipped: list[str] | None) -> Iterator[dict[str, Any]]:
    """Shard samples of `(where, document)` pairs, keys numbered from 0 in order. A bad document raises BadRowError
    naming `where`; with a `skipped` list it is skipped and described there instead."""
    index = 0
    for where, doc in documents:
        try:
            if isinstance(doc, BadRowError):
                raise doc
            sample = document_sample(f"{index:09d}", doc, images_dir)
        except BadRowError as e:
            if skipped is None:
                raise BadRowError(f"{where}: {e} (pass --skip-bad-rows to skip such rows)") from None
            skipped.append(f"{where}: {e}")
            continue
        yield sample
        index += 1


def write_documents(docs: Iterable[Any], images_dir: str | Path, out: str | Path, samples_per_shard: int,
                    prefix: str = "train", skipped: list[str] | None = None) -> dict[str, int]:
    """Write documents (dicts in OBELICS or MMC4 form, image paths relative to `images_dir`) as tar shards
    `{out}/{prefix}-000000.tar`, ... plus `sizes.json`; returns {shard file name: sample count}.

    A bad document raises BadRowError naming its number; with a `skipped` list it is skipped and described there.
    """
    pairs = ((f"document {i}", doc) for i, doc in enumerate(docs))
    return write_tar_shards(documents_to_samples(pairs, images_dir, skipped), out, samples_per_shard, prefix=prefix)


# ----------------------------------------------------------------------------------------------- decoding


def is_document(raw: Mapping[str, Any]) -> bool:
    """Whether a raw sample is a document: it has a `.json` member, and neither a caption (`.txt`) nor a single
    image member (`.jpg`, ...). (img2dataset's shards carry a `.json` of metadata beside each `.jpg` and `.txt`:
    those stay single-image samples, even one whose image is missing.)
    """
    return DOCUMENT_MEMBER in raw and "txt" not in raw and not any(e in raw for e in IMAGE_EXTS)


def document_members(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A raw document's key, `.json` and image members (`0.jpg`, `1.png`...), nothing decoded: what a replay buffer
    stores to decode it again."""
    return {"__key__": raw.get("__key__", "?"), **{k: v for k, v in raw.items() if k == DOCUMENT_MEMBER
                                                   or (k.split(".", 1)[0].isdigit() and k.endswith(IMAGE_EXTS))}}


def _document_positions(doc: Any, where: str) -> list[Item]:
    """A shard document's positions, ("text", str) or ("image", member name); SampleError if malformed."""
    try:
        if not isinstance(doc, Mapping):
            raise BadRowError(f"expected a JSON object, got {type(doc).__name__}")
        items = _obelics_items(doc)
    except BadRowError as e:
        raise SampleError(f"{where}: malformed document (.{DOCUMENT_MEMBER} member): {e}", OTHER) from None
    if not any(kind == "text" and v.strip() for kind, v in items):
        raise SampleError(f"{where}: document has no text", EMPTY_CAPTION)
    if not any(kind == "image" for kind, _ in items):
        raise SampleError(f"{where}: document has no image", MISSING_IMAGE)
    return items


def decode_document(raw: Mapping[str, Any], cfg: DataConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """A raw document sample -> {"__key__", "images": [(3, S, S)], "input_ids": [int], "class_label": -100}.

    `input_ids`: each text's tokens and each image's `<image>` token in document order, then eos; at most
    `1 + cfg.max_text_len` ids (the text is cut, eos kept). At most `cfg.max_images` images; an image past that, or
    whose `<image>` token would be cut, is dropped with its token (and never decoded). A literal "<image>" typed
    in a text is removed, so `<image>` tokens and images match one to one. Raises SampleError naming the key for
    malformed json, a document without text or image, a missing or undecodable image member, or no image left
    within the first `cfg.max_text_len` tokens.
    """
    key = raw.get("__key__", "?")
    where = f"{key} in {raw.get('__url__', '?')}"
    data = raw.get(DOCUMENT_MEMBER)
    if data is None:
        raise SampleError(f"{where}: no document member (.{DOCUMENT_MEMBER})", OTHER)
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as e:
        raise SampleError(f"{where}: document (.{DOCUMENT_MEMBER} member) is not UTF-8 ({e.reason} at byte "
                          f"{e.start})", BAD_ENCODING) from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise SampleError(f"{where}: malformed document (.{DOCUMENT_MEMBER} member is not JSON: {e})", OTHER) from None
    budget = cfg.max_text_len  # ids before eos
    image_id = tokenizer.image_token_id
    ids: list[int] = []
    images = []
    for kind, value in _document_positions(doc, where):
        if len(ids) >= budget:
            break
        if kind == "text":
            ids += [t for t in tokenizer.encode(value) if t != image_id]
            continue
        if len(images) >= cfg.max_images:
            continue  # dropped with its token; the text after it stays
        member = raw.get(value.lower())
        if member is None:
            raise SampleError(f"{where}: the document names image member {value!r}, which the sample lacks",
                              MISSING_IMAGE)
        try:
            img = load_image(member, cfg.max_image_pixels)
        except SampleError as e:  # undecodable, or over data.max_image_pixels
            raise SampleError(f"{where}: image member {value!r}: {e}", e.kind) from None
        images.append(image_to_tensor(img, cfg.image_size, cfg.image_mean, cfg.image_std))
        ids.append(image_id)
    if not images:
        raise SampleError(f"{where}: no image within the first {budget} tokens (data.max_text_len); the document's "
                          f"text before its first image is longer", MISSING_IMAGE)
    return {"__key__": key, "images": images, "input_ids": ids[:budget] + [tokenizer.eos_id],
            "class_label": IGNORE_INDEX}


# ----------------------------------------------------------------------------------------------- synthetic documents

SYNTHETIC_INTRO = "number of pictures : {count} ."
"""Opening text of about half the synthetic documents (the rest open with their first image)."""


def make_document(index: int, image_size: int, seed: int, num_images: int | None = None) -> list[tuple[str, Any]]:
    """Synthetic document `index` (a pure function of its arguments) as its positions, ("text", str) or ("image",
    PIL image): 1-4 coloured-shapes images (`num_images` fixes the count), each followed by its caption and " ."
    ("a red circle left of a blue square ."), about half the documents opening with `SYNTHETIC_INTRO`."""
    from mmscale.data.synthetic import COUNTS, make_shapes_sample

    rng = random.Random(f"mmscale-documents-{seed}-{index}")
    n = num_images if num_images is not None else rng.randint(1, len(COUNTS))
    items: list[tuple[str, Any]] = []
    if rng.random() < 0.5:
        items.append(("text", SYNTHETIC_INTRO.format(count=COUNTS[n - 1] if n <= len(COUNTS) else n)))
    for j in range(n):
        img, caption = make_shapes_sample(index * 16 + j, image_size, seed)  # distinct images across documents
        items += [("image", img), ("text", f"{caption} .")]
    return items


def synthetic_document_words() -> tuple[str, ...]:
    """Every word the synthetic documents can contain (for a tokenizer that must spell them all)."""
    from mmscale.data.synthetic import COUNTS, synthetic_words

    return tuple(dict.fromkeys([*synthetic_words("shapes"), ".", *SYNTHETIC_INTRO.replace("{count}", "").split(),
                                *COUNTS]))


def make_document_files(out_dir: str | Path, num_docs: int, image_size: int = 64, seed: int = 0,
                        first_index: int = 0) -> Path:
    """Write synthetic documents as the writer's input: `{out_dir}/docs.jsonl` (OBELICS form) and PNG images under
    `{out_dir}/images/`. Returns the JSONL path (its `--images` folder is `{out_dir}/images`)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(first_index, first_index + num_docs):
        texts: list[str | None] = []
        images: list[str | None] = []
        for kind, value in make_document(i, image_size, seed):
            if kind == "text":
                texts.append(value)
                images.append(None)
            else:
                images.append(f"doc{i:06d}_{sum(m is not None for m in images)}.png")
                value.save(out / "images" / images[-1], format="PNG")
                texts.append(None)
        lines.append(json.dumps({"texts": texts, "images": images}))
    path = out / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="documents (JSONL) + image folder -> tar shards")
    w.add_argument("--input", required=True, help="JSONL file, one document per line (OBELICS or MMC4 form)")
    w.add_argument("--images", required=True, help="folder the image paths in --input are relative to")
    w.add_argument("--out", required=True, help="output folder for the shards and sizes.json")
    w.add_argument("--samples-per-shard", type=int, default=500)
    w.add_argument("--prefix", default="train", help="shard names: {prefix}-000000.tar, ...")
    w.add_argument("--skip-bad-rows", action="store_true",
                   help="skip (and count) bad rows: not a document, a missing image, no text or no image")
    s = sub.add_parser("synthetic", help="write synthetic documents: OUT/docs.jsonl and OUT/images/")
    s.add_argument("--out", required=True)
    s.add_argument("--num-docs", type=int, required=True)
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "synthetic":
        path = make_document_files(args.out, args.num_docs, args.image_size, args.seed)
        print(f"wrote {args.num_docs} documents to {path} (images in {Path(args.out) / 'images'})")
        return 0
    skipped: list[str] | None = [] if args.skip_bad_rows else None
    try:
        sizes = write_tar_shards(documents_to_samples(read_documents(args.input), args.images, skipped),
                                 args.out, args.samples_per_shard, prefix=args.prefix)
    except (BadRowError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for line in (skipped or [])[:10]:
        print(f"skipped {line}", file=sys.stderr)
    print(f"wrote {sum(sizes.values())} documents into {len(sizes)} shards in {args.out}; "
          f"skipped {len(skipped or [])} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
