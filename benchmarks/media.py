"""Video, audio and speech (mmscale/media/): does a small model trained from scratch on CPU use the clips?

    python benchmarks/media.py [--tasks video audio speech] [--steps N] [--samples N]
    python benchmarks/media.py --smoke --out /tmp/media.json          # checks the script (~1-2 min)

For each task this makes the demo data of `mmscale.data.media_demo` (train and held-out shards and a tokenizer),
trains `configs/{task}_demo.yaml` on it in this process (one rank: `build_trainer` then `Trainer.train`, as
`python launchers/train.py --config configs/{task}_demo.yaml` does), loads the run's final checkpoint
(`mmscale.job.runs.load_run`) and scores the held-out clips from teacher-forced logits: a caption word counts as
predicted when the argmax over the whole vocabulary is its token at each of its positions (every earlier word given).

- video ("a red circle moves left"): `video_direction_accuracy`, the direction word; and
  `video_shuffled_over_ordered_loss`, the direction word's mean loss with each clip's frames shuffled (a fixed
  permutation per clip, seeded, never the identity) over the same with the frames in order. Every frame alone is
  drawn from the same distribution whatever the direction, so only the order tells it: > 1 means the order is used.
- audio ("three high beeps"): `audio_count_accuracy` (the first word) and `audio_pitch_accuracy` (the second).
- speech ("three seven", espeak-ng): `speech_digit_accuracy_unseen_voices`, every digit word of held-out clips
  spoken by `HELD_OUT_VOICES`, which training never heard (the train voices are `SPEECH_VOICES` less any voice that
  espeak-ng renders byte for byte like a held-out one: `en` is `en-gb`). Skipped, with the reason, without espeak-ng.

`train_seconds` per task: the wall time of building the trainer and training (not of making the data). Everything
goes to runs/media-bench/ (or `--work-dir`); writes benchmarks/results/media.json (`--out`); the last line printed
is one JSON object (the headline). `--smoke` (alias `--quick`): 64 samples and 3 steps per task in a temporary
folder (benchmarks/smoke.py); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import sys
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # also when imported from elsewhere

import smoke  # noqa: E402  (benchmarks/smoke.py)
from machine import cpu_model  # noqa: E402  (benchmarks/machine.py)

TASKS = ("video", "audio", "speech")
# Per task: its config (model, optimizer and steps: its train.max_steps) and the data of a full run, tuned to the
# targets on 2 CPU cores (see benchmarks/results/media.json).
PLAN: dict[str, dict[str, Any]] = {
    "video": {"config": ROOT / "configs" / "video_demo.yaml", "samples": 4000, "val_samples": 256},
    "audio": {"config": ROOT / "configs" / "audio_demo.yaml", "samples": 4000, "val_samples": 256},
    "speech": {"config": ROOT / "configs" / "speech_demo.yaml", "samples": 4000, "val_samples": 256},
}
SMOKE = {"samples": 64, "val_samples": 32, "steps": 3}
TARGETS = {"video_direction_accuracy": 0.90, "video_shuffled_over_ordered_loss": 1.0, "audio_count_accuracy": 0.90,
           "audio_pitch_accuracy": 0.90, "speech_digit_accuracy_unseen_voices": 0.80}


# ----------------------------------------------------------------------------------------------- data


def speech_voices() -> tuple[list[str], list[str], list[str]]:
    """(train voices, held-out voices, train voices dropped): SPEECH_VOICES less those that espeak-ng renders exactly
    like a held-out voice (an alias of it), and HELD_OUT_VOICES."""
    import subprocess
    import tempfile

    from mmscale.data.media_demo import HELD_OUT_VOICES, SPEECH_VOICES

    def render(voice: str) -> bytes:
        with tempfile.TemporaryDirectory() as d:
            subprocess.run(["espeak-ng", "-v", voice, "-s", "150", "-w", f"{d}/p.wav", "seven three nine"],
                           check=True, capture_output=True)
            return Path(f"{d}/p.wav").read_bytes()

    held = {render(v) for v in HELD_OUT_VOICES}
    train = [v for v in SPEECH_VOICES if v not in HELD_OUT_VOICES and render(v) not in held]
    dropped = [v for v in SPEECH_VOICES if v not in train]
    return train, list(HELD_OUT_VOICES), dropped


def make_data(task: str, out: Path, samples: int, val_samples: int, seed: int) -> dict[str, Any]:
    """The task's shards and tokenizer under `out` (remade only when the stamp of the same arguments is missing)."""
    from mmscale.data.media_demo import write_media_demo

    kwargs: dict[str, Any] = {"samples_per_shard": 500, "seed": seed}
    info: dict[str, Any] = {"samples": samples, "val_samples": val_samples, "seed": seed}
    if task == "video":
        kwargs.update(frames=8, size=32)
    elif task == "audio":
        kwargs.update(seconds=1.0, sample_rate=16000)
    else:
        train_voices, val_voices, dropped = speech_voices()
        kwargs.update(seconds=2.0, voices=train_voices, val_voices=val_voices)
        info.update(train_voices=train_voices, val_voices=val_voices, dropped_train_voices=dropped)
    stamp = out / "made.json"
    want = json.dumps({"task": task, **info, **{k: v for k, v in kwargs.items() if k != "voices"}}, sort_keys=True)
    if not (stamp.is_file() and stamp.read_text() == want):
        shutil.rmtree(out, ignore_errors=True)
        with contextlib.redirect_stdout(sys.stderr):  # the maker's "wrote ..." lines stay off the results
            write_media_demo(task, out, samples, val_samples, **kwargs)
        stamp.write_text(want)
    return {"train": str(out / "train-*.tar"), "val": str(out / "val-*.tar"),
            "tokenizer": str(out / "tokenizer.model"), **info}


def read_truth(shards: str) -> dict[str, dict[str, Any]]:
    """key -> {"txt": caption, "json": ground truth} of every sample in `shards`."""
    from mmscale.data.shards import resolve_shards

    out: dict[str, dict[str, Any]] = {}
    for shard in resolve_shards(shards):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                if ext in ("txt", "json"):
                    out.setdefault(key, {})[ext] = tar.extractfile(m).read().decode()
    return {k: {"txt": v["txt"].strip(), "json": json.loads(v["json"])} for k, v in out.items()}


# ----------------------------------------------------------------------------------------------- training


def train(task: str, data: dict[str, Any], run_dir: Path, steps: int | None, extra: list[str],
          smoke_run: bool) -> dict:
    """Build and train the task's config on `data` into `run_dir`, in this process (`steps`: None = the config's
    train.max_steps); returns seconds and losses."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from mmscale.job.build import build_trainer
    from mmscale.job.preflight import load_config

    overrides = [f"output_dir={run_dir}", f"data.train_shards={data['train']}", f"data.val_shards={data['val']}",
                 f"data.tokenizer={data['tokenizer']}", "logging.progress_bar=false",
                 *([f"train.max_steps={steps}"] if steps else [])]
    if smoke_run:
        overrides += ["train.micro_batch_size=8", "train.global_batch_size=8", "train.eval_every=0",
                      "train.eval_batches=1", "train.warmup_steps=1", "data.shuffle_buffer=16"]
    cfg = load_config(PLAN[task]["config"], [*overrides, *extra], world_size=1)
    t0 = time.perf_counter()
    trainer = build_trainer(cfg, overwrite=True)
    history = trainer.train()
    seconds = time.perf_counter() - t0
    trainer.engine.ds.destroy()
    del trainer
    unset_hf_deepspeed_config()  # the evaluation builds its model outside zero.Init
    losses = [r["loss"] for r in history if "loss" in r]
    evals = [r["val_loss"] for r in history if "val_loss" in r]
    return {"seconds": seconds, "steps": cfg.train.max_steps, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "val_loss": evals[-1] if evals else None,
            "overrides": [*overrides[4:], *extra], "lr": cfg.train.lr, "batch": cfg.train.global_batch_size}


# ----------------------------------------------------------------------------------------------- scoring


def word_spans(tokenizer: Any, caption: str) -> list[tuple[int, int]]:
    """Each word's token span [a, b) in `tokenizer.encode(caption)` (a word model: one piece each, but not assumed)."""
    words, ids = caption.split(), tokenizer.encode(caption)
    spans, a = [], 0
    for k in range(len(words)):
        through = tokenizer.encode(" ".join(words[: k + 1]))
        if through != ids[: len(through)]:
            raise ValueError(f"{caption!r}: the tokens of its first {k + 1} words are no prefix of the caption's")
        spans.append((a, len(through)))
        a = len(through)
    return spans


def clip_permutation(key: str, frames: int, seed: int) -> list[int]:
    """A fixed, seeded permutation of a clip's frames (never the identity)."""
    rng = random.Random(f"media-shuffle-{seed}-{key}")
    order = list(range(frames))
    while order == sorted(order):
        rng.shuffle(order)
    return order


def score(task: str, run_dir: Path, data: dict[str, Any], seed: int) -> dict[str, Any]:
    """Teacher-forced word accuracy (and loss) on every held-out sample of `data["val"]`; see the module doc."""
    import torch
    import torch.nn.functional as F

    from mmscale.data import EvalLoader
    from mmscale.data.shards import read_sizes, resolve_shards
    from mmscale.job.runs import load_run
    from mmscale.media import bind_media
    from mmscale.training.trainer import MODEL_INPUTS

    cfg, model, tok = load_run(run_dir)
    media = bind_media(cfg, tok)
    truth = read_truth(data["val"])
    total = sum(read_sizes(resolve_shards(data["val"])).values())
    micro = max(d for d in range(1, 65) if total % d == 0)  # whole batches: every sample once
    # which caption words are scored, by task: (name, word index or None for every word)
    scored = {"video": [("direction", 4), ("colour", 1), ("shape", 2)],
              "audio": [("count", 0), ("pitch", 1)],
              "speech": [("digit", None)]}[task]
    right: dict[str, list[float]] = {name: [] for name, _ in scored}
    loss: dict[str, list[float]] = {name: [] for name, _ in scored}
    shuffled_loss: list[float] = []
    shuffled_right: list[float] = []
    by_position: dict[int, list[float]] = {}
    seen = 0

    def word_scores(logits: torch.Tensor, ids: torch.Tensor, offset: int, span: tuple[int, int]) -> tuple[float, float]:
        pos = torch.arange(offset + span[0], offset + span[1])  # the word's tokens in input_ids
        pred = logits[pos - 1]  # position t predicts token t + 1
        ok = float(bool((pred.argmax(-1) == ids[pos]).all()))
        return ok, float(F.cross_entropy(pred.float(), ids[pos], reduction="sum"))

    with torch.no_grad():
        for batch in EvalLoader(cfg.data, tok, micro, 0, 1, shards=data["val"], max_batches=10**6, media=media):
            inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
            logits = model(**inputs).logits
            if task == "video":
                values = inputs["video_values"].clone()  # (B, 1, T, 3, S, S)
                for i, key in enumerate(batch["__key__"]):
                    values[i, 0] = values[i, 0, clip_permutation(key, values.shape[2], seed)]
                shuffled = model(**{**inputs, "video_values": values}).logits
            for i, key in enumerate(batch["__key__"]):
                caption, ids = truth[key]["txt"], batch["input_ids"][i]
                cap_ids = tok.encode(caption)
                offset = 1  # the placeholder (<video> or <audio>) opens the text
                if ids[offset:offset + len(cap_ids)].tolist() != cap_ids:
                    raise RuntimeError(f"{key}: the batch's tokens are not the caption {caption!r}'s")
                spans = word_spans(tok, caption)
                for name, index in scored:
                    for k in (range(len(spans)) if index is None else [index]):
                        ok, nll = word_scores(logits[i], ids, offset, spans[k])
                        right[name].append(ok)
                        loss[name].append(nll)
                        if task == "speech":
                            by_position.setdefault(k, []).append(ok)
                if task == "video":
                    ok, nll = word_scores(shuffled[i], ids, offset, spans[4])
                    shuffled_right.append(ok)
                    shuffled_loss.append(nll)
                seen += 1
    if seen != total:
        raise RuntimeError(f"{data['val']}: {seen} samples scored, sizes.json lists {total}")
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    out: dict[str, Any] = {"samples": seen}
    for name, _ in scored:
        out[f"{name}_accuracy"] = mean(right[name])
        out[f"{name}_loss"] = mean(loss[name])
        out[f"{name}_words"] = len(right[name])
    if task == "video":
        out["direction_accuracy_shuffled"] = mean(shuffled_right)
        out["direction_loss_shuffled"] = mean(shuffled_loss)
        out["shuffled_over_ordered_loss"] = out["direction_loss_shuffled"] / max(out["direction_loss"], 1e-12)
    if task == "speech":
        out["digit_accuracy_by_position"] = {str(k): mean(v) for k, v in sorted(by_position.items())}
    return out


# ----------------------------------------------------------------------------------------------- main


def headline_figures(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    def get(task: str, key: str) -> float | None:
        r = results.get(task, {}).get("scores")
        return None if r is None else round(r[key], 4)

    return {"video_direction_accuracy": get("video", "direction_accuracy"),
            "video_shuffled_over_ordered_loss": get("video", "shuffled_over_ordered_loss"),
            "audio_count_accuracy": get("audio", "count_accuracy"),
            "audio_pitch_accuracy": get("audio", "pitch_accuracy"),
            "speech_digit_accuracy_unseen_voices": get("speech", "digit_accuracy")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="which tasks (default: all)")
    p.add_argument("--steps", type=int, default=None, help="training steps of every task (default: each config's "
                   f"train.max_steps; --smoke {SMOKE['steps']})")
    samples = ", ".join(f"{t} {PLAN[t]['samples']}" for t in TASKS)
    p.add_argument("--samples", type=int, default=None, help=f"training samples of every task (default: each task's, "
                   f"{samples}; --smoke {SMOKE['samples']})")
    p.add_argument("--val-samples", type=int, default=None,
                   help=f"held-out samples (default {PLAN['video']['val_samples']}; --smoke {SMOKE['val_samples']})")
    p.add_argument("--seed", type=int, default=0, help="data seed (and the frame shuffles')")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every task's training (e.g. train.lr=3e-4); TASK:KEY=VALUE for one")
    smoke.add_smoke_args(p, "media", quick_alias=True,
                         work_dir="folder for the data and runs; default runs/media-bench/")
    args = p.parse_args(argv)
    smoke.check_smoke_paths(p, args)
    for n in (args.steps, args.samples, args.val_samples):
        if n is not None and n < 1:
            p.error("--steps, --samples and --val-samples must be >= 1")
    base = smoke.work_dir(args, "media", ROOT / "runs" / "media-bench")
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("mmscale").setLevel(logging.INFO)

    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    wall0 = time.perf_counter()
    try:
        for task in args.tasks:
            if task == "speech" and shutil.which("espeak-ng") is None:
                skipped[task] = "espeak-ng is not installed (apt-get install espeak-ng)"
                print(f"speech: skipped: {skipped[task]}", flush=True)
                continue
            plan = {**PLAN[task], **(SMOKE if args.smoke else {})}
            samples = args.samples or plan["samples"]
            val_samples = args.val_samples or plan["val_samples"]
            steps = args.steps or plan.get("steps")  # None: the config's
            extra = [s.partition(":")[2] if ":" in s.split("=", 1)[0] else s for s in args.set
                     if ":" not in s.split("=", 1)[0] or s.split(":", 1)[0] == task]
            t0 = time.perf_counter()
            data = make_data(task, base / task / "data", samples, val_samples, args.seed)
            data_seconds = time.perf_counter() - t0
            what = f"{steps} steps" if steps else "the config's steps"
            print(f"{task}: data made in {data_seconds:.0f} s ({samples} train, {val_samples} held-out); training "
                  f"{what}", flush=True)
            trained = train(task, data, base / task / "run", steps, extra, args.smoke)
            scores = score(task, base / task / "run", data, args.seed)
            results[task] = {"data": data, "data_seconds": data_seconds, "train": trained, "scores": scores}
            shown = {k: round(v, 4) for k, v in scores.items() if isinstance(v, float)}
            print(f"{task}: trained in {trained['seconds']:.0f} s (loss {trained['first_loss']:.3f} -> "
                  f"{trained['last_loss']:.3f}); {shown}", flush=True)
    finally:
        from mmscale.job.build import close

        close()

    figures = headline_figures(results)
    rows = [("video", "direction word accuracy", "video_direction_accuracy", ">= 0.90"),
            ("video", "shuffled / ordered loss", "video_shuffled_over_ordered_loss", "> 1"),
            ("audio", "count word accuracy", "audio_count_accuracy", ">= 0.90"),
            ("audio", "pitch word accuracy", "audio_pitch_accuracy", ">= 0.90"),
            ("speech", "digit accuracy, unseen voices", "speech_digit_accuracy_unseen_voices", ">= 0.80")]
    print(f"\n{'task':7s} {'train':>6s} {'steps':>6s} {'train s':>8s}  {'figure':32s} {'value':>7s}  {'target':8s}")
    for task, label, key, target in rows:
        if task not in results:
            print(f"{task:7s} {'-':>6s} {'-':>6s} {'-':>8s}  {label:32s} {'-':>7s}  {target:8s} "
                  f"{'(skipped: ' + skipped[task] + ')' if task in skipped else '(not run)'}")
            continue
        r = results[task]
        print(f"{task:7s} {r['data']['samples']:>6d} {r['train']['steps']:>6d} {r['train']['seconds']:>8.0f}  "
              f"{label:32s} {figures[key]:>7.3f}  {target:8s}")
    cpu = cpu_model()
    headline = {"benchmark": "media", **figures,
                "train_seconds": {t: round(r["train"]["seconds"], 1) for t, r in results.items()},
                "cpu": cpu, "smoke": args.smoke}
    if skipped:
        headline["skipped"] = skipped
    json_path = smoke.out_path(args, "media", base if args.smoke else None)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({
        "benchmark": "media", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "loadavg_1min_at_end": os.getloadavg()[0]},
        "config": {t: str(PLAN[t]["config"].relative_to(ROOT)) for t in results},
        "command": " ".join(["python", "benchmarks/media.py", *(sys.argv[1:] if argv is None else argv)]),
        "targets": TARGETS, "tasks": results, "skipped": skipped,
        "wall_seconds": time.perf_counter() - wall0, "headline": headline}, indent=2, default=str))
    print(json.dumps(headline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
