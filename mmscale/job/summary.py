"""What a finished run did, said at its end: steps, wall time, samples/s, the final and best validation figures,
the newest checkpoint, and the next commands to try with this run's paths filled in. Printed by rank 0 (the log)
and written to `{output_dir}/summary.json`, so that a script (or a later stage) can read it."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from mmscale.training import checkpoint
from mmscale.training.trainer import format_metrics


def _best(records: list[dict[str, Any]], key: str) -> tuple[float, int] | None:
    """(best value, its step) of `key` over the records that hold it: the lowest for a loss, else the highest."""
    seen = [(r[key], r["step"]) for r in records if isinstance(r.get(key), (int, float))]
    if not seen:
        return None
    return min(seen) if key.endswith("loss") else max(seen, key=lambda vs: (vs[0], -vs[1]))


def run_summary(trainer: Any, wall_s: float, samples_at_start: int = 0, step_at_start: int = 0) -> dict[str, Any]:
    """The summary of a run that `trainer` has just trained (rank 0's history); `*_at_start`: where this session
    began (a resumed run's earlier sessions are not in its wall time)."""
    records = trainer.history
    evals = [r for r in records if any(k.startswith("val_") for k in r) and "task_end" not in r]
    final = {k: v for k, v in (evals[-1] if evals else {}).items() if k.startswith("val_") and isinstance(v, float)}
    best = {k: {"value": b[0], "step": b[1]} for k in final if (b := _best(evals, k)) is not None}
    newest = checkpoint.latest_checkpoint(trainer.ckpt_root) if trainer.ckpt_root.is_dir() else None
    run = shlex.quote(str(trainer.output_dir))
    cfg = trainer.cfg
    commands = [f"python launchers/evaluate.py --checkpoint {run}"]
    if not cfg.data.train_shards and cfg.data.synthetic_task == "shapes" and "captioning" in trainer.objectives:
        commands.append(f"mmscale-demo-objects --run {run}")
    task = f" --task {shlex.quote(cfg.continual.tasks[-1].name)}" if any(
        c.name == "task_adapters" for c in cfg.callbacks) else ""
    commands.append(f"python launchers/export.py --run {run} --out {run}/exported{task}")
    if "captioning" in trainer.objectives:
        val = cfg.data.val_shards or (str(trainer.output_dir / "data" / "val")
                                      if (trainer.output_dir / "data" / "val").is_dir() else "")
        if val:
            commands.append(f"python launchers/generate.py --model {run} --shards {shlex.quote(val)} --limit 8{task}")
    return {
        "steps": trainer.step,
        "steps_this_session": trainer.step - step_at_start,
        "wall_s": round(wall_s, 1),
        "samples": trainer.samples_seen,
        "samples_per_s": round((trainer.samples_seen - samples_at_start) / wall_s, 2) if wall_s > 0 else None,
        "final_validation": final,
        "best_validation": best,
        "newest_checkpoint": str(newest) if newest else None,
        "preempted": trainer.preempted,
        "next": commands,
    }


def format_summary(s: dict[str, Any]) -> str:
    resumed = s["steps_this_session"] != s["steps"]
    lines = [f"run done: {s['steps']} steps ({s['steps_this_session']} in this session) in {s['wall_s']:.0f} s "
             f"({s['samples_per_s']} samples/s)" if resumed else
             f"run done: {s['steps']} steps in {s['wall_s']:.0f} s ({s['samples_per_s']} samples/s)"]
    if s["final_validation"]:
        lines.append("  final validation: " + format_metrics(s["final_validation"]))
        lines.append("  best validation:  " + ", ".join(f"{k} {b['value']:.4g} (step {b['step']})"
                                                         for k, b in s["best_validation"].items()))
    lines.append(f"  newest checkpoint: {s['newest_checkpoint'] or 'none'}")
    lines.append("  next:")
    lines += [f"    {c}" for c in s["next"]]
    return "\n".join(lines)


def write_summary(trainer: Any, wall_s: float, samples_at_start: int = 0, step_at_start: int = 0) -> dict[str, Any]:
    """Rank 0: log the summary and write `{output_dir}/summary.json`; returns it."""
    import logging

    s = run_summary(trainer, wall_s, samples_at_start, step_at_start)
    logging.getLogger("mmscale.job").info("%s", format_summary(s))
    path = Path(trainer.output_dir) / "summary.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(s, indent=2))
    tmp.replace(path)
    return s
