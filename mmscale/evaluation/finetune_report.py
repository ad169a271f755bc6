"""What fine-tuning changed: losses on the new task and on the old one, before and after.

    python -m mmscale.evaluation.finetune_report --before runs/demo --after runs/demo-finetune [--batches 16]

`--before` is the pretrained run, `--after` the run fine-tuned from it (`model.init_from`). Each is loaded into one
process as training built it (fine-tuning method included, see mmscale.job.runs.build_from_checkpoint) and
evaluated on both runs' validation data: the fine-tuning task's (the new one) and the pretraining task's (the old
one). Per task: the mean loss over all caption tokens and over the words the image decides (for the synthetic
tasks: the count words of `counts`; the colour and shape words of both). A fine-tune that works lowers the first on
the new task; what it costs shows as a rise on the old one. Prints a table and one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from mmscale.evaluation.image_use import word_loss
from mmscale.job.runs import load_run
from mmscale.objectives.captioning import next_token_loss

# the words that only the image decides, per synthetic task
_TASK_WORDS = {
    "counts": {"count words": "COUNTS", "colour and shape words": ("COLOURS", "SHAPES", "SHAPE_PLURALS")},
    "shapes": {"colour and shape words": ("COLOURS", "SHAPES")},
}


def task_words(task: str) -> dict[str, list[str]]:
    from mmscale.data import synthetic

    out = {}
    for label, names in _TASK_WORDS.get(task, {}).items():
        names = (names,) if isinstance(names, str) else names
        out[label] = [w for n in names for w in getattr(synthetic, n)]
    return out


def as_trained(model: torch.nn.Module, cfg: Any) -> torch.nn.Module:
    """The floating-point weights in the precision the run trained in (bf16 runs hold bf16 weights in the engine;
    a one-process build holds fp32), 4-bit storage as it is."""
    if cfg.train.precision == "bf16":
        for p in model.parameters():
            if p.is_floating_point() and type(p).__name__ != "Params4bit":
                p.data = p.data.to(torch.bfloat16)
    return model.eval()


def _cast(batches: Iterable[dict[str, Any]], dtype: torch.dtype) -> Iterator[dict[str, Any]]:
    for batch in batches:
        yield {**batch, "pixel_values": batch["pixel_values"].to(dtype)}


@torch.no_grad()
def caption_loss(model: torch.nn.Module, batches: Iterable[dict[str, Any]]) -> float:
    """Mean next-token loss over every caption token."""
    keys = ("pixel_values", "image_mask", "input_ids", "attention_mask", "media_index", "labels")
    total, n = 0.0, 0
    for batch in batches:
        out = model(**{k: batch[k] for k in keys})
        total, n = total + float(next_token_loss(out.logits, batch["labels"]).sum()), n + int(
            (batch["labels"][:, 1:] != -100).sum())
    return total / max(n, 1)


def report(before: str | Path, after: str | Path, batches: int = 16) -> dict[str, Any]:
    from mmscale.data import EvalLoader

    runs = {"before": load_run(before), "after": load_run(after)}
    tasks = {"new": runs["after"][0], "old": runs["before"][0]}  # the configs whose validation data we use
    rows = []
    for which, task_cfg in tasks.items():
        d = task_cfg.data
        # a run's resolved config names the shards it generated: synthetic data has synthetic_train_samples > 0
        task = d.synthetic_task if d.synthetic_train_samples > 0 else "own data"
        shards = d.val_shards or d.train_shards
        for label in ("all caption tokens", *task_words(task)):
            row = {"task": f"{task} ({which})", "words": label}
            for when, (cfg, model, tok) in runs.items():
                model = as_trained(model, cfg)
                dtype = next(p.dtype for p in model.vision.parameters())
                loader = _cast(EvalLoader(d, tok, cfg.train.micro_batch_size, 0, 1, shards=shards,
                                          max_batches=batches, num_classes=cfg.model.num_classes), dtype)
                row[when] = caption_loss(model, loader) if label == "all caption tokens" else \
                    word_loss(model, loader, tok, task_words(task)[label])
            rows.append(row)
    return {"before": str(before), "after": str(after), "batches": batches, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="output_dir of the pretrained run")
    p.add_argument("--after", required=True, help="output_dir of the run fine-tuned from it")
    p.add_argument("--batches", type=int, default=16, help="validation micro batches per task")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    args = p.parse_args(argv)
    result = report(args.before, args.after, args.batches)
    print(f"{'task':<16}{'loss on':<26}{'before':>8}{'after':>8}")
    for r in result["rows"]:
        print(f"{r['task']:<16}{r['words']:<26}{r['before']:>8.3f}{r['after']:>8.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
