"""Does the model look at the image? Caption loss on colour and shape words, true images vs images shuffled.

In the synthetic shapes captions ("a red circle left of a blue square") colours and shapes are drawn uniformly and
independently, so a model that ignores the image can at best predict them at chance (ln 6 nats for a colour,
ln 4 for a shape). We measure the mean next-token loss on exactly those words with each sample's own image and
with the images rolled by one across the batch (every sample gets another sample's image). A model that uses the
image has a clearly lower loss with the true images.

    python -m mmscale.evaluation.image_use --run runs/demo [--batches 16]

Loads the run's newest checkpoint that verifies, with the config recorded in it, into one process (any ZeRO
stage); prints a table and one JSON object on its last line.

`word_loss(model, batches, tokenizer, words)` is the same measure for any one set of words (e.g. the counts task's
count words), with true or shuffled images.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch


def word_token_ids(tokenizer: Any, words: list[str]) -> set[int]:
    """Ids of the single tokens that spell each word (as it appears mid-caption); multi-token words are refused."""
    ids = set()
    for w in words:
        enc = tokenizer.encode(f"a {w}")[1:] or tokenizer.encode(w)
        if len(enc) != 1:
            raise ValueError(f"word {w!r} is {len(enc)} tokens under this tokenizer; the probe needs one")
        ids.add(enc[0])
    return ids


_INPUT_KEYS = ("image_mask", "input_ids", "attention_mask", "media_index", "labels")


def token_loss(model: Any, batch: dict[str, Any], pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, L-1) next-token loss of `batch` with `pixel_values` for its images: [b, t] predicts labels[b, t + 1]."""
    from mmscale.objectives.captioning import next_token_loss

    return next_token_loss(model(pixel_values=pixel_values, **{k: batch[k] for k in _INPUT_KEYS}).logits,
                           batch["labels"])


@torch.no_grad()
def word_loss(model: Any, batches: Any, tokenizer: Any, words: Iterable[str], shuffle_images: bool = False) -> float:
    """Mean next-token loss (nats) on the target tokens that are one of `words` (each must be one token, see
    `word_token_ids`), over one pass of `batches`: e.g. the counts task's `COUNTS`, or `COLOURS` + `SHAPES` +
    `SHAPE_PLURALS`. `shuffle_images` rolls the images by one across each batch, as `image_use` does; batches of one
    sample are skipped either way, so both measure the same tokens (and `image_use`'s). The model is used as given
    (put it in eval mode first)."""
    words = sorted(set(words))
    ids = torch.tensor(sorted(word_token_ids(tokenizer, words)))
    total, n = 0.0, 0
    for batch in batches:
        pixels = batch["pixel_values"]
        if pixels.shape[0] < 2:  # nothing to roll the images across
            continue
        if shuffle_images:
            pixels = pixels.roll(1, dims=0)
        keep = torch.isin(batch["labels"][:, 1:], ids)
        if keep.any():
            total += float(token_loss(model, batch, pixels)[keep].sum())
            n += int(keep.sum())
    if n == 0:
        raise ValueError(f"no tokens of {words} in the evaluated batches")
    return total / n


@torch.no_grad()
def image_use(model: Any, batches: Any, word_sets: dict[str, set[int]]) -> dict[str, dict[str, Any]]:
    """Per word set: mean loss on target tokens in the set, with true images and with images rolled across the
    batch. One forward pass per batch and image order serves every set.

    Also split by mention: in "a red circle left of a blue square" the first colour is ambiguous even with the
    image (either object may be named first: ln 2 at best), the second is then determined by the image.
    """
    parts = ("all", "first", "second")
    sums = {(w, name, part): 0.0 for w in word_sets for name in ("true", "shuffled") for part in parts}
    counts = {(w, part): 0 for w in word_sets for part in parts}
    ids = {w: torch.tensor(sorted(v)) for w, v in word_sets.items()}
    for batch in batches:
        if batch["pixel_values"].shape[0] < 2:  # nothing to roll the images across
            continue
        target = batch["labels"][:, 1:]
        masks = {}
        for w, w_ids in ids.items():
            keep = torch.isin(target, w_ids)
            first = keep & (keep.cumsum(dim=1) == 1)
            masks[w] = {"all": keep, "first": first, "second": keep & ~first}
            for part, mask in masks[w].items():
                counts[(w, part)] += int(mask.sum())
        for name, pixels in (("true", batch["pixel_values"]), ("shuffled", batch["pixel_values"].roll(1, dims=0))):
            losses = token_loss(model, batch, pixels)
            for w, by_part in masks.items():
                for part, mask in by_part.items():
                    sums[(w, name, part)] += float(losses[mask].sum())

    def summary(w: str, part: str) -> dict[str, float]:
        n = counts[(w, part)]
        if n == 0:
            raise ValueError(f"no {w} tokens ({part} mention) in the evaluated batches")
        true, shuffled = sums[(w, "true", part)] / n, sums[(w, "shuffled", part)] / n
        return {"loss_true_images": true, "loss_shuffled_images": shuffled, "ratio": shuffled / true, "tokens": n}

    return {w: {**summary(w, "all"), "first_mention": summary(w, "first"), "second_mention": summary(w, "second")}
            for w in word_sets}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="output_dir of a training run")
    p.add_argument("--batches", type=int, default=16, help="validation micro batches to evaluate")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    args = p.parse_args(argv)

    from mmscale.data import COLOURS, SHAPES, EvalLoader
    from mmscale.job.runs import load_run

    try:
        cfg, model, tokenizer = load_run(args.run)
    except (OSError, ValueError) as e:  # RunOpenError (a ValueError): none verifies, or the one named does not
        print(f"error: {e}", file=sys.stderr)
        return 2
    shards = cfg.data.val_shards or cfg.data.train_shards
    loader = EvalLoader(cfg.data, tokenizer, cfg.train.micro_batch_size, 0, 1, shards=shards,
                        max_batches=args.batches, num_classes=cfg.model.num_classes)
    colours, shapes = word_token_ids(tokenizer, list(COLOURS)), word_token_ids(tokenizer, list(SHAPES))
    r = image_use(model, loader, {"colours": colours, "shapes": shapes, "colours_and_shapes": colours | shapes})
    print(f"{'words':<24}{'true images':>12}{'shuffled':>10}{'chance':>8}{'tokens':>8}")
    for name, chance in (("colours", math.log(len(COLOURS))), ("shapes", math.log(len(SHAPES))),
                         ("colours_and_shapes", float("nan"))):
        w = r[name]
        rows = ((name, w), ("  first mention", w["first_mention"]), ("  second mention", w["second_mention"]))
        for label, part in rows:
            print(f"{label:<24}{part['loss_true_images']:>12.3f}{part['loss_shuffled_images']:>10.3f}{chance:>8.3f}"
                  f"{part['tokens']:>8d}")
    result = {"run": str(args.run), **r}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
