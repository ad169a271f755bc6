"""Does the demo name the objects? Greedy captions of held-out shapes images, scored object by object.

    python -m mmscale.evaluation.demo_objects --run runs/demo [--samples 256] [--seed S] [--show 16]

Generates `--samples` images of the shapes task (`mmscale.data.synthetic`) with a seed no run trained on (default:
the run's train.seed + 1000; training uses train.seed, its validation split train.seed + 1, and both are refused),
as JPEG shards like the training data's, in a temporary folder (`--data-dir` keeps them); captions them greedily
exactly as `launchers/generate.py --model RUN --shards ...` does (`mmscale.inference`: the run's newest checkpoint,
the training preprocessing, prompt `<image>`); and compares each caption with the reference one.

An object is a colour and a shape together ("red circle"). Either object may be named first, so a caption is
compared as the multiset of its (colour, shape) pairs (a colour word followed by a shape word):

- `objects_right`: both objects right (the caption's pairs are exactly the reference's);
- `object_accuracy`: the share of reference objects the caption names (multiset intersection / 2);
- `colour_accuracy`, `shape_accuracy`: the same for the colours alone and the shapes alone (bound to nothing);
- `exact_caption`: the caption is the reference, word for word. At most ~50%: the reference names a random one of
  the two objects first ("a red circle left of a blue square" = "a blue square right of a red circle");
- `correct_caption`: the caption is the reference or that swap of it (the objects, and where they are, right).

Prints a table and one JSON object on its last line. `--show N` also writes a PNG grid of the first N images with
their captions to `--show-out` (default `{run}/demo_objects.png`): green, the caption is right (`correct_caption`);
orange, both objects right but not where they are; red, an object wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from mmscale.data.synthetic import COLOURS, RELATIONS, SHAPES

HELD_OUT_SEED_OFFSET = 1000
"""The default held-out seed is the run's train.seed + this."""
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def objects(caption: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs of a caption, in order: each colour word directly followed by a shape word."""
    words = caption.split()
    return [(c, s) for c, s in zip(words, words[1:]) if c in COLOURS and s in SHAPES]


def swapped(caption: str) -> str | None:
    """"a A REL a B" -> "a B INVERSE(REL) a A" (the same scene, the other object first); None if not that form."""
    for rel in RELATIONS:
        left, sep, right = caption.partition(f" {rel} ")
        if sep and left and right:
            return f"{right} {_INVERSE[rel]} {left}"
    return None


def _overlap(a: list, b: list) -> int:
    return sum((Counter(a) & Counter(b)).values())


def score(caption: str, reference: str) -> dict[str, float]:
    """Per-image scores (see the module doc) of a generated caption against the reference caption."""
    got, want = objects(caption), objects(reference)
    n = max(len(want), 1)
    return {
        "objects_right": float(Counter(got) == Counter(want)),
        "object_accuracy": _overlap(got, want) / n,
        "colour_accuracy": _overlap([c for c, _ in got], [c for c, _ in want]) / n,
        "shape_accuracy": _overlap([s for _, s in got], [s for _, s in want]) / n,
        "exact_caption": float(caption.strip() == reference.strip()),
        "correct_caption": float(caption.strip() in (reference.strip(), swapped(reference.strip()))),
    }


METRICS = ("objects_right", "object_accuracy", "colour_accuracy", "shape_accuracy", "exact_caption",
           "correct_caption")


def summarize(records: list[dict[str, Any]]) -> dict[str, float]:
    """Mean of each per-image score over `records` (each with "caption" and "reference")."""
    scores = [score(r["caption"], r["reference"]) for r in records]
    return {m: sum(s[m] for s in scores) / max(len(scores), 1) for m in METRICS}


def held_out_seed(train_seed: int, seed: int | None) -> int:
    """`seed`, or train.seed + HELD_OUT_SEED_OFFSET; refuses the seeds the run trained and validated on."""
    seed = train_seed + HELD_OUT_SEED_OFFSET if seed is None else seed
    if seed in (train_seed, train_seed + 1):
        raise ValueError(f"--seed {seed}: the run's training (train.seed {train_seed}) or validation (train.seed + 1) "
                         f"data; held-out images need another seed")
    return seed


def caption_held_out(run: str | Path, samples: int, seed: int | None, data_dir: str | Path | None = None,
                     batch_size: int = 32, max_new_tokens: int = 16) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(one record per image: key, caption, reference, ...; info: seed, image size, checkpoint) for `run`."""
    import torch

    from mmscale.data.synthetic import make_shapes_dataset
    from mmscale.inference import caption_items, load_model, shard_items

    model, tokenizer, cfg = load_model(run)
    if cfg.data.synthetic_task != "shapes":
        raise ValueError(f"{run} trained on the {cfg.data.synthetic_task!r} task; this measures the shapes task")
    seed = held_out_seed(cfg.train.seed, seed)
    with (contextlib.nullcontext(str(data_dir)) if data_dir else tempfile.TemporaryDirectory()) as folder:
        make_shapes_dataset(folder, samples, samples_per_shard=max(samples, 1), image_size=cfg.data.image_size,
                            seed=seed, prefix="heldout")
        items = shard_items(str(Path(folder) / "heldout-000000.tar"), cfg.data)
        with torch.no_grad():
            records = list(caption_items(model, tokenizer, cfg, items, batch_size=batch_size, mode="greedy",
                                         max_new_tokens=max_new_tokens))
    return records, {"seed": seed, "image_size": cfg.data.image_size, "train_seed": cfg.train.seed}


def show(records: list[dict[str, Any]], n: int, image_size: int, seed: int, path: str | Path,
         title: str = "") -> Path:
    """PNG grid of the first `n` held-out images (regenerated from `seed`) with their generated captions, coloured
    as the module doc says."""
    import math

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from mmscale.data.synthetic import make_shapes_sample

    n = min(n, len(records))
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.2 * cols, 3.5 * rows + 0.4), dpi=100)
    FigureCanvasAgg(fig)
    for i, rec in enumerate(records[:n]):
        ax = fig.add_subplot(rows, cols, i + 1)
        img, reference = make_shapes_sample(int(rec["key"].removeprefix("heldout")), image_size, seed)
        assert reference == rec["reference"], (reference, rec["reference"])
        ax.imshow(img)
        ax.set_xticks([])
        ax.set_yticks([])
        sc = score(rec["caption"], rec["reference"])
        colour = "tab:green" if sc["correct_caption"] else "tab:orange" if sc["objects_right"] else "tab:red"
        caption = rec["caption"]
        if len(caption) > 26:  # two lines
            cut = caption.rfind(" ", 0, 26)
            caption = caption[:cut] + "\n" + caption[cut + 1:]
        ax.set_title(caption, fontsize=10, color=colour)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="output_dir of a demo (shapes) run, or one checkpoint inside it")
    p.add_argument("--samples", type=int, default=256, help="held-out images to caption")
    p.add_argument("--seed", type=int, default=None,
                   help=f"held-out data seed (default: the run's train.seed + {HELD_OUT_SEED_OFFSET})")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--data-dir", default=None, help="keep the held-out shard here (default: a temporary folder)")
    p.add_argument("--captions", default=None, help="also write every caption and reference here (JSON lines)")
    p.add_argument("--show", type=int, default=0, metavar="N", help="also draw the first N images with captions")
    p.add_argument("--show-out", default=None, help="PNG of --show (default: {run}/demo_objects.png)")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    args = p.parse_args(argv)
    if args.samples < 1 or args.batch_size < 1 or args.show < 0:
        p.error("--samples and --batch-size must be >= 1, --show >= 0")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    with contextlib.redirect_stdout(sys.stderr):  # library prints stay off the result
        records, info = caption_held_out(args.run, args.samples, args.seed, args.data_dir, args.batch_size)
    r = summarize(records)
    print(f"{len(records)} held-out images (seed {info['seed']}; the run trained on seed {info['train_seed']}), "
          f"greedy captions")
    labels = {"objects_right": "both objects right", "object_accuracy": "objects right",
              "colour_accuracy": "colours right", "shape_accuracy": "shapes right",
              "exact_caption": "exact caption", "correct_caption": "caption right, either order"}
    for m in METRICS:
        print(f"  {labels[m]:<30}{r[m]:>8.3f}")
    for rec in records[:5]:
        print(f"  e.g. {rec['caption']!r:<42} reference {rec['reference']!r}")
    if args.captions:
        Path(args.captions).write_text("".join(json.dumps(rec) + "\n" for rec in records))
    result: dict[str, Any] = {"run": str(args.run), "samples": len(records), "seed": info["seed"], **r}
    if args.show:
        run_dir = Path(args.run)
        if (run_dir / "manifest.json").is_file():  # a checkpoint: the picture goes beside the run's, not into it
            run_dir = run_dir.parent.parent
        out = args.show_out or str(run_dir / "demo_objects.png")
        title = (f"{run_dir.name}: held-out images, greedy captions "
                 f"(both objects right: {r['objects_right']:.0%})")
        result["show"] = str(show(records, args.show, info["image_size"], info["seed"], out, title))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
