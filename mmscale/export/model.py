"""`export_model`: one checkpoint of a run written as one folder (the layout: the package docstring), every problem
with what it is given reported before any work, then written into a temporary sibling folder and renamed into place
when complete. The weights stream from the checkpoint's files (a checkpoint that holds them all) or from the model
rebuilt once (one that holds only what trained: its LoRA / DoRA / IA3 adapters merged or set aside in peft's
format)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

from mmscale.callbacks.task_adapters import TaskHeads, select_task
from mmscale.export.adapter import adapter_settings, not_lm_adapter, write_adapter, write_task_adapters
from mmscale.export.config import export_config
from mmscale.export.inputs import open_run, out_problems
from mmscale.export.layout import (TASK_METHOD, ADAPTER_DIR, ADAPTER_METHODS, CONFIG_JSON, CONFIG_YAML, FORMAT, FORMAT_VERSION,
                                   ExportError)
from mmscale.export.merge import plain_linears
from mmscale.export.readme import mmscale_version, provenance, readme
from mmscale.export.shards import (DEFAULT_MAX_SHARD_SIZE, as_dtype, memory_status, parse_size, reset_peak_memory,
                                   tied_groups, write_weights)
from mmscale.training import run_paths
from mmscale.training.readers import SAFETENSORS, CheckpointReader, ModelTensors

log = logging.getLogger(__name__)


def _copy_tokenizer(src: str, out: Path) -> str:
    """The run's tokenizer into `out`: a sentencepiece file as `tokenizer.model`, a folder as `tokenizer/`."""
    p = Path(src)
    if p.is_file():
        shutil.copy2(p, out / "tokenizer.model")
        return "tokenizer.model"
    shutil.copytree(p, out / "tokenizer")
    return "tokenizer"


def task_problems(cfg: Any, task: str | None, adapters: str) -> list[str]:
    """What `--task` must be for this run: a task of a task_adapters run (and nothing for any other run)."""
    names = [t.name for t in cfg.continual.tasks]
    if TASK_METHOD not in [c.name for c in cfg.callbacks]:
        return [f"--task {task}: the run has no per-task modules (no task_adapters callback); leave --task out"] \
            if task is not None else []
    p = []
    if task is None and adapters != "separate":
        p.append(f"the run has one module per task ({', '.join(names)}, from task_adapters): give --task NAME to "
                 f"export that task's model")
    elif task not in names:
        p.append(f"--task {task}: not one of the run's tasks ({', '.join(names)})")
    if adapters == "separate" and task is not None:
        p.append(f"--task {task} with --adapters separate: separate writes every task's adapter (leave --task out); "
                 f"--task exports that one task merged")
    elif adapters == "separate":
        return []  # every task's adapter in its own folder
    return p


def export_model(run_dir: str | Path, out: str | Path, checkpoint_dir: str | Path | None = None,
                 adapters: str = "merged", max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
                 dtype: str | None = None, overwrite: bool = False, command: str | None = None,
                 task: str | None = None) -> dict[str, Any]:
    """Export one checkpoint of the run in `run_dir` to the folder `out` (see the package's docstring). Written into
    a temporary sibling folder and renamed into place when complete. Returns a summary (files, sizes, peak memory).
    Raises ExportError naming every problem (and its fix) before any work. `task`: a task_adapters run is exported
    as the plain model of one task (its adapter merged, its heads the model's), which the export records."""
    from mmscale.data import load_tokenizer
    from mmscale.job.build import build_as_trained, model_recipe
    from mmscale.job.runs import build_from_checkpoint
    from mmscale.training import checkpoint as ckpts

    run, out = Path(run_dir), Path(out)
    reset_peak_memory()
    at_start = memory_status()
    problems: list[str] = []
    if adapters not in ("merged", "separate"):
        problems.append(f"--adapters {adapters!r}: choose merged or separate")
    try:
        max_bytes = parse_size(max_shard_size)
    except ValueError as e:
        problems.append(str(e))
    cfg, ckpt = open_run(run, checkpoint_dir, problems)
    problems += out_problems(out, run, overwrite)
    peft_method = None  # --adapters separate: the callback whose adapters are set aside
    if cfg is not None:
        problems += task_problems(cfg, task, adapters)
        methods = [c.name for c in cfg.callbacks if c.name in ADAPTER_METHODS]
        if adapters == "separate" and TASK_METHOD not in [c.name for c in cfg.callbacks]:
            if not methods:
                problems.append(f"--adapters separate: the run's callbacks ({[c.name for c in cfg.callbacks]}) hold "
                                f"no lora or qlora; leave --adapters out (separate is for the adapters of lora, "
                                f"qlora, dora and ia3)")
            else:
                try:
                    peft_method = adapter_settings(cfg)
                except ValueError as e:
                    problems.append(f"--adapters separate: {e}; export with --adapters merged")
        if not Path(cfg.data.tokenizer).exists():
            problems.append(f"the run's tokenizer {cfg.data.tokenizer!r} (data.tokenizer, as "
                            f"{ckpt or run / CONFIG_YAML} records it) does not exist; put it back there")
        try:
            export_dtype = as_dtype(dtype or cfg.train.precision)
        except ValueError as e:
            problems.append(f"--dtype: {e}")
    if problems:
        raise ExportError(problems)

    manifest = ckpts.read_manifest(ckpt) or {}
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    methods = [c.name for c in cfg.callbacks if c.name in ADAPTER_METHODS]
    run_model = model_recipe(cfg).build(tokenizer.vocab_size, meta=True)
    vocab_size = int(run_model.lm.get_input_embeddings().num_embeddings)
    del run_model

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        tok_name = _copy_tokenizer(cfg.data.tokenizer, tmp)
        cfg_out, changes = export_config(cfg, tok_name, vocab_size)
        expected_model = build_as_trained(cfg_out, vocab_size, meta=True)  # the names and shapes to write
        state = expected_model.state_dict(keep_vars=True)
        tied = tied_groups(state)
        expected = {n: tuple(t.shape) for n, t in state.items() if n not in tied}
        num_params = sum(math.prod(s) for s in expected.values())
        del expected_model, state

        per_task = TASK_METHOD in [c.name for c in cfg.callbacks]
        full = not manifest.get("frozen_fingerprint") and not per_task
        merge_counts: dict[str, int] = {}
        model = None
        if full:  # every weight is in the checkpoint: straight from its files to ours
            source: Any = CheckpointReader(ckpt)
            log.info("streaming the ZeRO-%d checkpoint %s (world size %s)", source.stage, ckpt,
                     manifest.get("world_size"))
        else:  # only what trained: rebuild once, frozen weights from their sources; merge or set aside the adapters
            log.info("rebuilding the model of %s (%s)", ckpt, f"task {task}'s module of a task_adapters run"
                     if per_task else "its checkpoint holds only what trained")
            model = build_from_checkpoint(cfg, ckpt, tokenizer.vocab_size)
            if per_task and adapters == "separate":  # every task's module in adapters/<task>/; the base: none
                n = write_task_adapters(model, cfg, tmp / ADAPTER_DIR)
                log.info("wrote %d tasks' adapters to %s/ (peft's format for the LM, the rest beside it)", n,
                         ADAPTER_DIR)
            if per_task:  # one task's module: its adapter is the active one (the one merged), its heads the model's
                select_task(model, task if task is not None else 0)  # (separate: the base's heads are task 0's)
                for objective in model.objectives.values():
                    if isinstance(getattr(objective, "head", None), TaskHeads):
                        objective.head = objective.head.heads[objective.head.active]
            if peft_method is not None:
                n = write_adapter(model, peft_method, tmp / ADAPTER_DIR, cfg.model.lm.path or None, run)
                log.info("wrote %d adapter tensors in peft's format to %s/", n, ADAPTER_DIR)
            # separate: the LM's adapters are set aside (written above); those on the cross-attention and the
            # resampler (model.train_xattn / train_resampler = lora) have no place in the LM's adapter and merge
            merge_counts = plain_linears(model, merge=adapters == "merged",
                                         merge_also=None if per_task else not_lm_adapter(model))
            source = ModelTensors(model)
        missing = [n for n in expected if n not in source]
        unexpected = [n for n in source.names if n not in expected and n not in tied]
        mismatched = [f"{n}: model {expected[n]}, checkpoint {source.shape(n)}" for n in expected
                      if n in source and tuple(source.shape(n)) != expected[n]]
        if missing or unexpected or mismatched:
            raise ExportError(f"checkpoint {ckpt} does not fit the model its config builds: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}, shapes {mismatched[:5]}")
        items = [(n, shape, export_dtype if source.dtype(n).is_floating_point else source.dtype(n))
                 for n, shape in expected.items()]
        before_weights = memory_status()
        written = write_weights(tmp, items, source.read, max_bytes,
                                {"mmscale_format": FORMAT, "mmscale_format_version": str(FORMAT_VERSION)})
        del source, model

        # self-contained like a run's (mmscale.training.run_paths): the tokenizer, in this folder, relative to it
        # and output_dir ".", every other path absolute
        here = dataclasses.replace(cfg_out, output_dir=str(out),
                                   data=dataclasses.replace(cfg_out.data, tokenizer=str(out / tok_name)))
        (tmp / CONFIG_YAML).write_text(run_paths.portable_yaml(here, out))
        changes.append(f"output_dir: {cfg.output_dir!r} -> '.' (this folder; the run is trained_by.run)")
        adapters_info = None
        if per_task:
            adapters_info = {"method": TASK_METHOD, "task": task, "tasks": [t.name for t in cfg.continual.tasks],
                             "args": dict(next(c for c in cfg.callbacks if c.name == TASK_METHOD).args),
                             "mode": adapters, **({"path": ADAPTER_DIR} if adapters == "separate" else {}),
                             **merge_counts}
        elif methods:
            callback = next(c for c in cfg.callbacks if c.name in ADAPTER_METHODS)
            adapters_info = {"method": callback.name, "args": dict(callback.args), "mode": adapters,
                             **({"path": ADAPTER_DIR, "format": "peft"} if adapters == "separate" else {}),
                             **merge_counts}
        peak = memory_status()
        info = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "architectures": ["mmscale.MultimodalModel"],
            "dtype": str(export_dtype).removeprefix("torch."),
            "vocab_size": vocab_size,
            "tokenizer": tok_name,
            "tokenizer_vocab_size": tokenizer.vocab_size,
            "weights": written["index"] or SAFETENSORS,
            "files": written["files"],
            "total_size": written["total_size"],
            "num_parameters": num_params,
            "tied_weights": tied,
            "adapters": adapters_info,
            "trained_by": provenance(cfg, run, ckpt, manifest),
            "config_changes": changes,
            "exported": {
                "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "command": command,
                "mmscale_version": mmscale_version(),
                "path": "streamed from the checkpoint files" if full else "rebuilt in memory, then streamed",
                "peak_rss_bytes": peak.get("peak"),
                "rss_at_start_bytes": at_start.get("rss"),
                "rss_before_weights_bytes": before_weights.get("rss"),
            },
        }
        (tmp / CONFIG_JSON).write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "README.md").write_text(readme(info, out))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "checkpoint": str(ckpt), "step": manifest.get("step"), "files": written["files"],
            "total_size": written["total_size"], "num_parameters": num_params, "dtype": info["dtype"],
            "adapters": adapters_info, "peak_rss_bytes": peak.get("peak"), "rss_at_start_bytes": at_start.get("rss"),
            "rss_before_weights_bytes": before_weights.get("rss")}
