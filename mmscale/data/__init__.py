"""Data: shards on disk -> streaming samples -> tokens and pixels -> fixed-shape batches.

shards.py      shard specs, sizes.json, writing tar shards      write_shards.py  CLI: (image, caption) pairs -> shards
synthetic.py   the demo datasets: shapes, counts (+ CLI)        tokenizer.py     sentencepiece / HF tokenizer (+ CLI)
reading.py     shard files -> raw samples, skip counting         decode.py        raw sample -> pixels and tokens
pipeline.py    the streaming stages and the train/eval loaders   collate.py       samples -> the batch dict
interleaved.py image-text documents (OBELICS/MMC4): JSONL -> shards (+ CLI), a document -> images and tokens
"""

import importlib
from typing import TYPE_CHECKING

# Exports load lazily (PEP 562): `python -m mmscale.data.synthetic` then runs without first importing every
# submodule (and torch) through this package, and without runpy's "found in sys.modules" warning.
_EXPORTS = {
    "mmscale.data.collate": ["IGNORE_INDEX", "collate_samples", "media_index_from_ids"],
    "mmscale.data.interleaved": [
        "decode_document", "is_document", "make_document", "make_document_files", "write_documents",
    ],
    "mmscale.data.pipeline": [
        "EvalLoader", "TrainLoader", "caption_to_ids", "decode_sample", "image_to_tensor",
    ],
    "mmscale.data.shards": ["ShardSpecError", "check_shard_spec", "read_sizes", "resolve_shards", "write_tar_shards"],
    "mmscale.data.synthetic": [
        "COLOURS", "COUNTS", "RELATIONS", "SHAPES", "SHAPE_PLURALS", "SYNTHETIC_TASKS", "ensure_shapes_dataset",
        "ensure_synthetic_dataset", "make_counts_sample", "make_shapes_dataset", "make_shapes_sample",
        "make_synthetic_dataset", "synthetic_words",
    ],
    "mmscale.data.tokenizer": [
        "IMAGE_TOKEN", "Tokenizer", "check_tokenizer_path", "load_tokenizer", "train_sentencepiece",
    ],
}
# No export may share a submodule's name: importing `mmscale.data.X` binds the package attribute X to the module.
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'mmscale.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from mmscale.data.collate import IGNORE_INDEX, collate_samples, media_index_from_ids
    from mmscale.data.interleaved import (
        decode_document,
        is_document,
        make_document,
        make_document_files,
        write_documents,
    )
    from mmscale.data.pipeline import (
        EvalLoader,
        TrainLoader,
        caption_to_ids,
        decode_sample,
        image_to_tensor,
    )
    from mmscale.data.shards import ShardSpecError, check_shard_spec, read_sizes, resolve_shards, write_tar_shards
    from mmscale.data.synthetic import (
        COLOURS,
        COUNTS,
        RELATIONS,
        SHAPE_PLURALS,
        SHAPES,
        SYNTHETIC_TASKS,
        ensure_shapes_dataset,
        ensure_synthetic_dataset,
        make_counts_sample,
        make_shapes_dataset,
        make_shapes_sample,
        make_synthetic_dataset,
        synthetic_words,
    )
    from mmscale.data.tokenizer import (
        IMAGE_TOKEN,
        Tokenizer,
        check_tokenizer_path,
        load_tokenizer,
        train_sentencepiece,
    )
