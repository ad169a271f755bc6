"""Forgetting on the language side: a caption task sequence on the demo's synthetic images, shapes captions ("a red
circle left of a blue square") then counting captions ("three red circles"), with the tiny model under ZeRO-3 on 2
ranks: naive fine-tuning, replay, and replay + distillation of the LM's top-k logits.

    python benchmarks/continual_captions.py [--steps-per-task 150] [--seed 0]

R[i][j] is the validation loss per caption token on task j after task i (lower is better); forgetting is how far
task 0's loss rose from its best. Writes `benchmarks/results/continual_captions.json`; the last line printed is one
JSON object with `loss_shapes_after_counts_*` and `forgetting_*` per method.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from continual_digits import train_job  # noqa: E402  (benchmarks/continual_digits.py)
from machine import cpu_model  # noqa: E402

DATA = ROOT / "data" / "caption-tasks"
TASKS = ("shapes", "counts")
METHODS = {
    "naive": [],
    "replay": ["{name: replay, args: {capacity: 256, ratio: 0.5}}"],
    "replay_distill": ["{name: replay, args: {capacity: 256, ratio: 0.5}}",
                       "{name: distill, args: {target: lm, weight: 1.0, temperature: 1.0, top_k: 8}}"],
}


def prepare(image_size: int = 32) -> str:
    """Both tasks' shards (train 1,024, val 128 each) and a tokenizer that spells both tasks' words."""
    from mmscale.data import ensure_synthetic_dataset, synthetic_words, train_sentencepiece
    from mmscale.data.tokenizer import captions_from_shards

    for i, task in enumerate(TASKS):
        ensure_synthetic_dataset(DATA / task / "train", 1024, 128, image_size, seed=10 + i, prefix="train", task=task)
        ensure_synthetic_dataset(DATA / task / "val", 128, 32, image_size, seed=20 + i, prefix="val", task=task)
    tok = DATA / "tokenizer.model"
    if not tok.is_file():
        texts = [*captions_from_shards(str(DATA / "shapes" / "train")), " ".join(synthetic_words())]
        train_sentencepiece(texts, DATA / "tokenizer", 96)
    return str(tok)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps-per-task", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--out", default=str(ROOT / "runs" / "continual-captions-bench"))
    p.add_argument("--timeout", type=int, default=1800)
    args = p.parse_args()
    tok = prepare()
    steps = args.steps_per_task
    tasks = ", ".join(f"{{name: {t}, max_steps: {steps}, train_shards: {DATA / t / 'train'}, "
                      f"val_shards: {DATA / t / 'val'}}}" for t in TASKS)
    results = {}
    for m in args.methods:
        out_dir = Path(args.out) / m
        secs = train_job(ROOT / "configs" / "tiny.yaml", [
            f"output_dir={out_dir}", f"data.tokenizer={tok}", f"continual.tasks=[{tasks}]", "continual.metric=val_loss",
            f"train.max_steps={steps * len(TASKS)}", f"train.seed={args.seed}", "train.global_batch_size=32",
            "train.micro_batch_size=16", "train.lr=3e-3", "train.warmup_steps=10", "train.checkpoint_every=100",
            "train.eval_batches=4", "data.max_text_len=16", "data.num_workers=0", "model.train_vision=true",
            f"callbacks=[{', '.join(METHODS[m])}]"], args.timeout, m)
        summary = json.loads((out_dir / "continual.json").read_text())
        results[m] = {**summary, "seconds": secs}
        R = summary["matrix"]
        print(f"{m:15s} shapes loss after shapes {R[0][0]:.3f}, after counts {R[1][0]:.3f}; counts loss "
              f"{R[1][1]:.3f}; forgetting {summary['average_forgetting']:.3f}  ({secs:.0f} s)", flush=True)
    print(f"\n{'method':16s} {'shapes after shapes':>20s} {'shapes after counts':>20s} {'counts after counts':>20s}")
    for m, r in results.items():
        R = r["matrix"]
        print(f"{m:16s} {R[0][0]:>20.3f} {R[1][0]:>20.3f} {R[1][1]:>20.3f}")
    headline = {}
    for m, r in results.items():
        headline[f"loss_shapes_after_counts_{m}"] = round(r["matrix"][1][0], 4)
        headline[f"forgetting_{m}"] = round(r["average_forgetting"], 4)
    results_dir = ROOT / "benchmarks" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "continual_captions.json").write_text(json.dumps(
        {"benchmark": "continual_captions", "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
         "steps_per_task": steps, "seed": args.seed, "methods": {m: METHODS[m] for m in args.methods},
         "results": results, "headline": headline}, indent=2))
    print(json.dumps(headline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
