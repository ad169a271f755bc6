"""Forgetting on the language side: a caption task sequence on the demo's synthetic images, shapes captions ("a red
circle left of a blue square") then counting captions ("three red circles"), with the tiny model under ZeRO-3 on 2
ranks: naive fine-tuning, replay, and replay + distillation of the LM's top-k logits.

    python benchmarks/continual_captions.py [--steps-per-task 150] [--seed 0]
    python benchmarks/continual_captions.py --smoke --out /tmp/continual_captions.json   # checks the script

R[i][j] is the validation loss per caption token on task j after task i (lower is better); forgetting is how far
task 0's loss rose from its best. Writes `benchmarks/results/continual_captions.json` (`--out`); the last line
printed is one JSON object with `loss_shapes_after_counts_*` and `forgetting_*` per method. The runs go to
runs/continual-captions-bench/ and the data to data/caption-tasks/, or both under `--work-dir`. `--smoke`: one
job (replay_distill, the method with the most parts) of 2 steps per task on 64 samples per task, in a temporary
folder (benchmarks/smoke.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # also when imported from elsewhere

import smoke  # noqa: E402  (benchmarks/smoke.py)
from continual_digits import train_job  # noqa: E402  (benchmarks/continual_digits.py)
from machine import cpu_model  # noqa: E402

DATA = ROOT / "data" / "caption-tasks"  # --work-dir moves it (main)
TASKS = ("shapes", "counts")
METHODS = {
    "naive": [],
    "replay": ["{name: replay, args: {capacity: 256, ratio: 0.5}}"],
    "replay_distill": ["{name: replay, args: {capacity: 256, ratio: 0.5}}",
                       "{name: distill, args: {target: lm, weight: 1.0, temperature: 1.0, top_k: 8}}"],
}


def prepare(image_size: int = 32, tiny: bool = False) -> str:
    """Both tasks' shards (train 1,024, val 128 each; `tiny`: 64 and 32) and a tokenizer that spells both tasks'
    words."""
    from mmscale.data import ensure_synthetic_dataset, synthetic_words, train_sentencepiece
    from mmscale.data.tokenizer import captions_from_shards

    (n_train, per_train), (n_val, per_val) = ((64, 16), (32, 16)) if tiny else ((1024, 128), (128, 32))
    for i, task in enumerate(TASKS):
        ensure_synthetic_dataset(DATA / task / "train", n_train, per_train, image_size, seed=10 + i, prefix="train",
                                 task=task)
        ensure_synthetic_dataset(DATA / task / "val", n_val, per_val, image_size, seed=20 + i, prefix="val", task=task)
    tok = DATA / "tokenizer.model"
    if not tok.is_file():
        texts = [*captions_from_shards(str(DATA / "shapes" / "train")), " ".join(synthetic_words())]
        train_sentencepiece(texts, DATA / "tokenizer", 96)
    return str(tok)


def main(argv: list[str] | None = None) -> int:
    global DATA
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps-per-task", type=int, default=None, help="default 150 (--smoke: 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                   help="default all (--smoke: replay_distill)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per job")
    smoke.add_smoke_args(p, "continual_captions", work_dir="folder for the data (caption-tasks/) and the runs "
                         "(runs/); default data/caption-tasks/ and runs/continual-captions-bench/")
    args = p.parse_args(argv)
    smoke.check_smoke_paths(p, args)
    if args.out and Path(args.out).is_dir():
        p.error(f"--out {args.out} is a folder: --out names the JSON file (the runs go to --work-dir)")
    args.methods = args.methods or (["replay_distill"] if args.smoke else list(METHODS))
    steps = args.steps_per_task = args.steps_per_task or (2 if args.smoke else 150)
    base = smoke.work_dir(args, "continual_captions", None)
    if base is not None:
        DATA = base / "caption-tasks"
    runs = base / "runs" if base is not None else ROOT / "runs" / "continual-captions-bench"
    tok = prepare(tiny=args.smoke)
    tasks = ", ".join(f"{{name: {t}, max_steps: {steps}, train_shards: {DATA / t / 'train'}, "
                      f"val_shards: {DATA / t / 'val'}}}" for t in TASKS)
    sizes = (["train.eval_batches=1", "train.checkpoint_every=0", "train.warmup_steps=1"] if args.smoke
             else ["train.eval_batches=4", "train.checkpoint_every=100", "train.warmup_steps=10"])
    results = {}
    for m in args.methods:
        out_dir = runs / m
        secs = train_job(ROOT / "configs" / "tiny.yaml", [
            f"output_dir={out_dir}", f"data.tokenizer={tok}", f"continual.tasks=[{tasks}]", "continual.metric=val_loss",
            f"train.max_steps={steps * len(TASKS)}", f"train.seed={args.seed}", "train.global_batch_size=32",
            "train.micro_batch_size=16", "train.lr=3e-3", *sizes, "data.max_text_len=16", "data.num_workers=0",
            "model.train_vision=true", f"callbacks=[{', '.join(METHODS[m])}]"], args.timeout, m)
        summary = json.loads((out_dir / "continual.json").read_text())
        results[m] = {**summary, "seconds": secs}
        R = summary["matrix"]
        print(f"{m:15s} shapes loss after shapes {R[0][0]:.3f}, after counts {R[1][0]:.3f}; counts loss "
              f"{R[1][1]:.3f}; forgetting {summary['average_forgetting']:.3f}  ({secs:.0f} s)", flush=True)
    print(f"\n{'method':16s} {'shapes after shapes':>20s} {'shapes after counts':>20s} {'counts after counts':>20s}")
    for m, r in results.items():
        R = r["matrix"]
        print(f"{m:16s} {R[0][0]:>20.3f} {R[1][0]:>20.3f} {R[1][1]:>20.3f}")
    headline: dict = {"benchmark": "continual_captions"}
    for m, r in results.items():
        headline[f"loss_shapes_after_counts_{m}"] = round(r["matrix"][1][0], 4)
        headline[f"forgetting_{m}"] = round(r["average_forgetting"], 4)
    headline["smoke"] = args.smoke
    json_path = smoke.out_path(args, "continual_captions", base)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(
        {"benchmark": "continual_captions", "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
         "steps_per_task": steps, "seed": args.seed, "methods": {m: METHODS[m] for m in args.methods},
         "results": results, "headline": headline}, indent=2))
    print(json.dumps(headline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
