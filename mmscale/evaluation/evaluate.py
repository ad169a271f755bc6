"""Evaluate a trained model on test shards, alone or against a base model (before / after fine-tuning).

    python launchers/evaluate.py --checkpoint RUN_OR_CHECKPOINT [--shards SPEC | --config CFG] [--batches 32]
                                 [--compare BASE] [--out DIR] [--task NAME]

What it measures, over one pass of the shards (the same batches for every model):

- `loss` (mean next-token loss per caption token, nats), `perplexity` (its exp), `token_accuracy` (the share of
  caption tokens the model's argmax predicts);
- per word class where the data says which words the image decides (the synthetic tasks: colours and shapes, and
  count words for `counts`): loss and accuracy on those tokens;
- image use: the same losses with the images rolled by one across each batch (every caption gets another
  sample's image); a model that looks at the image does clearly worse with the wrong one;
- with a classification head and `.cls` labels: `cls_accuracy`, per class.

`--checkpoint` is a run directory (its newest checkpoint that verifies against its manifest; a damaged one is
skipped with a warning) or one checkpoint directory inside a run (`RUN/checkpoints/step_00000400`, which must
verify). The model is built in this process from the config recorded with those weights
(mmscale.job.runs.open_run) as training built it (fine-tuning method, frozen weights from their sources; see
mmscale.job.runs.build_from_checkpoint), in the run's precision.
The test data: `--shards`, else the `data.val_shards` of `--config`, else the run's own validation shards.
A run with per-task modules (the `task_adapters` callback) evaluates with the module and classes of `--task NAME`,
which it then requires. `--compare BASE` evaluates BASE on the same batches and writes `report.json` and `report.md` (a before/after table)
into `--out` (default `{run}/eval`); the last line printed is the JSON result.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable

import torch

from mmscale.evaluation.finetune_report import as_trained
from mmscale.evaluation.image_use import word_token_ids
from mmscale.job.runs import load_run
from mmscale.media import bind_media, media_input_keys
from mmscale.objectives.captioning import next_token_loss

_INPUTS = ("pixel_values", "image_mask", "input_ids", "attention_mask", "media_index", "labels")


def split_checkpoint(path: str | Path) -> tuple[Path, Path | None]:
    """(run directory, checkpoint directory or None for the newest) of a run or one of its checkpoints."""
    path = Path(path)
    if (path / "config.yaml").is_file():
        return path, None
    if path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file():
        return path.parent.parent, path  # (verified when it is opened: mmscale.job.runs.open_run)
    raise FileNotFoundError(f"--checkpoint {str(path)!r}: neither a run directory (with config.yaml) nor a checkpoint "
                            f"inside one (RUN/checkpoints/step_N); give the run's output_dir")


def word_classes(cfg: Any) -> dict[str, list[str]]:
    """The words the image decides, by class, for data mmscale generated (empty for other data)."""
    from mmscale.data import synthetic

    d = cfg.data  # a run's resolved config names the shards it generated; synthetic_train_samples says it did
    if d.synthetic_train_samples <= 0:
        return {}
    if d.synthetic_task == "counts":
        return {"count": list(synthetic.COUNTS), "colour": list(synthetic.COLOURS),
                "shape": list(synthetic.SHAPES) + list(synthetic.SHAPE_PLURALS)}
    return {"colour": list(synthetic.COLOURS), "shape": list(synthetic.SHAPES)}


class _Sums:
    """Loss and right-count sums over a set of tokens, for true and shuffled images."""

    def __init__(self) -> None:
        self.loss = {"true": 0.0, "shuffled": 0.0}
        self.right = {"true": 0.0, "shuffled": 0.0}
        self.n = 0

    def result(self) -> dict[str, float] | None:
        if not self.n:
            return None
        loss = self.loss["true"] / self.n
        return {"loss": loss, "accuracy": self.right["true"] / self.n, "tokens": self.n,
                "loss_shuffled_images": self.loss["shuffled"] / self.n,
                "accuracy_shuffled_images": self.right["shuffled"] / self.n}


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, batches: Iterable[dict[str, Any]], tokenizer: Any,
                   classes: dict[str, list[str]]) -> dict[str, Any]:
    """Every metric of the module doc over one pass of `batches` (put the model in eval mode first)."""
    dtype = next(p.dtype for p in model.vision.parameters())
    ids = {name: torch.tensor(sorted(word_token_ids(tokenizer, words))) for name, words in classes.items()}
    sums = {"all": _Sums(), **{name: _Sums() for name in classes}}
    cls_right = cls_n = 0
    per_class: dict[int, list[int]] = {}
    media_keys = media_input_keys()
    for batch in batches:
        target = batch["labels"][:, 1:]
        masks = {"all": target != -100, **{name: torch.isin(target, i) for name, i in ids.items()}}
        for name, m in masks.items():
            sums[name].n += int(m.sum())
        # the other media's tensors (mmscale.media), floats in the model's dtype; "shuffled" rolls every medium's
        # items across the batch as it does the images
        media = {k: (batch[k].to(dtype) if batch[k].is_floating_point() else batch[k]) for k in media_keys
                 if k in batch}
        pixels = batch["pixel_values"].to(dtype)
        for which, px in (("true", pixels), ("shuffled", pixels.roll(1, dims=0))):
            shown = media if which == "true" else {k: (v.roll(1, dims=0) if k.endswith("_values") else v)
                                                   for k, v in media.items()}
            out = model(**{**{k: batch[k] for k in _INPUTS}, "pixel_values": px}, **shown,
                        **({"class_labels": batch["class_labels"]} if which == "true" and _has_head(model) else {}))
            token_loss = next_token_loss(out.logits, batch["labels"])
            right = (out.logits[:, :-1].argmax(-1) == target).float()
            for name, m in masks.items():
                sums[name].loss[which] += float(token_loss[m].sum())
                sums[name].right[which] += float(right[m].sum())
            if which == "true" and _has_head(model):
                labels = batch["class_labels"]
                valid = labels != -100
                pred = out.terms["classification"]["logits"].argmax(-1)
                cls_right += int(((pred == labels) & valid).sum())
                cls_n += int(valid.sum())
                for label, ok in zip(labels[valid].tolist(), (pred == labels)[valid].tolist()):
                    per_class.setdefault(label, [0, 0])
                    per_class[label][0] += int(ok)
                    per_class[label][1] += 1
    whole = sums.pop("all").result()
    if whole is None:
        raise ValueError("no caption tokens in the evaluated batches (classification-only data has none; the "
                         "classification metrics need captions too here: give shards with .txt members)")
    result: dict[str, Any] = {
        "loss": whole["loss"], "perplexity": math.exp(min(whole["loss"], 50.0)), "token_accuracy": whole["accuracy"],
        "tokens": whole["tokens"], "image_use": {"loss_true_images": whole["loss"],
                                                 "loss_shuffled_images": whole["loss_shuffled_images"]},
        "words": {name: s.result() for name, s in sums.items() if s.n},
    }
    if cls_n:
        result["cls_accuracy"] = cls_right / cls_n
        result["cls_accuracy_per_class"] = {str(k): r / n for k, (r, n) in sorted(per_class.items())}
    return result


def _has_head(model: torch.nn.Module) -> bool:
    return "classification" in model.objectives


def _batches(cfg: Any, tokenizer: Any, shards: str, n: int) -> list[dict[str, Any]]:
    from mmscale.data import EvalLoader

    return list(EvalLoader(cfg.data, tokenizer, cfg.train.micro_batch_size, 0, 1, shards=shards, max_batches=n,
                           num_classes=cfg.model.num_classes, media=bind_media(cfg, tokenizer)))


def test_shards(run_cfg: Any, shards: str | None, config: str | None) -> tuple[str, Any]:
    """(shard spec, the config whose data section describes them)."""
    if shards:
        return shards, run_cfg
    if config:
        from mmscale.job.preflight import load_config

        cfg = load_config(config, check_paths=False)
        spec = cfg.data.val_shards or cfg.data.train_shards
        if not spec:
            raise ValueError(f"--config {config}: names no data.val_shards or data.train_shards; give --shards")
        return spec, cfg
    spec = run_cfg.data.val_shards or run_cfg.data.train_shards
    if not spec:
        raise ValueError("the run's config names no validation shards; give --shards or --config")
    return spec, run_cfg


def evaluate(checkpoint: str | Path, shards: str | None = None, config: str | None = None, batches: int = 32,
             compare: str | Path | None = None, task: str | None = None) -> dict[str, Any]:
    """The result of the module doc: {"models": {"model": {...}, "base": {...}}, "shards": ..., ...}. `task`: the
    task whose module a task_adapters model evaluates with (its classes too)."""
    from mmscale.callbacks.task_adapters import choose_task, task_names

    run, ckpt = split_checkpoint(checkpoint)
    cfg, model, tok = load_run(run, ckpt)
    choose_task(model, task, "--task")
    spec, data_cfg = test_shards(cfg, shards, config)
    data = _batches(data_cfg, tok, spec, batches)  # the same batches for every model evaluated
    classes = word_classes(data_cfg)
    models = {"model": (str(checkpoint), cfg, model, tok)}
    if compare:
        base_run, base_ckpt = split_checkpoint(compare)
        base_cfg, base_model, base_tok = load_run(base_run, base_ckpt)
        if task is not None and task_names(base_model):
            choose_task(base_model, task, "--task")
        if base_tok.vocab_size != tok.vocab_size:
            raise ValueError(f"--compare {compare}: its tokenizer has {base_tok.vocab_size} tokens, the model's "
                             f"{tok.vocab_size}: both must read the same token ids")
        models = {"base": (str(compare), base_cfg, base_model, base_tok), **models}
    result = {**({"task": task} if task is not None else {}), "shards": spec, "batches": len(data), "samples": sum(int(b["input_ids"].shape[0]) for b in data),
              "word_classes": classes, "models": {}}
    for name, (where, c, m, _) in models.items():
        result["models"][name] = {"checkpoint": where, **evaluate_model(as_trained(m, c), data, tok, classes)}
    return result


def _rows(metrics: dict[str, Any]) -> list[tuple[str, float]]:
    rows = [("loss (nats/token)", metrics["loss"]), ("perplexity", metrics["perplexity"]),
            ("token accuracy", metrics["token_accuracy"]),
            ("loss, shuffled images", metrics["image_use"]["loss_shuffled_images"])]
    for name, w in metrics["words"].items():
        rows += [(f"{name} words: loss", w["loss"]), (f"{name} words: accuracy", w["accuracy"]),
                 (f"{name} words: accuracy, shuffled images", w["accuracy_shuffled_images"])]
    if "cls_accuracy" in metrics:
        rows.append(("classification accuracy", metrics["cls_accuracy"]))
    return rows


def markdown(result: dict[str, Any]) -> str:
    names = list(result["models"])
    rows = {name: dict(_rows(m)) for name, m in result["models"].items()}
    labels = [label for label, _ in _rows(result["models"][names[-1]])]
    head = " | ".join(f"{n} ({result['models'][n]['checkpoint']})" for n in names)
    lines = [f"Evaluated on `{result['shards']}`: {result['samples']} samples in {result['batches']} batches.", "",
             f"| metric | {head} |", "|---" * (len(names) + 1) + "|"]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(f"{rows[n].get(label, float('nan')):.4f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a run's output_dir, or a checkpoint directory in it")
    p.add_argument("--shards", default=None, help="test shards (brace pattern, folder or list file)")
    p.add_argument("--config", default=None, help="a job config whose data.val_shards are the test shards")
    p.add_argument("--batches", type=int, default=32, help="micro batches of the test shards (at most)")
    p.add_argument("--compare", default=None, help="a base run or checkpoint to evaluate beside it")
    p.add_argument("--out", default=None, help="where report.json and report.md go (default {run}/eval)")
    p.add_argument("--task", default=None, help="a task_adapters run: the task whose module (and classes) evaluate")
    args = p.parse_args(argv)
    try:
        result = evaluate(args.checkpoint, args.shards, args.config, args.batches, args.compare, args.task)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else split_checkpoint(args.checkpoint)[0] / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (out / "report.md").write_text(table)
    print(table)
    print(f"wrote {out / 'report.json'} and {out / 'report.md'}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
