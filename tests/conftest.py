"""Shared fixtures: a tiny coloured-shapes dataset and a sentencepiece tokenizer trained on its captions.

Both are session-scoped and built in a temporary folder (nothing is downloaded); treat them as read-only.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# Run without the install step (a new checkout, another interpreter), every module would fail to import torch: say
# once what to run instead of a collection error per file.
_MISSING = [m for m in ("torch", "deepspeed", "transformers", "peft", "webdataset", "sentencepiece", "yaml")
            if importlib.util.find_spec(m) is None]
if _MISSING:
    pytest.exit(f"mmscale's dependencies are not installed for this python ({', '.join(_MISSING)} missing): run "
                f"pip install -c constraints.txt -e \".[test]\" first (the README's test command does both)",
                returncode=4)

import torch  # noqa: E402

# Triton reads TRITON_INTERPRET when it is first imported, so it is set here, before any test module imports it:
# without a GPU the Triton kernels run (slowly, exactly) under the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="module")
def _no_zero3_config_leaks_out_of_a_module():
    """A test module that builds a ZeRO-3 engine in this process must end its job (mmscale.job.build.close):
    transformers' global ZeRO-3 config would otherwise make every later model build run under zero.Init, failing
    far from the cause."""
    yield
    import sys

    ds = sys.modules.get("transformers.integrations.deepspeed")
    if ds is not None and ds.deepspeed_config() is not None:
        ds.unset_hf_deepspeed_config()
        pytest.fail("this module left transformers' ZeRO-3 config set: end in-process jobs with build.close()")


SHAPES_TRAIN_SAMPLES = 64
SHAPES_SAMPLES_PER_SHARD = 8
SHAPES_IMAGE_SIZE = 32


@pytest.fixture(scope="session")
def shapes_shards(tmp_path_factory) -> Path:
    """Folder with 8 shards x 8 samples (32x32 JPEG shapes, seed 0): `train-000000.tar`..., plus `sizes.json`."""
    from mmscale.data.synthetic import make_shapes_dataset

    return make_shapes_dataset(
        tmp_path_factory.mktemp("shapes_train"),
        num_samples=SHAPES_TRAIN_SAMPLES,
        samples_per_shard=SHAPES_SAMPLES_PER_SHARD,
        image_size=SHAPES_IMAGE_SIZE,
        seed=0,
    )


@pytest.fixture(scope="session")
def shapes_val_shards(tmp_path_factory) -> Path:
    """Held-out folder: 2 shards x 8 samples (`val-000000.tar`, `val-000001.tar`), same generator, other indices."""
    from mmscale.data.synthetic import make_shapes_dataset

    return make_shapes_dataset(
        tmp_path_factory.mktemp("shapes_val"),
        num_samples=16,
        samples_per_shard=SHAPES_SAMPLES_PER_SHARD,
        image_size=SHAPES_IMAGE_SIZE,
        seed=0,
        prefix="val",
        first_index=SHAPES_TRAIN_SAMPLES,
    )


@pytest.fixture(scope="session")
def sp_tokenizer(tmp_path_factory, shapes_shards):
    """A word-level sentencepiece Tokenizer trained on the shapes captions (every colour/shape word is one token)."""
    from mmscale.data.synthetic import COLOURS, RELATIONS, SHAPES
    from mmscale.data.tokenizer import captions_from_shards, load_tokenizer, train_sentencepiece

    texts = captions_from_shards(str(shapes_shards))
    # One line per word list guarantees every word is in the vocabulary whatever the sample draw.
    texts += [" ".join(COLOURS), " ".join(SHAPES), " ".join(RELATIONS)]
    path = train_sentencepiece(texts, tmp_path_factory.mktemp("sp_tokenizer") / "shapes", vocab_size=64)
    return load_tokenizer(path)
