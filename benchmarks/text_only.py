"""Text-only samples in a mixture (`data.text_only`): do they train, and do they keep the LM's language?

    python benchmarks/text_only.py [--steps 300] [--seeds 0 1]
    python benchmarks/text_only.py --smoke --out /tmp/text_only.json       # checks the script (~1 min)

Two runs of the tiny config from scratch through the real entry point (`python launchers/train.py`, one process),
side by side, with the same steps and seed:
- `without`: a mixture of captions (the demo's coloured shapes) 0.75 and interleaved documents (several images and
  their captions in one text) 0.25;
- `with`: the same captions 0.6 and documents 0.2, plus plain text 0.2: sentences about the same shapes written
  in another grammar ("there are three circles and the circle is red"), as samples with a `.txt` and no image.

Each run validates on held-out plain text (other sentences of that grammar; text-only samples) and on held-out
captions. The figures: `heldout_text_loss_with` / `_without` (the LM loss per token on the held-out text) and
their ratio, and the caption loss of both (what the images teach is kept). Writes benchmarks/results/text_only.json
(`--out`); the last line printed is one JSON object with those figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import smoke  # noqa: E402
from machine import cpu_model  # noqa: E402

CONFIG = ROOT / "configs" / "tiny.yaml"


def plain_sentence(rng: random.Random) -> str:
    """A sentence about the demo's shapes in a grammar no caption uses."""
    from mmscale.data.synthetic import COLOURS, COUNTS, SHAPES

    colour, shape, other = rng.choice(COLOURS), rng.choice(SHAPES), rng.choice(SHAPES)
    count = rng.choice(COUNTS[1:])
    templates = [
        f"there are {count} {other}s and the {shape} is {colour}",
        f"the {shape} is {colour} and the {other} is not",
        f"every {shape} here is {colour}",
        f"{count} {shape}s are {colour} today",
    ]
    return rng.choice(templates)


def grammar_words() -> list[str]:
    from mmscale.data.synthetic import COLOURS, COUNTS, SHAPES

    return ["there", "are", "and", "the", "is", "not", "every", "here", "today", *COLOURS, *COUNTS, *SHAPES,
            *(f"{s}s" for s in SHAPES)]


def make_data(work: Path, n_captions: int, n_docs: int, n_text: int, n_val: int) -> dict[str, str]:
    """Caption, document and plain-text shards (train and held-out) and a tokenizer spelling every word."""
    from mmscale.data import make_shapes_dataset, train_sentencepiece
    from mmscale.data.interleaved import make_document_files, synthetic_document_words, write_documents
    from mmscale.data.shards import write_tar_shards
    from mmscale.data.synthetic import synthetic_words
    from mmscale.data.tokenizer import captions_from_shards

    make_shapes_dataset(work / "captions", n_captions, samples_per_shard=max(1, n_captions // 4), image_size=32,
                        seed=1, prefix="train")
    make_shapes_dataset(work / "captions", n_val, samples_per_shard=n_val, image_size=32, seed=2, prefix="val")
    docs = make_document_files(work / "doc_files", n_docs, image_size=32, seed=3)
    write_documents((json.loads(line) for line in docs.read_text().splitlines()), work / "doc_files/images",
                    work / "docs", samples_per_shard=max(1, n_docs // 2))
    rng, val_rng = random.Random(4), random.Random(5)
    train_text = [plain_sentence(rng) for _ in range(n_text)]
    seen = set(train_text)
    val_text = []
    while len(val_text) < n_val:  # held out: sentences training never had
        s = plain_sentence(val_rng)
        if s not in seen:
            val_text.append(s)
            seen.add(s)
    write_tar_shards(({"__key__": f"t{i:06d}", "txt": t} for i, t in enumerate(train_text)), work / "text",
                     max(1, n_text // 4), prefix="train")
    write_tar_shards(({"__key__": f"v{i:06d}", "txt": t} for i, t in enumerate(val_text)), work / "text", n_val,
                     prefix="val")
    texts = [*captions_from_shards(str(work / "captions" / "train-*.tar")), *train_text,
             " ".join(synthetic_words()), " ".join(synthetic_document_words()), " ".join(grammar_words())]
    tok = train_sentencepiece(texts, work / "tokenizer", vocab_size=128)
    return {"captions": str(work / "captions"), "docs": str(work / "docs"), "text": str(work / "text"),
            "tokenizer": str(tok), "train_text_sentences": len(set(train_text))}


def train(work: Path, data: dict, name: str, steps: int, seed: int) -> dict:
    """One run; returns its final validation figures on held-out text and captions, and its wall time."""
    caps, docs, text = (f"{data[k]}/train-*.tar" for k in ("captions", "docs", "text"))
    if name == "with":
        sources = (f"[{{name: captions, shards: '{caps}', weight: 0.6}}, {{name: docs, shards: '{docs}', "
                   f"weight: 0.2}}, {{name: text, shards: '{text}', weight: 0.2}}]")
    else:
        sources = f"[{{name: captions, shards: '{caps}', weight: 0.75}}, {{name: docs, shards: '{docs}', weight: 0.25}}]"
    out = {}
    base = [f"data.sources={sources}", f"data.tokenizer={data['tokenizer']}", "data.text_only=true",
            "data.max_images=4", "data.max_text_len=40", f"train.max_steps={steps}", f"train.seed={seed}",
            "train.checkpoint_every=0", "train.eval_batches=8", "train.warmup_steps=10", "model.xattn.gate_init=1.0",
            "data.num_workers=1", "deepspeed.zero_stage=0"]
    t0 = time.perf_counter()
    run_dir = work / f"run-{name}-seed{seed}"
    cmd = [sys.executable, str(ROOT / "launchers/train.py"), "--config", str(CONFIG), "--overwrite",
           f"output_dir={run_dir}", f"data.val_shards={data['text']}/val-*.tar", *base]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise RuntimeError(f"run {name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out["train_seconds"] = time.perf_counter() - t0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    out["heldout_text_loss"] = [r for r in records if "val_loss" in r][-1]["val_loss"]
    out["train_loss_last"] = [r for r in records if "loss" in r][-1]["loss"]
    out["caption_loss"] = caption_loss(run_dir, f"{data['captions']}/val-*.tar")
    return out


def caption_loss(run_dir: Path, shards: str) -> float:
    """The run's caption loss on held-out captions (launchers/evaluate.py's figure)."""
    proc = subprocess.run([sys.executable, str(ROOT / "launchers/evaluate.py"), "--checkpoint", str(run_dir),
                           "--shards", shards, "--batches", "8"], cwd=ROOT, capture_output=True, text=True,
                          timeout=1200, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise RuntimeError(f"evaluate failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["models"]["model"]["loss"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    smoke.add_smoke_args(p, "text_only", work_dir="the shards and the runs (default runs/text-only-bench)")
    args = p.parse_args(argv)
    smoke.check_smoke_paths(p, args)
    work = smoke.work_dir(args, "text_only", ROOT / "runs" / "text-only-bench")
    steps, seeds = (4, [0]) if args.smoke else (args.steps, args.seeds)
    sizes = (64, 16, 64, 16) if args.smoke else (2048, 512, 1024, 128)
    data = make_data(work, *sizes)
    runs = {name: [train(work, data, name, steps, s) for s in seeds] for name in ("without", "with")}

    def mean(name: str, key: str) -> float:
        return sum(r[key] for r in runs[name]) / len(runs[name])

    print(f"{'run':<10}{'held-out text loss':>20}{'caption loss':>14}{'train s':>10}")
    for name in runs:
        print(f"{name:<10}{mean(name, 'heldout_text_loss'):>20.3f}{mean(name, 'caption_loss'):>14.3f}"
              f"{mean(name, 'train_seconds'):>10.0f}")
    headline = {
        "benchmark": "text_only", "smoke": bool(args.smoke), "steps": steps, "seeds": seeds,
        "heldout_text_loss_with": mean("with", "heldout_text_loss"),
        "heldout_text_loss_without": mean("without", "heldout_text_loss"),
        "heldout_text_loss_ratio_with_over_without": mean("with", "heldout_text_loss")
        / mean("without", "heldout_text_loss"),
        "caption_loss_with": mean("with", "caption_loss"), "caption_loss_without": mean("without", "caption_loss"),
        "cpu": cpu_model(),
    }
    out = smoke.out_path(args, "text_only")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"headline": headline, "runs": runs, "data": data,
                               "date": time.strftime("%Y-%m-%d")}, indent=2) + "\n")
    print(json.dumps(headline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
