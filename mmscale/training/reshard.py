"""Resume a checkpoint on another world size: DeepSpeed's universal checkpoint, made on the fly.

DeepSpeed's ZeRO files are per rank: under ZeRO-3, rank r's optimizer file holds its partition of every trainable
parameter's fp32 master weight and Adam moments (flat, ceil(numel / world) elements each, the last rank's padded),
and its model file its partition of every frozen parameter. A run resumed on another number of ranks (a requeued
SLURM job given fewer nodes) needs them cut again:

    convert (rank 0)   step_N/ (W ranks' files) -> {root}/.universal/step_N/zero/<param>/{fp32,exp_avg,exp_avg_sq}.pt
                       DeepSpeed's own converter (deepspeed.checkpoint.ds_to_universal), its torch.load calls made
                       weights_only (zero_checkpoint.loads_are_safe); then the frozen parameters, which that
                       converter leaves out, consolidated from every rank's fragments the same way
    load (every rank)  DeepSpeed's `load_universal_checkpoint` path reads each parameter whole and keeps this
                       rank's slice of the new partitioning; then two repairs for mmscale's optimizer (below) and
                       the frozen parameters' slices

Why DeepSpeed's universal checkpoint and not a consolidation of our own: its per-parameter files are what lets
every rank read one parameter at a time (no rank ever holds the whole model's fp32 weights and moments), and its
loader knows ZeRO-3's flat groups, sub-groups and persistent parameters. What it gets wrong for mmscale in 0.19.8
(ZeRO-3, `load_hp_checkpoint_state_from_checkpoint_dir_stage3`), repaired in `load`:
- it copies parameter group 0's hyperparameters into every group: the no-decay group (biases, norms, gates)
  would get weight decay; each group's saved values are put back;
- it gives every sub-group the same `step` tensor object, which torch's AdamW increments in place once per group
  and step: Adam's bias correction would run ahead; each group gets its own copy.

ZeRO-3 only (`SUPPORTED_STAGE`): the trainer refuses another world size for ZeRO stages 0-2, whose conversion was
not tried here. The universal folder is deleted once every rank has loaded it.
The trainer state (step, data position, RNG, callbacks) is merged by `merge_trainer_states`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmscale.training.zero_checkpoint import loads_are_safe, safe_load

log = logging.getLogger("mmscale.reshard")

UNIVERSAL_DIR = ".universal"
"""Where, under the checkpoint root (a filesystem every rank sees), the converted checkpoint is written."""

SUPPORTED_STAGE = 3
"""The ZeRO stage whose checkpoints resume on another world size."""


def universal_dir(ckpt_root: Path, tag: str) -> Path:
    return Path(ckpt_root) / UNIVERSAL_DIR / tag


# ----------------------------------------------------------------------------------------------- convert (rank 0)


def convert(ckpt: Path, out: Path) -> None:
    """Rank 0: write checkpoint `ckpt` (any world size, ZeRO-3) as a universal checkpoint in `out` (replaced).
    Every file is read with weights_only=True."""
    from deepspeed.checkpoint import ds_to_universal

    ckpt, out = Path(ckpt), Path(out)
    shutil.rmtree(out.parent, ignore_errors=True)  # a conversion a crash left behind
    args = argparse.Namespace(input_folder=str(ckpt), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False)
    chatter = io.StringIO()  # the converter prints its progress; kept for the log
    with loads_are_safe(), contextlib.redirect_stdout(chatter):
        ds_to_universal.main(args)
    log.debug("ds_to_universal: %s", chatter.getvalue())
    _convert_frozen(ckpt, out / "zero")


def _convert_frozen(ckpt: Path, zero: Path) -> None:
    """The frozen parameters (not the optimizer's, so not in DeepSpeed's conversion): each rank's model file holds
    its flat partition of each; they are concatenated in rank order, the padding cut, and written as
    `zero/<name>/fp32.pt` like the trainable ones (in the dtype they were saved in). One rank's file at a time."""
    files = sorted(ckpt.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"),
                   key=lambda p: int(p.name.split("_")[3]))
    shapes, parts = None, {}
    for f in files:
        sd = safe_load(f)
        frags = sd.get("frozen_param_fragments")
        if not frags:  # saved without the frozen weights (exclude_frozen_parameters): the build supplies them
            return
        shapes = sd["frozen_param_shapes"]
        for name, t in frags.items():
            parts.setdefault(name, []).append(t.flatten().clone())
        del sd, frags
    for name, shape in (shapes or {}).items():
        numel = int(torch.Size(shape).numel())
        full = torch.cat(parts.pop(name))[:numel].view(shape)
        (zero / name).mkdir(parents=True, exist_ok=True)
        torch.save({"param": full}, zero / name / "fp32.pt")


# ----------------------------------------------------------------------------------------------- load (every rank)


def load(ds_engine: Any, out: Path, tag: str) -> None:
    """Every rank: load the universal checkpoint `out` (made by `convert`) into this engine's partitioning."""
    import torch.distributed as dist

    out = Path(out)
    config = ds_engine._config
    config.load_universal_checkpoint = True  # read by DeepSpeed at every load; on for this one only
    try:
        with loads_are_safe():
            path, _ = ds_engine.load_checkpoint(str(out.parent), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    finally:
        config.load_universal_checkpoint = False
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint {out}")
    saved = safe_load(out / "zero" / "optimizer_state.pt")
    _repair_param_groups(ds_engine, saved)
    rank = dist.get_rank() if dist.is_initialized() else 0
    _load_frozen(ds_engine, out / "zero", rank)


def _repair_param_groups(ds_engine: Any, saved: dict[str, Any]) -> None:
    """Each group's own hyperparameters (weight decay!) and its own `step` tensor (see the module doc)."""
    zero = ds_engine.optimizer
    base = zero.optimizer  # torch's AdamW over the fp32 partitions
    groups = saved["optimizer_state_dict"]["param_groups"]
    if len(groups) != len(base.param_groups):
        raise RuntimeError(f"the checkpoint's optimizer has {len(groups)} parameter groups, this run's "
                           f"{len(base.param_groups)}")
    for group, old in zip(base.param_groups, groups):
        group.update({k: v for k, v in old.items() if k != "params"})
    for flat in zero.fp32_partitioned_groups_flat:
        state = base.state.get(flat)
        if state and torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def _load_frozen(ds_engine: Any, zero: Path, rank: int) -> None:
    """This rank's slice of each frozen parameter the conversion wrote (ZeRO-3 partitioning: ceil(numel / world)
    elements per rank, zero padding at the end); a persistent one (held whole on every rank) whole as well."""
    import torch.distributed as dist

    for name, p in ds_engine.module.named_parameters():
        if p.requires_grad or not (zero / name / "fp32.pt").is_file():
            continue
        full = safe_load(zero / name / "fp32.pt")["param"]
        with torch.no_grad():
            if hasattr(p, "ds_id"):
                part = p.ds_tensor.numel()
                r = dist.get_rank(group=p.ds_process_group) if dist.is_initialized() else rank
                flat = full.flatten()
                flat = torch.cat([flat, flat.new_zeros(max(0, part * (r + 1) - flat.numel()))])
                p.ds_tensor.data.copy_(flat[r * part:(r + 1) * part])
                if p.data.numel() == full.numel():  # gathered now (persistent): the whole of it too
                    p.data.copy_(full.view(p.data.shape))
            else:
                p.data.copy_(full.view(p.shape))


# ----------------------------------------------------------------------------------------------- trainer state


def fresh_rng_state(seed: int, step: int, rank: int) -> dict[str, Any]:
    """RNG states for a rank resumed on another world size (the saved ones are per rank and no longer map to
    ranks): every generator seeded from (train.seed, step, rank) by numpy's SeedSequence, in the layout of
    `trainer.rng_state()`. The process's generators are not touched here. CUDA generators: None (they keep what
    the build seeded)."""
    import random

    s = int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])
    kind, keys, pos, has_gauss, cached = np.random.RandomState(s).get_state()
    return {
        "python": random.Random(s).getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.Generator().manual_seed(s).get_state(),
        "cuda": None,
    }


def merge_trainer_states(states: list[dict[str, Any]], rank: int, world_size: int, seed: int,
                         global_callbacks: set[str]) -> tuple[dict[str, Any], list[str]]:
    """The trainer state rank `rank` of `world_size` resumes from, given every saved rank's (`states`, in saved
    rank order, from another world size), and why it cannot (one message per problem).

    - step, samples and tokens seen, non-finite steps, lr scale, task rows: the same on every saved rank; rank 0's.
    - skip counters (per rank, summed over ranks when logged): their sums on new rank 0, zero on the others.
    - data: saved rank `rank`'s position (rank 0's past the old ranks) plus every saved rank's (`data_all_ranks`),
      for the loader's `load_state_dict(sd, all_ranks=...)`.
    - RNG: `fresh_rng_state(seed, step, rank)`.
    - callbacks: an empty state moves as it is; one whose key (`i:name`) is in `global_callbacks` (the same on
      every rank by design) takes rank 0's; any other is per rank and refused, naming the callback.
    """
    base = states[0]
    problems = []
    callbacks = {}
    for key in sorted({k for s in states for k in s.get("callbacks", {})}):
        values = [s.get("callbacks", {}).get(key) for s in states]
        if all(not v for v in values):
            callbacks[key] = values[0] if values[0] is not None else {}
        elif key in global_callbacks:
            callbacks[key] = values[0]
        else:
            name = key.split(":", 1)[-1]
            problems.append(f"callback {name!r} (callbacks[{key.split(':', 1)[0]}]) keeps state per rank, which "
                            f"cannot be cut for another world size; resume with {len(states)} rank(s)")
    kinds: dict[str, int] = {}
    for s in states:
        for k, n in s.get("data_skipped_by_kind", {}).items():
            kinds[k] = kinds.get(k, 0) + int(n)
    main = rank == 0
    merged = {
        **base,
        "data_skipped": sum(int(s["data_skipped"]) for s in states) if main else 0,
        "data_skipped_by_kind": kinds if main else {k: 0 for k in kinds},
        "data": states[rank if rank < len(states) else 0]["data"],
        "data_all_ranks": [s["data"] for s in states],
        "rng": fresh_rng_state(seed, int(base["step"]), rank),
        "callbacks": callbacks,
        "resharded_from": len(states),
    }
    return merged, problems
