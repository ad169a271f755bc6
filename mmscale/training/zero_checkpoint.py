"""Read DeepSpeed checkpoint files without unpickling anything but tensors and plain data.

DeepSpeed's own readers call `torch.load(..., weights_only=False)`, which runs whatever code a pickle names: a
crafted file in a shared or copied run directory would run it on `--resume`, on a rollback, on export. Every load
here is `weights_only=True`, with exactly the few DeepSpeed classes its files hold allowed (`_safe_globals`: the ZeRO
stage enum, the loss scalers' plain attributes, ZeRO-1/2's fragment addresses); this is the one allow-list, used by
the engine's resume and rollback (mmscale.training.engine), export and init_from alike. DeepSpeed's own reading logic
is reused as it is, with its `torch.load` calls redirected through `safe_load` while it runs (`loads_are_safe`).

`fp32_state_dict` (and export's streaming CheckpointReader, through `master_index`/`read_master`) gives the fp32
master weights at every stage: at ZeRO-2/3 DeepSpeed's consolidation of the optimizer's partitions, at ZeRO-0/1 in a
bf16 run the optimizer's fp32 copy rather than the module's bf16 weights (see "ZeRO-0/1 masters" below).
"""

from __future__ import annotations

import contextlib
import logging
import math
import pickle
import re
from pathlib import Path
from typing import Any, Iterator

import torch

log = logging.getLogger(__name__)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file names a Python object that is not a tensor, plain data or one of DeepSpeed's allowed
    classes: loading it with `weights_only=False` would have run code. Never treated as mere damage."""


def _safe_globals() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address  # in ZeRO-1/2 optimizer files

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


_torch_load = torch.load


def safe_load(path: Any, map_location: Any = "cpu", **_ignored: Any) -> Any:
    """`torch.load` that unpickles tensors, plain containers and DeepSpeed's few data classes only (`path`: a path
    or a file object). A file naming anything else raises UnsafeCheckpointError, with nothing of it run."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return _torch_load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if isinstance(e, UnsafeCheckpointError) or "Weights only load failed" not in str(e):
            raise
        detail = next((line.strip() for line in str(e).splitlines() if "global" in line.lower()),
                      str(e).splitlines()[0])
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it names a Python object other than tensors, plain data and DeepSpeed's "
            f"allowed classes, which unpickling would run (a file neither DeepSpeed nor mmscale wrote, or one "
            f"changed since; nothing of it was run). Check where this run directory came from. torch: {detail}"
        ) from None


@contextlib.contextmanager
def loads_are_safe() -> Iterator[None]:
    """While DeepSpeed's reader runs, its `torch.load(..., weights_only=False)` calls become `safe_load`.

    Replaces `torch.load` process-wide for the duration (DeepSpeed calls it by module attribute): only for a load
    that nothing else in the process runs beside (data workers are other processes)."""
    def load(f: Any, map_location: Any = None, *args: Any, **kwargs: Any) -> Any:
        return safe_load(f, map_location=map_location or "cpu")

    torch.load = load
    try:
        yield
    finally:
        torch.load = _torch_load


def natural_order(p: Path) -> list[Any]:
    """Sort key of DeepSpeed's per-rank files: `..._rank_10_...` after `..._rank_9_...`."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def zero_stage(model_states: dict[str, Any]) -> int:
    return int(((model_states.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0))


def fp32_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Full fp32 model weights of one checkpoint directory, whatever the ZeRO stage and world size it was saved at:
    the optimizer's fp32 master copy of every weight it steps, the module's own weights (widened) of the rest."""
    model_states = sorted(ckpt.glob("*model_states.pt"), key=natural_order)
    if not model_states:
        raise FileNotFoundError(f"{ckpt} holds no DeepSpeed model states (*model_states.pt)")
    meta = safe_load(model_states[0])
    stage = zero_stage(meta)
    if stage >= 2:  # the weights live sharded in the optimizer states: DeepSpeed's consolidation, loads made safe
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with loads_are_safe():
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    optims = [safe_load(f)["optimizer_state_dict"] for f in optim_files(ckpt, meta)]
    where = master_index(meta, optims, ckpt)
    groups = master_groups(meta, optims)
    return {k: read_master(groups, where[k]).view(v.shape).clone() if k in where else v.float()
            for k, v in meta["module"].items()}


# ----------------------------------------------------------------------------------------------- ZeRO-0/1 masters
#
# At ZeRO-0 and ZeRO-1 the module in `*model_states.pt` holds every weight whole, but in a bf16 (or fp16) run that is
# the 16-bit copy: the fp32 master the optimizer steps is in the optimizer's state, and it is what export and
# init_from read (a fp32 run's module weights are the masters themselves).
#   ZeRO-1 (DeepSpeed's ZeRO optimizer, or its BF16_Optimizer with fp32 gradient accumulation): one rank file per
#     rank, `single_partition_of_fp32_groups[g]` its slice of group g's flat fp32 vector; the rank slices laid end
#     to end are the whole group (the tail padded), the weights in it `param_shapes[g]` in order, each followed by
#     its `param_alignment_paddings[g][i]` where recorded (as at ZeRO-2).
#   ZeRO-0 (FP16_UnfusedOptimizer, what a 16-bit run with torch's AdamW gets): no optimizer file; the model states'
#     `optimizer.fp32_groups[g][i]`, one tensor per weight, in the client optimizer's group order. DeepSpeed does not
#     record their names there (its `param_shapes` is None below ZeRO-1), so `_name_masters` recovers them.


def low_precision(model_states: dict[str, Any]) -> bool:
    ds = model_states.get("ds_config") or {}
    return any((ds.get(k) or {}).get("enabled") for k in ("bf16", "fp16", "bfloat16"))


def optim_files(ckpt: Path, model_states: dict[str, Any]) -> list[Path]:
    """The `*optim_states.pt` files holding a ZeRO-1 16-bit run's masters, in rank order ([] where there are none
    to read: ZeRO-0, or a fp32 run)."""
    if zero_stage(model_states) != 1 or not low_precision(model_states):
        return []
    files = sorted(ckpt.glob("*optim_states.pt"), key=natural_order)
    if not files:
        raise FileNotFoundError(f"{ckpt}: a ZeRO-1 bf16 checkpoint without its *optim_states.pt files (the fp32 "
                                f"master weights)")
    return files


def master_groups(model_states: dict[str, Any], optims: list[dict[str, Any]]) -> list[list[torch.Tensor]]:
    """Per optimizer group, the pieces `read_master` addresses: ZeRO-1 each rank's slice of the flat vector, ZeRO-0
    one tensor per weight ([] where the module's weights are the masters). `optims`: the rank files'
    `optimizer_state_dict`s, in rank order."""
    if optims:
        return [[o["single_partition_of_fp32_groups"][g] for o in optims]
                for g in range(len(optims[0]["single_partition_of_fp32_groups"]))]
    if zero_stage(model_states) == 0 and low_precision(model_states):
        return [[t.detach() for t in g] for g in (model_states.get("optimizer") or {}).get("fp32_groups") or []]
    return []


def read_master(groups: list[list[torch.Tensor]], where: tuple[Any, ...]) -> torch.Tensor:
    """The flat fp32 master weight at `where` (from `master_index`) of `groups` (from `master_groups`)."""
    how, g, *args = where
    if how == "tensor":  # ZeRO-0: the weight's own tensor
        return groups[g][args[0]].reshape(-1)
    offset, numel = args  # ZeRO-1: a range of the group's flat vector, which may span ranks
    pieces, start = [], 0
    for part in groups[g]:
        lo, hi = max(offset, start), min(offset + numel, start + part.numel())
        if lo < hi:
            pieces.append(part[lo - start:hi - start])
        start += part.numel()
    return torch.cat(pieces) if len(pieces) != 1 else pieces[0]


def master_index(model_states: dict[str, Any], optims: list[dict[str, Any]], ckpt: Path | str = "checkpoint"
                 ) -> dict[str, tuple[Any, ...]]:
    """name -> where its fp32 master lies (for `read_master`), for every weight the optimizer of a ZeRO-0/1 16-bit
    checkpoint steps; {} where the module's weights are the masters (fp32, or ZeRO-2/3, read otherwise)."""
    stage = zero_stage(model_states)
    if stage > 1 or not low_precision(model_states):
        return {}
    groups = master_groups(model_states, optims)
    module = model_states["module"]
    if stage == 1:
        world = optims[0].get("partition_count")
        world = max(world) if isinstance(world, list) else int(world)
        if world != len(optims):
            raise ValueError(f"{ckpt}: saved by {world} ranks, but holds {len(optims)} optimizer-state files (an "
                             f"incomplete checkpoint)")
        shapes = model_states["param_shapes"]
        paddings = optims[0].get("param_alignment_paddings")
        where: dict[str, tuple[Any, ...]] = {}
        for g, group in enumerate(shapes):
            offset, size = 0, sum(p.numel() for p in groups[g])
            for i, (name, shape) in enumerate(group.items()):
                numel = math.prod(shape)
                where[name] = ("flat", g, offset, numel)
                offset += numel + (paddings[g][i] if paddings else 0)
            if offset > size:
                raise ValueError(f"{ckpt}: optimizer group {g} names {offset} fp32 elements but holds {size}: not "
                                 f"a checkpoint of these parameter shapes")
        return where
    if not groups:
        opt = model_states.get("optimizer") or {}
        raise ValueError(f"{ckpt}: a ZeRO-0 16-bit checkpoint whose optimizer state has no fp32_groups (it holds "
                         f"{sorted(opt)[:8]}): this reader does not know where its fp32 master weights are")
    return _name_masters(groups, module, ckpt)


def _same(master: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `weight` is `master` rounded to the weight's dtype, as DeepSpeed copies it after every step (the first
    elements first: with memory-mapped files that reads one page of a weight that differs)."""
    if tuple(master.shape) != tuple(weight.shape):
        return False
    m, w = master.reshape(-1), weight.reshape(-1)
    return torch.equal(m[:64].to(w.dtype), w[:64]) and torch.equal(m.to(w.dtype), w)


def _name_masters(groups: list[list[torch.Tensor]], module: dict[str, torch.Tensor], ckpt: Path | str
                  ) -> dict[str, tuple[Any, ...]]:
    """The names of ZeRO-0's unnamed fp32 masters. Each group's weights are the trainable parameters of the client
    optimizer's group in `named_parameters` order: a subsequence of the module's state-dict order, each master
    rounding exactly to its module weight. A master is named where that embedding leaves it one choice (its leftmost
    and rightmost fit agree); a weight it leaves ambiguous, a bf16-identical twin of another of the same shape (say
    a norm still at its init beside a frozen one), keeps the module's value, with a warning (its master differs
    from that by less than bf16 resolves). Tied names (one storage) share their master."""
    first: dict[tuple[Any, ...], str] = {}
    aliases: dict[str, str] = {}
    names: list[str] = []
    for name, t in module.items():
        if not t.is_floating_point():
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
            names.append(name)
    where: dict[str, tuple[Any, ...]] = {}
    unsure: list[str] = []
    claimed: dict[str, int] = {}
    for g, group in enumerate(groups):
        left, j = [], 0
        for m in group:
            while j < len(names) and not _same(m, module[names[j]]):
                j += 1
            left.append(j)
            j += 1
        if j > len(names) or (left and left[-1] >= len(names)):
            unsure.append(f"group {g}: its {len(group)} masters fit no weights of the module in order")
            continue
        right, j = [0] * len(group), len(names) - 1
        for i in range(len(group) - 1, -1, -1):
            while j >= 0 and not _same(group[i], module[names[j]]):
                j -= 1
            right[i] = j
            j -= 1
        for i, (lo, hi) in enumerate(zip(left, right)):
            if lo == hi:
                where[names[lo]] = ("tensor", g, i)
                claimed[names[lo]] = claimed.get(names[lo], 0) + 1
            else:
                unsure.append(f"{names[lo]} or {names[hi]}")
    for name, n in claimed.items():
        if n > 1:  # fits a master of two groups: neither is certain
            del where[name]
            unsure.append(name)
    for alias, name in aliases.items():
        if name in where:
            where[alias] = where[name]
    if unsure:
        log.warning("%s: %d fp32 master weight(s) of this ZeRO-0 bf16 checkpoint could not be named for certain; "
                    "their bf16 module weights are read instead, exact to bf16 (%s)", ckpt, len(unsure),
                    "; ".join(unsure[:5]))
    return where
