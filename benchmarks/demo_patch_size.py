"""Step time of the demo model with 8 px patches (the preset) against 4 px patches, side by side in one process.

    python benchmarks/demo_patch_size.py [--rounds 5] [--micro-batch 16]

One forward+backward of the whole model (vision tower, resampler, cross-attention, LM, loss) on a random batch of
the demo's shape, one thread, interleaved rounds (8 px, 4 px, 8 px, ...) so that machine noise hits both alike.
Also times the vision tower and resampler alone, to show where the step goes. Prints a table, writes
benchmarks/results/demo_patch_size.json, and prints the headline as one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--out", default=str(Path(__file__).parent / "results/demo_patch_size.json"))
    args = p.parse_args()

    from mmscale.config import load_config
    from mmscale.model import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    root = Path(__file__).resolve().parents[1]
    b = args.micro_batch
    batch = {"pixel_values": torch.randn(b, 1, 3, 64, 64), "image_mask": torch.ones(b, 1, dtype=torch.bool),
             "input_ids": torch.randint(3, 64, (b, 17))}
    batch.update(attention_mask=torch.ones_like(batch["input_ids"]), media_index=torch.zeros_like(batch["input_ids"]),
                 labels=batch["input_ids"])
    models = {patch: build_model(load_config(root / "configs/demo.yaml", [f"model.vision.config.patch_size={patch}"],
                                             check_paths=False).model, vocab_size=64) for patch in (8, 4)}

    def step(model) -> float:
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        return time.perf_counter() - t0

    def tower(model) -> float:
        t0 = time.perf_counter()
        model.encode_media(batch["pixel_values"]).sum().backward()
        return time.perf_counter() - t0

    for m in models.values():  # warm-up
        step(m)
    rows = []
    for r in range(args.rounds):
        for patch, m in models.items():
            rows.append({"round": r, "patch": patch, "step_s": step(m), "tower_s": tower(m)})
    summary = {}
    for patch in models:
        mine = [x for x in rows if x["patch"] == patch]
        summary[patch] = {"step_s": statistics.median(x["step_s"] for x in mine),
                          "tower_s": statistics.median(x["tower_s"] for x in mine),
                          "params": models[patch].param_counts()["total"]}
    print(f"{'patch':>5} {'step s':>8} {'tower+resampler s':>18} {'tower share':>12} {'params':>10}")
    for patch, s in summary.items():
        print(f"{patch:>5} {s['step_s']:>8.3f} {s['tower_s']:>18.3f} {s['tower_s'] / s['step_s']:>12.2f} "
              f"{s['params']:>10,}")
    headline = {"benchmark": "demo_patch_size", "step_s_patch8": summary[8]["step_s"],
                "step_s_patch4": summary[4]["step_s"], "patch4_over_patch8": summary[4]["step_s"] / summary[8]["step_s"],
                "tower_share_patch4": summary[4]["tower_s"] / summary[4]["step_s"]}
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.machine())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({**headline, "rows": rows, "setup": {
        "micro_batch": b, "threads": 1, "cpu_model": cpu, "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d")}}, indent=2))
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
