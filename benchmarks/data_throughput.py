"""samples/s of mmscale's streaming train pipeline against a plain webdataset pipeline built as open_clip builds
it, and the time to the first batch after a resume at 10% and at 90% of an epoch.

    python benchmarks/data_throughput.py [--workers 0 1 2] [--repeats 5] [--micro-batch 32]
    python benchmarks/data_throughput.py --smoke --out /tmp/data_throughput.json   # tiny shards and images, one
                                            # repeat, in a temporary folder: checks the script only (--quick: same)

The data (made once under data/throughput-shards/, reused while its stamp matches): 224x224 JPEGs (q90) of two
coloured shapes over a smooth colour texture with sensor-like noise, about 18 KB each like a web photo, so a decode
costs what a photo's does and not what a flat drawing's does; the shapes captions; a sentencepiece tokenizer
trained on them. The images are already 224 px, so the resize is a no-op in both pipelines: the figures measure
read, shuffle, JPEG decode, normalise, tokenize, batch and the worker hand-off.

Throughput: both pipelines read the same shards with the same worker count, shuffle buffer and micro batch, and do
the same preprocessing (shorter side resized and centre-cropped to the image size, float tensor normalised by the
same mean and std; caption -> [<image>] + tokens + [eos] padded to 1 + max_text_len). The plain one is
`wds.DataPipeline(SimpleShardList, split_by_node, split_by_worker, tarfile_to_samples, shuffle, decode("pilrgb"),
to_tuple, map_tuple, batched)` in a `wds.WebLoader` (torchvision's Resize/CenterCrop/ToTensor/Normalize written out,
as torchvision is not installed). Each run times `--batches` micro-batches after `--warmup` (worker start, shuffle
buffer fill); the runs are interleaved (repeat r, worker count w: plain then mmscale, or the reverse, alternating)
so that machine noise hits both alike; the ratio is the median over repeats of each repeat's mmscale / plain. Each
run also records the CPU time per sample of this process and its workers (from /proc): on a shared machine the
wall-clock ratio measures the neighbours too, the CPU ratio (plain's CPU per sample / mmscale's) much less. This
process runs `--torch-threads` (1) torch threads, as a DataLoader worker does, so the 0-worker runs measure the same
work as the others and not OpenMP threads waiting on each other.

Resume: one pass with `--resume-workers` workers records `state_dict()` at 10% and at 90% of the epoch's batches
(and the batch that followed each); then, repeated and interleaved, a fresh TrainLoader + `load_state_dict(sd)` +
`next(iter(loader))` is timed, with a fresh start (no state) as the reference. The resumed batch must be the one the
uninterrupted pass had there (`resume_exact`); the state is opaque here.

Targets: mmscale >= 0.95x the plain pipeline's samples/s at every worker count; resume at 90% within 1.2x of resume
at 10%. CPU figures: the JSON names the CPU, its cores and the load average before and after (the machine may be
shared: a noisy run shows as a spread between repeats, `ratio_min`..`ratio_max`). Prints a table, writes
benchmarks/results/data_throughput.json, and prints the headline as one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # also when imported from elsewhere

import smoke  # noqa: E402  (benchmarks/smoke.py)
from machine import cpu_model  # noqa: E402  (benchmarks/machine.py)

THROUGHPUT_TARGET = 0.95  # mmscale samples/s over the plain pipeline's, at every worker count
RESUME_TARGET = 1.2  # time to the first batch resumed at 90% of an epoch over that at 10%
STAMP = "throughput.json"


# ----------------------------------------------------------------------------------------------- data


def photo_sample(index: int, image_size: int, seed: int) -> tuple[bytes, str]:
    """JPEG (q90) and caption of sample `index`: a shapes image (mmscale.data.synthetic) over a smooth random colour
    texture plus per-pixel noise. A pure function of its arguments."""
    import numpy as np
    from PIL import Image

    from mmscale.data.synthetic import make_shapes_sample

    img, caption = make_shapes_sample(index, image_size, seed)
    rng = np.random.default_rng([seed, index])
    k = max(2, image_size // 8)
    texture = Image.fromarray(rng.integers(0, 256, (k, k, 3), dtype=np.uint8))
    texture = texture.resize((image_size, image_size), Image.Resampling.BICUBIC)
    # noise (sigma 8) gives the JPEG a photo's entropy: a flat drawing decodes several times faster than a photo
    x = np.asarray(img, np.float32) * 0.75 + np.asarray(texture, np.float32) * 0.25
    x += rng.normal(0.0, 8.0, x.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue(), caption


def ensure_data(out: Path, num_samples: int, samples_per_shard: int, image_size: int, seed: int = 0) -> Path:
    """Shards `out/train-*.tar` + sizes.json + `out/tokenizer.model`, made unless `out`'s stamp says they exist
    with these arguments (then reused). Returns the tokenizer's path."""
    from mmscale.data.shards import SIZES_FILE, write_tar_shards
    from mmscale.data.synthetic import synthetic_words
    from mmscale.data.tokenizer import captions_from_shards, train_sentencepiece

    params = dict(num_samples=num_samples, samples_per_shard=samples_per_shard, image_size=image_size, seed=seed,
                  generator="photo_sample-v1")
    stamp, tok_path = out / STAMP, out / "tokenizer.model"
    if stamp.is_file() and json.loads(stamp.read_text()) == params and tok_path.is_file():
        return tok_path
    out.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    for old in out.glob("train-*.tar"):
        old.unlink()
    (out / SIZES_FILE).unlink(missing_ok=True)
    t0 = time.perf_counter()

    def samples():
        for i in range(num_samples):
            jpg, caption = photo_sample(i, image_size, seed)
            yield {"__key__": f"s{i:09d}", "jpg": jpg, "txt": caption}

    write_tar_shards(samples(), out, samples_per_shard)
    # the word list too: every word of the task is one token whatever the sample draw
    texts = captions_from_shards(str(out)) + [" ".join(synthetic_words("shapes"))]
    train_sentencepiece(texts, out / "tokenizer", vocab_size=64)
    stamp.write_text(json.dumps(params) + "\n")  # last: an interrupted generation is redone
    print(f"made {num_samples} samples under {out} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return tok_path


# ----------------------------------------------------------------------------------------------- the plain pipeline


def plain_preprocess(img, image_size: int, mean: Sequence[float], std: Sequence[float]):
    """torchvision's Resize(S, bicubic) + CenterCrop(S) + ToTensor() + Normalize(mean, std), as open_clip composes
    them, written out (torchvision is not installed here)."""
    import numpy as np
    import torch
    from PIL import Image

    w, h = img.size
    if min(w, h) != image_size:  # torchvision returns the image itself when the shorter side already fits
        scale = image_size / min(w, h)
        img = img.resize((max(image_size, int(w * scale)), max(image_size, int(h * scale))),
                         Image.Resampling.BICUBIC)
        w, h = img.size
    left, top = int(round((w - image_size) / 2.0)), int(round((h - image_size) / 2.0))
    img = img.crop((left, top, left + image_size, top + image_size))
    x = torch.from_numpy(np.array(img, np.uint8, copy=True)).view(image_size, image_size, 3)
    x = x.permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    m = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return x.sub_(m).div_(s)


def plain_tokenize(text: str, tokenizer, length: int):
    """(length,) int64: [<image>] + caption tokens + [eos], padded (open_clip's tokenizer returns a fixed length)."""
    import torch

    ids = [tokenizer.image_token_id] + tokenizer.encode(text)[: length - 2] + [tokenizer.eos_id]
    out = torch.full((length,), tokenizer.pad_id, dtype=torch.int64)
    out[: len(ids)] = torch.as_tensor(ids, dtype=torch.int64)
    return out


def build_plain_loader(urls: list[str], tokenizer, cfg, micro_batch: int, num_workers: int):
    """open_clip's `get_wds_dataset` stages (without its shard shuffle), in a `wds.WebLoader` of `num_workers`."""
    import webdataset as wds

    dataset = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        # mmscale fills its whole buffer before the first sample: the same here
        wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer),
        wds.decode("pilrgb", handler=wds.warn_and_continue),
        wds.to_tuple("jpg;png", "txt"),
        wds.map_tuple(partial(plain_preprocess, image_size=cfg.image_size, mean=cfg.image_mean, std=cfg.image_std),
                      partial(plain_tokenize, tokenizer=tokenizer, length=1 + cfg.max_text_len)),
        wds.batched(micro_batch, partial=False),
    )
    return wds.WebLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers)


# ----------------------------------------------------------------------------------------------- measuring


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds() -> float:
    """CPU time of this process and of its live child processes (the DataLoader workers), from /proc (Linux)."""
    total, me = time.process_time(), os.getpid()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        except (OSError, IndexError):
            continue  # exited meanwhile
        if int(fields[1]) == me:
            total += (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime + stime
    return total


def samples_per_s(
    make_iter: Callable[[], Iterator], warmup: int, batches: int, micro_batch: int
) -> tuple[float, float]:
    """(samples/s, CPU ms per sample of this process and its workers) over `batches` micro-batches after `warmup`
    (worker start, shuffle buffer fill); stops the workers before returning.

    The CPU figure is what a sample costs whoever else shares the machine: wall-clock samples/s on a busy machine
    measures the neighbours as well. (The workers' CPU in the window includes their prefetch, at most
    2 batches per worker: small against `batches`.)"""
    it = make_iter()
    try:
        for _ in range(warmup):
            next(it)
        c0, t0 = cpu_seconds(), time.perf_counter()
        for _ in range(batches):
            next(it)
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        return batches * micro_batch / wall, 1e3 * cpu / (batches * micro_batch)
    finally:
        close = getattr(it, "close", None) or getattr(it, "_shutdown_workers", None)  # generator / DataLoader iter
        if close is not None:
            close()


def fingerprint(batch: dict[str, Any]) -> list:
    """What identifies a batch's samples: their keys (the token ids if a batch carries no keys)."""
    if "__key__" in batch:
        return list(batch["__key__"])
    return batch["input_ids"].tolist()


def throughput_rows(data: Path, tokenizer, cfg, args) -> list[dict[str, Any]]:
    """One row per (repeat, worker count): both pipelines' samples/s and CPU ms per sample, in alternating order."""
    from mmscale.data import TrainLoader, resolve_shards

    urls = resolve_shards(str(data))
    rows = []
    for r in range(args.repeats):
        for w in args.workers:
            wcfg = dataclasses.replace(cfg, num_workers=w)
            runs = {
                "plain": lambda: iter(build_plain_loader(urls, tokenizer, wcfg, args.micro_batch, w)),
                "mmscale": lambda: iter(TrainLoader(wcfg, tokenizer, args.micro_batch, 0, 1, seed=0,
                                                    shards=str(data))),
            }
            order = ["plain", "mmscale"] if (r + w) % 2 == 0 else ["mmscale", "plain"]
            row: dict[str, Any] = {"repeat": r, "workers": w, "order": order}
            for name in order:
                row[f"{name}_samples_per_s"], row[f"{name}_cpu_ms_per_sample"] = samples_per_s(
                    runs[name], args.warmup, args.batches, args.micro_batch)
            row["ratio"] = row["mmscale_samples_per_s"] / row["plain_samples_per_s"]
            row["cpu_ratio"] = row["plain_cpu_ms_per_sample"] / row["mmscale_cpu_ms_per_sample"]
            rows.append(row)
            print(f"  repeat {r} workers {w}: plain {row['plain_samples_per_s']:.1f}, mmscale "
                  f"{row['mmscale_samples_per_s']:.1f} samples/s; CPU ms/sample plain "
                  f"{row['plain_cpu_ms_per_sample']:.2f}, mmscale {row['mmscale_cpu_ms_per_sample']:.2f}",
                  file=sys.stderr)
    return rows


def resume_rows(data: Path, tokenizer, cfg, args) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """States at 10% and 90% of epoch 0 from one uninterrupted pass, then timed fresh starts and resumes."""
    from mmscale.data import TrainLoader

    rcfg = dataclasses.replace(cfg, num_workers=args.resume_workers)

    def loader():
        return TrainLoader(rcfg, tokenizer, args.micro_batch, 0, 1, seed=0, shards=str(data))

    first = loader()
    steps = first.steps_per_epoch
    points = {"10": max(1, round(0.1 * steps)), "90": min(steps - 1, round(0.9 * steps))}
    states, expected = {}, {}
    it = iter(first)
    for i in range(max(points.values()) + 1):
        for name, k in points.items():
            if i == k:  # i batches consumed: the state's next batch is batch i
                states[name] = copy.deepcopy(first.state_dict())
        batch = next(it)
        for name, k in points.items():
            if i == k:
                expected[name] = fingerprint(batch)
        if i == 0:
            expected["fresh"] = fingerprint(batch)
    first.close()

    rows = []
    cases = ["fresh", "10", "90"]
    for r in range(args.repeats):
        order = cases[r % 3:] + cases[: r % 3]
        for name in order:
            t0 = time.perf_counter()
            ld = loader()
            if name != "fresh":
                ld.load_state_dict(copy.deepcopy(states[name]))
            batch = next(iter(ld))
            seconds = time.perf_counter() - t0
            ld.close()
            rows.append({"repeat": r, "position": name, "batch": points.get(name, 0), "seconds": seconds,
                         "exact": fingerprint(batch) == expected[name]})
            print(f"  repeat {r} resume {name}: {seconds:.2f} s", file=sys.stderr)
    return {"steps_per_epoch": steps, "batches": {"fresh": 0, **points}}, rows


# ----------------------------------------------------------------------------------------------- main


def _git(where: Path, *cmd: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(where), *cmd], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def pipeline_provenance() -> dict[str, Any]:
    """Which mmscale data code ran: the tree may hold uncommitted changes, or the run may import a copy. The git
    blob ids name the files' versions wherever they ran (`git log --all --find-object=<id>` finds the commit)."""
    import hashlib

    import mmscale.data.pipeline

    def blob_id(data: bytes) -> str:
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    src = Path(mmscale.data.pipeline.__file__).resolve()
    repo = src.parents[2]
    return {
        "pipeline_file": str(src),
        "data_git_blobs": {f.name: blob_id(f.read_bytes()) for f in sorted(src.parent.glob("*.py"))},
        "git_head": _git(repo, "rev-parse", "HEAD") if (repo / ".git").exists() else "",
        "git_dirty_data": _git(repo, "status", "--porcelain", "mmscale/data").splitlines()
        if (repo / ".git").exists() else [],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="data-loader worker counts to compare")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--warmup", type=int, default=6, help="micro-batches not timed at the start of each run")
    p.add_argument("--batches", type=int, default=80, help="micro-batches timed per run")
    p.add_argument("--resume-workers", type=int, default=2)
    p.add_argument("--samples", type=int, default=4096, help="samples in the shards (one epoch)")
    p.add_argument("--samples-per-shard", type=int, default=128)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--max-text-len", type=int, default=32)
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch threads of this process (the 0-worker runs decode here); a DataLoader worker has 1")
    smoke.add_smoke_args(p, "data_throughput", quick_alias=True)
    p.add_argument("--data-dir", "--work-dir", dest="work_dir", default=None,
                   help="the shards' folder, made once and reused (default data/throughput-shards; with --smoke, a "
                        "new temporary folder)")
    args = p.parse_args(argv)
    smoke.check_smoke_paths(p, args)
    if args.smoke:  # tiny shards and images, one repeat
        args.repeats, args.micro_batch, args.warmup, args.batches = 1, 4, 2, 4
        args.samples, args.samples_per_shard, args.image_size, args.shuffle_buffer = 128, 16, 32, 16
    data = smoke.work_dir(args, "data_throughput", ROOT / "data" / "throughput-shards")
    out = smoke.out_path(args, "data_throughput", data if args.smoke and not args.work_dir else None)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    import PIL
    import torch
    import webdataset

    from mmscale.config import DataConfig
    from mmscale.data import load_tokenizer

    # With 0 workers the pipeline runs here. Its elementwise tensor ops on 2 OpenMP threads of a shared 2-core
    # machine spin-wait on each other (mmscale's normalisation measured 12 ms/sample instead of 0.6): 1 thread, as
    # in a worker, measures the pipeline rather than the neighbours.
    torch.set_num_threads(args.torch_threads)
    tokenizer = load_tokenizer(ensure_data(data, args.samples, args.samples_per_shard, args.image_size))
    epoch_batches = args.samples // args.micro_batch
    for w in args.workers:  # the plain pipeline's epoch ends: each worker batches only its own shards
        per_worker = args.samples // max(1, w) // args.micro_batch
        if per_worker * max(1, w) < args.warmup + args.batches:
            p.error(f"--warmup ({args.warmup}) + --batches ({args.batches}) > the {per_worker * max(1, w)} "
                    f"micro-batches of one epoch with {w} workers; use fewer or more --samples")
    cfg = DataConfig(train_shards=str(data), image_size=args.image_size, max_text_len=args.max_text_len,
                     shuffle_buffer=args.shuffle_buffer)
    jpeg_bytes = sum(f.stat().st_size for f in data.glob("train-*.tar")) / args.samples
    for f in sorted(data.glob("train-*.tar")):  # into the page cache: the first timed run must not pay the disk
        f.read_bytes()

    load_before = os.getloadavg()
    t_start = time.perf_counter()
    rows = throughput_rows(data, tokenizer, cfg, args)
    resume_info, rrows = resume_rows(data, tokenizer, cfg, args)
    load_after = os.getloadavg()

    def med(xs):
        return statistics.median(xs)

    per_workers = {}
    for w in args.workers:
        mine = [r for r in rows if r["workers"] == w]
        per_workers[w] = {
            "plain": med(r["plain_samples_per_s"] for r in mine),
            "mmscale": med(r["mmscale_samples_per_s"] for r in mine),
            "ratio": med(r["ratio"] for r in mine),
            "ratio_min": min(r["ratio"] for r in mine),
            "ratio_max": max(r["ratio"] for r in mine),
            "plain_cpu_ms_per_sample": med(r["plain_cpu_ms_per_sample"] for r in mine),
            "mmscale_cpu_ms_per_sample": med(r["mmscale_cpu_ms_per_sample"] for r in mine),
            "cpu_ratio": med(r["cpu_ratio"] for r in mine),
        }
    resume_s = {name: med(r["seconds"] for r in rrows if r["position"] == name) for name in ("fresh", "10", "90")}
    resume_ratio = resume_s["90"] / resume_s["10"]
    resume_exact = all(r["exact"] for r in rrows)

    headline: dict[str, Any] = {"benchmark": "data_throughput"}
    for w in args.workers:
        headline[f"throughput_ratio_workers_{w}"] = per_workers[w]["ratio"]
    headline["resume_ratio_90_over_10"] = resume_ratio
    for w in args.workers:  # plain CPU per sample / mmscale's: the ratio that machine noise moves least
        headline[f"cpu_ratio_workers_{w}"] = per_workers[w]["cpu_ratio"]
    for w in args.workers:
        headline[f"mmscale_samples_per_s_workers_{w}"] = per_workers[w]["mmscale"]
        headline[f"plain_samples_per_s_workers_{w}"] = per_workers[w]["plain"]
    headline.update({
        "resume_first_batch_s_fresh": resume_s["fresh"],
        "resume_first_batch_s_10": resume_s["10"],
        "resume_first_batch_s_90": resume_s["90"],
        "resume_exact": resume_exact,
        "targets": {"throughput_ratio_min": THROUGHPUT_TARGET, "resume_ratio_90_over_10_max": RESUME_TARGET},
        "targets_met": {
            **{f"throughput_workers_{w}": per_workers[w]["ratio"] >= THROUGHPUT_TARGET for w in args.workers},
            "resume": resume_ratio <= RESUME_TARGET,
        },
        "cpu_model": cpu_model(),
        "smoke": args.smoke,
        "quick": args.smoke,  # the name --smoke had here before
    })

    print(f"data throughput: micro batch {args.micro_batch}, {args.image_size}px JPEG (~{jpeg_bytes / 1024:.0f} KB), "
          f"median of {args.repeats} repeat(s) x {args.batches} batches, CPU {cpu_model()} ({os.cpu_count()} cores, "
          f"load {load_before[0]:.1f} -> {load_after[0]:.1f})")
    print(f"{'workers':>7} {'plain samples/s':>16} {'mmscale samples/s':>18} {'ratio':>6} {'min..max':>11} "
          f"{'target':>8} {'met':>4} {'CPU ms/sample plain':>20} {'mmscale':>8} {'CPU ratio':>9}")
    for w, v in per_workers.items():
        print(f"{w:>7} {v['plain']:>16.1f} {v['mmscale']:>18.1f} {v['ratio']:>6.3f} "
              f"{v['ratio_min']:>5.2f}..{v['ratio_max']:<5.2f} {'>= ' + str(THROUGHPUT_TARGET):>8} "
              f"{'yes' if v['ratio'] >= THROUGHPUT_TARGET else 'NO':>4} {v['plain_cpu_ms_per_sample']:>20.3f} "
              f"{v['mmscale_cpu_ms_per_sample']:>8.3f} {v['cpu_ratio']:>9.3f}")
    print(f"time to the first batch, {args.resume_workers} workers, epoch of {resume_info['steps_per_epoch']} batches:")
    print(f"{'position':>9} {'batch':>6} {'seconds':>8}")
    for name, label in (("fresh", "start"), ("10", "10%"), ("90", "90%")):
        print(f"{label:>9} {resume_info['batches'][name]:>6} {resume_s[name]:>8.2f}")
    print(f"resume 90% / 10%: {resume_ratio:.2f} (target <= {RESUME_TARGET}: "
          f"{'yes' if resume_ratio <= RESUME_TARGET else 'NO'}); resumed batches exact: {resume_exact}")

    result = {
        **headline,
        "throughput": {str(w): v for w, v in per_workers.items()},
        "throughput_runs": rows,
        "resume": {**resume_info, "median_seconds": resume_s, "runs": rrows},
        "setup": {
            "micro_batch": args.micro_batch, "warmup_batches": args.warmup, "timed_batches": args.batches,
            "repeats": args.repeats, "workers": args.workers, "resume_workers": args.resume_workers,
            "samples": args.samples, "samples_per_shard": args.samples_per_shard, "epoch_batches": epoch_batches,
            "image_size": args.image_size, "mean_sample_bytes": round(jpeg_bytes), "max_text_len": args.max_text_len,
            "shuffle_buffer": args.shuffle_buffer, "data_dir": str(data), "torch_threads": args.torch_threads,
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "loadavg_before": load_before, "loadavg_after": load_after, "machine": platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "webdataset": webdataset.__version__,
            "pillow": PIL.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
            "wall_s": time.perf_counter() - t_start,
            **pipeline_provenance(),
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(headline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
