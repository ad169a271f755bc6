"""Contrastive image-text learning (mmscale/objectives/contrastive.py) on 2 ranks: does the gather give one process's
loss and gradients, and does retrieval work on held-out pairs?

    python benchmarks/contrastive.py [--steps 400] [--digits-steps 150]
    python benchmarks/contrastive.py --smoke --out /tmp/contrastive.json      # checks the script (~2 min)

1. The gather, against one process: the tiny model in float64 with the contrastive objective, a global batch of
   16 pairs; two gloo ranks of 8 (negatives all-gathered with their gradient; DeepSpeed's scaling and gradient
   average done by hand) against one process of 16. `gathered_vs_single_max_rel_diff`: the largest relative
   difference of the loss and of every parameter's gradient. The same two ranks without the gather show how far
   the loss is then (`local_negatives_loss_rel_diff`).
2. The demo: `deepspeed --num_gpus 2 launchers/train.py --config configs/demo-contrastive.yaml` (ZeRO-3), then the
   run's newest checkpoint loaded in this process (mmscale.job.runs.load_run) embeds the 512 held-out pairs:
   image->text and text->image recall@1/5/10, a caption occurring several times counting as right wherever it
   appears; `chance_recall_at_1` is a random ranking's expected recall@1 under the same rule.
3. Real images: scikit-learn's handwritten digits (real scans shipped with the package), captioned with their
   digit's name ("a handwritten seven"), trained the same way from the demo's config, evaluated on the held-out
   fifth of the scans (10 distinct captions: chance is about 0.1).

Writes benchmarks/results/contrastive.json (`--out`); the last line printed is one JSON object with
`i2t_recall_at_1`, `i2t_recall_at_5`, `t2i_recall_at_1`, `t2i_recall_at_5`, `chance_recall_at_1`,
`gathered_vs_single_max_rel_diff`, `train_seconds` and the digits' figures. Runs go to runs/contrastive-bench/
(or --work-dir). `--smoke`: 4 training steps on 256 samples each, in a temporary folder (benchmarks/smoke.py).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # also when imported from elsewhere

import smoke  # noqa: E402  (benchmarks/smoke.py)
from continual_digits import train_job  # noqa: E402  (benchmarks/continual_digits.py)
from machine import cpu_model  # noqa: E402

CONFIG = ROOT / "configs" / "demo-contrastive.yaml"
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


# ----------------------------------------------------------------------------------------------- 1. the gather


def _tiny_model() -> torch.nn.Module:
    """The tiny preset with the contrastive objective, float64, built the way training builds it."""
    from mmscale.job.build import model_recipe
    from mmscale.job.preflight import load_config

    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["objectives={contrastive: {weight: 1}}",
                                                      "model.xattn.backend=sdpa"], check_paths=False)
    torch.manual_seed(0)
    return model_recipe(cfg).build(64).double().train()


def _global_batch(n: int = 16, length: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 64, (n, length), generator=g)
    ids[:, 0] = 4  # the image token
    attention = torch.ones(n, length, dtype=torch.long)
    for i in range(n):  # captions of different lengths, padded
        attention[i, 4 + i % 6:] = 0
    return {"pixel_values": torch.randn(n, 1, 3, 32, 32, generator=g, dtype=torch.float64),
            "image_mask": torch.ones(n, 1, dtype=torch.bool), "input_ids": ids, "attention_mask": attention,
            "media_index": torch.zeros(n, length, dtype=torch.long), "labels": ids.masked_fill(attention == 0, -100)}


def _loss_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor], scale: float,
                    gather: bool) -> tuple[float, dict[str, torch.Tensor]]:
    model.objectives["contrastive"].section.gather = gather
    model.zero_grad(set_to_none=True)
    terms = model(**batch).terms["contrastive"]
    (terms["loss_sum"] * scale).backward()
    return float(terms["loss_sum"].detach()), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                      if p.grad is not None}


def _rank(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, batch = _tiny_model(), _global_batch()
        n, per = batch["input_ids"].shape[0], batch["input_ids"].shape[0] // world
        mine = {k: v[rank * per:(rank + 1) * per] for k, v in batch.items()}
        result = {}
        for gather in (True, False):
            # the trainer's scale with grad_accum 1 (weight * world / global pairs), then DeepSpeed's average
            loss_sum, grads = _loss_and_grads(model, mine, world / n, gather)
            total = torch.tensor([loss_sum], dtype=torch.float64)
            dist.all_reduce(total)
            for g in grads.values():
                dist.all_reduce(g)
                g /= world
            result[gather] = (float(total) / n, grads)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def gather_check(world: int = 2) -> dict[str, float]:
    """Two gloo ranks of 8 pairs against one process of 16: the largest relative difference of the loss and of every
    parameter's gradient, with the gather and without it."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "ranks.pt")
        mp.spawn(_rank, args=(world, port, out), nprocs=world, join=True)
        ranks = torch.load(out, weights_only=True)
    model, batch = _tiny_model(), _global_batch()
    n = batch["input_ids"].shape[0]
    loss_sum, grads = _loss_and_grads(model, batch, 1.0 / n, gather=True)  # one process: all negatives are here
    single = loss_sum / n

    def rel(a: torch.Tensor | float, b: torch.Tensor | float) -> float:
        a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
        return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))

    gathered_loss, gathered_grads = ranks[True]
    diffs = {"loss": rel(gathered_loss, single)}
    if set(gathered_grads) != set(grads):
        raise RuntimeError(f"gradients of different parameters: {sorted(set(grads) ^ set(gathered_grads))[:5]}")
    diffs.update({name: rel(gathered_grads[name], g) for name, g in grads.items()})
    worst = max(diffs, key=diffs.get)
    return {"gathered_vs_single_max_rel_diff": diffs[worst], "worst": worst, "loss_single": single,
            "loss_gathered": gathered_loss, "local_negatives_loss_rel_diff": rel(ranks[False][0], single),
            "parameters_compared": len(grads)}


# ----------------------------------------------------------------------------------------------- 2, 3. retrieval


@torch.no_grad()
def retrieval(run_dir: Path, shards: str | None = None) -> dict[str, float]:
    """Recall both ways on every pair of `shards` (default: the run's validation shards), the run's newest verified
    checkpoint loaded in this process."""
    from mmscale.data import EvalLoader
    from mmscale.data.shards import read_sizes, resolve_shards
    from mmscale.job.runs import load_run
    from mmscale.objectives.retrieval import retrieval_recall

    cfg, model, tok = load_run(run_dir)
    shards = shards or cfg.data.val_shards
    total = sum(read_sizes(resolve_shards(shards)).values())
    micro = max(d for d in range(1, 65) if total % d == 0)  # the loader yields whole batches: every pair, none twice
    images, texts, captions = [], [], []
    keys = ("pixel_values", "image_mask", "input_ids", "attention_mask", "media_index", "labels")
    for batch in EvalLoader(cfg.data, tok, micro, 0, 1, shards=shards, max_batches=10**6):
        out = model(**{k: batch[k] for k in keys})
        images.append(out.terms["contrastive"]["image"])
        texts.append(out.terms["contrastive"]["text"])
        for row, m in zip(batch["input_ids"], batch["attention_mask"].bool()):
            captions.append(tok.decode([t for t in row[m].tolist() if t != tok.image_token_id]))  # (decode drops pad, eos)
    if len(captions) != total:
        raise RuntimeError(f"{shards}: {len(captions)} pairs embedded, sizes.json lists {total}")
    return retrieval_recall(torch.cat(images), torch.cat(texts), captions, ks=(1, 5, 10))


def digits_data(root: Path, image_size: int = 32) -> str:
    """Captioned digit shards under `root` (train: 4 of every 5 scans of each digit, val: the fifth, as
    mmscale.data.digits splits them) and a tokenizer; returns the tokenizer's path."""
    from sklearn.datasets import load_digits

    from mmscale.data import train_sentencepiece
    from mmscale.data.digits import digit_png
    from mmscale.data.shards import write_tar_shards

    tok = root / "tokenizer.model"
    if tok.is_file() and (root / "val" / "sizes.json").is_file():
        return str(tok)
    d = load_digits()
    seen: dict[int, int] = {}
    split = {"train": [], "val": []}
    for i, t in enumerate(int(t) for t in d.target):
        seen[t] = seen.get(t, 0) + 1
        split["val" if seen[t] % 5 == 0 else "train"].append(i)
    for name, index in split.items():
        write_tar_shards(({"__key__": f"digit{i:05d}", "png": digit_png(d.images[i], image_size),
                           "txt": f"a handwritten {DIGIT_WORDS[int(d.target[i])]}"} for i in index),
                         root / name, 200, prefix=name)
    train_sentencepiece([f"a handwritten {w}" for w in DIGIT_WORDS], root / "tokenizer", 32)
    return str(tok)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="demo training steps (default: the config's; --smoke 4)")
    p.add_argument("--digits-steps", type=int, default=None, help="digits training steps (default 150; --smoke 4)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per training job")
    smoke.add_smoke_args(p, "contrastive", work_dir="folder for the runs and the digits' shards; default "
                         "runs/contrastive-bench/")
    args = p.parse_args(argv)
    smoke.check_smoke_paths(p, args)
    base = smoke.work_dir(args, "contrastive", None) or ROOT / "runs" / "contrastive-bench"

    check = gather_check()
    print(f"gather: 2 ranks x 8 vs 1 process x 16 (float64, {check['parameters_compared']} gradients): max rel diff "
          f"{check['gathered_vs_single_max_rel_diff']:.2e} ({check['worst']}); without the gather the loss differs "
          f"by {check['local_negatives_loss_rel_diff']:.2%}", flush=True)

    small = ["data.synthetic_train_samples=256", "data.synthetic_val_samples=64", "train.eval_batches=2",
             "train.checkpoint_every=0", "train.warmup_steps=1"] if args.smoke else []
    steps = [f"train.max_steps={args.steps or 4}"] if args.smoke or args.steps else []
    demo_run = base / "demo"
    train_seconds = train_job(CONFIG, [f"output_dir={demo_run}", *small, *steps], args.timeout, "demo")
    demo = retrieval(demo_run)
    print(f"demo ({demo['num_pairs']} held-out pairs, {demo['distinct_captions']} distinct captions, trained in "
          f"{train_seconds:.0f} s): image->text R@1 {demo['i2t_recall_at_1']:.3f} R@5 {demo['i2t_recall_at_5']:.3f}; "
          f"text->image R@1 {demo['t2i_recall_at_1']:.3f} R@5 {demo['t2i_recall_at_5']:.3f}; chance R@1 "
          f"{demo['chance_recall_at_1']:.4f}", flush=True)

    tok = digits_data(base / "digits-data")
    digits_run = base / "digits"
    digit_steps = args.digits_steps or (4 if args.smoke else 150)
    digits_seconds = train_job(CONFIG, [
        f"output_dir={digits_run}", f"data.train_shards={base / 'digits-data' / 'train'}",
        f"data.val_shards={base / 'digits-data' / 'val'}", f"data.tokenizer={tok}", "data.synthetic_train_samples=0",
        "data.synthetic_val_samples=0", "data.image_size=32", "data.max_text_len=4", f"train.max_steps={digit_steps}",
        "train.eval_every=0", "train.checkpoint_every=0", "train.eval_batches=12", "train.warmup_steps=10"],
        args.timeout, "digits")
    digits = retrieval(digits_run)
    print(f"digits ({digits['num_pairs']} held-out scans, {digits['distinct_captions']} captions, trained in "
          f"{digits_seconds:.0f} s): image->text R@1 {digits['i2t_recall_at_1']:.3f}; text->image R@1 "
          f"{digits['t2i_recall_at_1']:.3f}; chance R@1 {digits['chance_recall_at_1']:.3f}", flush=True)

    print(f"\n{'set':8s} {'pairs':>6s} {'i2t R@1':>8s} {'i2t R@5':>8s} {'i2t R@10':>9s} {'t2i R@1':>8s} {'t2i R@5':>8s} "
          f"{'t2i R@10':>9s} {'chance R@1':>11s}")
    for name, r in (("demo", demo), ("digits", digits)):
        print(f"{name:8s} {r['num_pairs']:>6d} {r['i2t_recall_at_1']:>8.3f} {r['i2t_recall_at_5']:>8.3f} "
              f"{r['i2t_recall_at_10']:>9.3f} {r['t2i_recall_at_1']:>8.3f} {r['t2i_recall_at_5']:>8.3f} "
              f"{r['t2i_recall_at_10']:>9.3f} {r['chance_recall_at_1']:>11.4f}")
    headline = {"benchmark": "contrastive",
                **{k: round(demo[k], 4) for k in ("i2t_recall_at_1", "i2t_recall_at_5", "t2i_recall_at_1",
                                                  "t2i_recall_at_5", "chance_recall_at_1")},
                "gathered_vs_single_max_rel_diff": float(f"{check['gathered_vs_single_max_rel_diff']:.3e}"),
                "train_seconds": round(train_seconds, 1),
                "digits_i2t_recall_at_1": round(digits["i2t_recall_at_1"], 4),
                "digits_t2i_recall_at_1": round(digits["t2i_recall_at_1"], 4),
                "digits_chance_recall_at_1": round(digits["chance_recall_at_1"], 4), "smoke": args.smoke}
    json_path = smoke.out_path(args, "contrastive", base if args.smoke else None)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({
        "benchmark": "contrastive", "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
        "config": str(CONFIG.relative_to(ROOT)), "gather_check": check, "demo": demo, "digits": digits,
        "train_seconds": train_seconds, "digits_train_seconds": digits_seconds, "digits_steps": digit_steps,
        "headline": headline}, indent=2))
    print(json.dumps(headline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
