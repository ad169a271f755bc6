"""Class-incremental learning on real handwritten digits: naive fine-tuning, replay, EWC, replay + distillation,
task adapters (dynamic architecture), and joint training as the upper bound, each a real 2-rank DeepSpeed ZeRO-3 job
of `configs/continual-digits.yaml`.

    python benchmarks/continual_digits.py [--seeds 0 1 2] [--methods naive replay ewc replay_distill task_adapters joint]
    python benchmarks/continual_digits.py --prepare-only      # just the shards and tokenizer (data/digits-tasks/)
    python benchmarks/continual_digits.py --smoke --out /tmp/continual_digits.json   # checks the script (~1 min)

The data: scikit-learn's 1,797 handwritten digit scans (shipped with the package), 4 of every 5 scans of each digit
for training and the fifth for validation, written to WebDataset shards with mmscale's writer; five tasks of two
digits each ({0,1}, {2,3}, ...). While a task trains, the head predicts only the digits seen so far (class-
incremental: no task id at test time). Every method has the same step budget: `max_steps` per task (joint: five
times that, on all digits at once). After each task every task is evaluated (R[i][j]: accuracy on task j after
task i); the summary is the final average accuracy (mean of R's last row) and the average forgetting (mean over the
first four tasks of the best earlier accuracy minus the final one), mean and spread over the seeds.

`task_adapters` (the callback of that name: a LoRA adapter and a head per task, the shared weights trained in the
first task only) is measured both ways. Task-incremental, its R: each task evaluated through its own module, with
its task id. Class-incremental, with no task id: the expert gate (the most confident module wins) over all ten
digits, `gate_accuracy`, and how often it picked the right task, `gate_task_accuracy`. It also reports the
parameters each task adds (`params_per_task`).

Writes `benchmarks/results/continual_digits.json` (`--out`) and `continual_digits.png` beside it (R of each method,
seed 0); the last line printed is one JSON object with forgetting_* and accuracy_* per method. The runs go to
runs/continual-digits-bench/ and the data to data/digits-tasks/, or both under `--work-dir`. `--smoke`: one job
(seed 0, replay_distill: the method with the most parts; add `--methods replay_distill joint` for the other way a
result is read), the first two tasks, 2 steps per task, in a temporary folder (benchmarks/smoke.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # also when imported from elsewhere (continual_captions.py, tests)

import smoke  # noqa: E402  (benchmarks/smoke.py)
from machine import cpu_model  # noqa: E402  (benchmarks/machine.py)

CONFIG = ROOT / "configs" / "continual-digits.yaml"
DATA = ROOT / "data" / "digits-tasks"  # the config's data.tokenizer points here; --work-dir moves it (main)
ALL_TASKS = [(a, a + 1) for a in range(0, 10, 2)]
TASKS = list(ALL_TASKS)  # the tasks trained: --smoke keeps the first two (main)
METHODS = {
    "naive": [],
    "replay": ["{name: replay, args: {capacity: 500, ratio: 1.0}}"],
    "ewc": ["{name: ewc, args: {lam: 10000.0, fisher_batches: 8}}"],
    "replay_distill": ["{name: replay, args: {capacity: 500, ratio: 1.0}}",
                       "{name: distill, args: {weight: 0.3, temperature: 1.0}}"],
    "task_adapters": ["{name: task_adapters, args: {r: 8}}"],
    "joint": [],
}
EXTRA: list[str] = []  # overrides for every job (--set)


def prepare(image_size: int = 32) -> None:
    """The five tasks' shards, all digits' shards (joint) and a tokenizer (the LM reads only <image> and eos)."""
    from mmscale.data.digits import write_digits_shards
    from mmscale.data.tokenizer import train_sentencepiece

    stamp = DATA / f"prepared-{image_size}.json"
    if stamp.is_file():
        return
    shutil.rmtree(DATA, ignore_errors=True)
    counts = {}
    for a, b in ALL_TASKS:  # all of them whatever runs: the stamp says the folder is complete
        for split in ("train", "val"):
            counts[f"{a}{b}/{split}"] = write_digits_shards(DATA / f"{a}{b}" / split, split, [a, b], image_size,
                                                            samples_per_shard=40 if split == "train" else 20)
    for split in ("train", "val"):
        counts[f"all/{split}"] = write_digits_shards(DATA / "all" / split, split, None, image_size,
                                                     samples_per_shard=40 if split == "train" else 20)
    train_sentencepiece(["zero one two three four five six seven eight nine digit"] * 10, DATA / "tokenizer", 32)
    stamp.write_text(json.dumps(counts, indent=2))


def val_counts() -> dict[int, int]:
    """Validation scans per digit (joint training's per-task accuracy is weighted by them)."""
    from sklearn.datasets import load_digits

    targets = [int(t) for t in load_digits().target]
    return {d: targets.count(d) // 5 for d in range(10)}


def train_job(config: Path, overrides: list[str], timeout: int, what: str) -> float:
    """`deepspeed --num_gpus 2 launchers/train.py --config CONFIG --overwrite OVERRIDES`; returns its seconds."""
    cmd = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", "2", "--master_port", str(29600 + os.getpid() % 300),
           str(ROOT / "launchers/train.py"), "--config", str(config), "--overwrite", *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def run(method: str, seed: int, out: Path, steps: int, timeout: int) -> dict:
    """One 2-rank job; returns its final row, average accuracy, forgetting and matrix."""
    out_dir = out / f"{method}-seed{seed}"
    args = [f"output_dir={out_dir}", f"train.seed={seed}", f"callbacks=[{', '.join(METHODS[method])}]", *EXTRA]
    if method == "joint":
        args += ["continual.tasks=[]", f"data.train_shards={DATA / 'all/train'}", f"data.val_shards={DATA / 'all/val'}",
                 f"train.max_steps={steps * len(TASKS)}", "train.eval_batches=64"]
    else:
        tasks = ", ".join(f"{{name: '{a}-{b}', classes: [{a}, {b}], max_steps: {steps}, "
                          f"train_shards: {DATA / f'{a}{b}/train'}, val_shards: {DATA / f'{a}{b}/val'}}}"
                          for a, b in TASKS)
        args += [f"continual.tasks=[{tasks}]", f"train.max_steps={steps * len(TASKS)}"]
    secs = train_job(CONFIG, args, timeout, f"{method} seed {seed}")
    if method == "joint":  # the final validation's per-digit accuracy, weighted into per-task accuracies
        records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
        per_digit = [r for r in records if "val_acc_per_class" in r][-1]["val_acc_per_class"]
        n = val_counts()
        row = [sum(per_digit[d] * n[d] for d in t) / sum(n[d] for d in t) for t in TASKS]
        return {"final_row": row, "average_accuracy": sum(row) / len(row), "average_forgetting": None,
                "matrix": None, "seconds": secs}
    summary = json.loads((out_dir / "continual.json").read_text())
    result = {"final_row": summary["matrix"][-1], "average_accuracy": summary["average_accuracy"],
              "average_forgetting": summary["average_forgetting"], "matrix": summary["matrix"], "seconds": secs}
    if method == "task_adapters":  # the expert gate after the last task, and the growth per task
        records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
        gate = [r for r in records if "gate_accuracy" in r][-1]
        result.update(gate_accuracy=gate["gate_accuracy"], gate_task_accuracy=gate["gate_task_accuracy"],
                      params_per_task=int(next(r["params_per_task"] for r in records if "params_per_task" in r)))
    return result


def _mean_sd(values: list[float | None]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in results if results[m] and results[m][0]["matrix"] is not None]
    fig, axes = plt.subplots(1, len(methods), figsize=(3.6 * len(methods), 3.4), squeeze=False)
    names = [f"{a}-{b}" for a, b in TASKS]
    for ax, m in zip(axes[0], methods):
        R = results[m][0]["matrix"]
        ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
        for i, row in enumerate(R):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
        ax.set_xticks(range(len(names)), names, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_title(f"{m}: final avg {results[m][0]['average_accuracy']:.2f}", fontsize=9)
        ax.set_xlabel("evaluated on task", fontsize=8)
    axes[0][0].set_ylabel("after training task", fontsize=8)
    fig.suptitle("Class-incremental digits, accuracy R[i][j] (seed 0, 2 ranks, ZeRO-3)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    global DATA
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--smoke: 0)")
    p.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                   help="default all (--smoke: replay_distill)")
    p.add_argument("--steps-per-task", type=int, default=None, help="default 120 (--smoke: 2)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per job")
    p.add_argument("--prepare-only", action="store_true")
    p.add_argument("--set", nargs="*", default=[], help="config overrides for every job (section.key=value)")
    smoke.add_smoke_args(p, "continual_digits", work_dir="folder for the data (digits-tasks/) and the runs (runs/); "
                         "default data/digits-tasks/ and runs/continual-digits-bench/")
    args = p.parse_args(argv)
    smoke.check_smoke_paths(p, args)
    if args.out and Path(args.out).is_dir():
        p.error(f"--out {args.out} is a folder: --out names the JSON file (the runs go to --work-dir)")
    args.seeds = args.seeds or ([0] if args.smoke else [0, 1, 2])
    args.methods = args.methods or (["replay_distill"] if args.smoke else list(METHODS))
    args.steps_per_task = args.steps_per_task or (2 if args.smoke else 120)
    base = smoke.work_dir(args, "continual_digits", None)
    if base is not None:
        DATA = base / "digits-tasks"
    EXTRA.append(f"data.tokenizer={DATA / 'tokenizer.model'}")  # the config's points at data/digits-tasks/
    if args.smoke:
        del TASKS[2:]
        EXTRA.extend(["train.eval_batches=2", "train.checkpoint_every=0"])
    EXTRA.extend(args.set)
    prepare()
    if args.prepare_only:
        print(f"shards and tokenizer under {DATA}")
        return 0
    out = base / "runs" if base is not None else ROOT / "runs" / "continual-digits-bench"
    results: dict[str, list[dict]] = {m: [] for m in args.methods}
    for seed in args.seeds:
        for m in args.methods:
            r = run(m, seed, out, args.steps_per_task, args.timeout)
            results[m].append(r)
            print(f"{m:15s} seed {seed}: final row {[round(v, 3) for v in r['final_row']]}, average accuracy "
                  f"{r['average_accuracy']:.3f}, forgetting {r['average_forgetting']}, {r['seconds']:.0f} s",
                  flush=True)
    summary = {}
    print(f"\n{'method':16s} {'final avg accuracy':>20s} {'avg forgetting':>16s}   (mean ± sd over seeds "
          f"{args.seeds})")
    for m, rs in results.items():
        acc, acc_sd = _mean_sd([r["average_accuracy"] for r in rs])
        fgt, fgt_sd = _mean_sd([r["average_forgetting"] for r in rs])
        summary[m] = {"accuracy": acc, "accuracy_sd": acc_sd, "forgetting": fgt, "forgetting_sd": fgt_sd,
                      "seeds": args.seeds, "runs": rs}
        fg = f"{fgt:.3f} ± {fgt_sd:.3f}" if fgt is not None else "-"
        print(f"{m:16s} {acc:>12.3f} ± {acc_sd:.3f} {fg:>16s}" + ("   (task id given)" if m == "task_adapters" else ""))
        if m == "task_adapters":
            gate, right = _mean_sd([r["gate_accuracy"] for r in rs]), _mean_sd([r["gate_task_accuracy"] for r in rs])
            print(f"{'  no task id':16s} {gate[0]:>12.3f} ± {gate[1]:.3f}   (expert gate; task chosen right "
                  f"{right[0]:.3f}; {rs[0]['params_per_task']:,} parameters per task)")
    headline: dict = {"benchmark": "continual_digits"}
    for m in ("naive", "replay", "ewc", "replay_distill", "task_adapters"):
        if m in summary:
            headline[f"forgetting_{m}"] = round(summary[m]["forgetting"], 4)
    for m in ("naive", "replay", "ewc", "replay_distill", "task_adapters", "joint"):
        if m in summary:
            headline[f"accuracy_{m}"] = round(summary[m]["accuracy"], 4)
    if "task_adapters" in summary:  # class-incremental through the expert gate (no task id)
        runs = summary["task_adapters"]["runs"]
        for key in ("gate_accuracy", "gate_task_accuracy"):
            headline[f"{key}_task_adapters"] = round(statistics.fmean(r[key] for r in runs), 4)
        headline["params_per_task"] = runs[0]["params_per_task"]
    # (None where the denominator is 0: a smoke run's few steps can leave joint at 0 accuracy or naive at 0 forgetting)
    if "replay" in summary and "joint" in summary:
        headline["replay_over_joint"] = (round(summary["replay"]["accuracy"] / summary["joint"]["accuracy"], 4)
                                         if summary["joint"]["accuracy"] else None)
    if "replay" in summary and "naive" in summary:
        headline["replay_forgetting_over_naive"] = (round(summary["replay"]["forgetting"] /
                                                          summary["naive"]["forgetting"], 4)
                                                    if summary["naive"]["forgetting"] else None)
    headline["smoke"] = args.smoke
    json_path = smoke.out_path(args, "continual_digits", base)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(
        {"benchmark": "continual_digits", "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
         "config": str(CONFIG.relative_to(ROOT)), "tasks": TASKS, "overrides": EXTRA,
         "steps_per_task": args.steps_per_task, "methods": {m: METHODS[m] for m in args.methods},
         "summary": summary, "headline": headline}, indent=2))
    plot(results, json_path.with_suffix(".png"))
    print(json.dumps(headline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
