"""Read DeepSpeed checkpoint files without unpickling anything but tensors and plain data.

DeepSpeed's own readers call `torch.load(..., weights_only=False)`, which runs whatever code a pickle names: a
crafted file in a shared or copied run directory would run it on `--resume`, on a rollback, on export. Every load
here is `weights_only=True`, with exactly the few DeepSpeed classes its files hold allowed (`_safe_globals`: the ZeRO
stage enum, the loss scalers' plain attributes, ZeRO-1/2's fragment addresses); this is the one allow-list, used by
the engine's resume and rollback (mmscale.training.engine), export and init_from alike. DeepSpeed's own reading logic
is reused as it is, with its `torch.load` calls redirected through `safe_load` while it runs (`loads_are_safe`).
"""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path
from typing import Any, Iterator

import torch


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


def fp32_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Full fp32 model weights of one checkpoint directory, whatever the ZeRO stage and world size it was saved at."""
    model_states = sorted(ckpt.glob("*model_states.pt"))
    if not model_states:
        raise FileNotFoundError(f"{ckpt} holds no DeepSpeed model states (*model_states.pt)")
    meta = safe_load(model_states[0])
    stage = (meta.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0)
    if stage >= 2:  # the weights live sharded in the optimizer states: DeepSpeed's consolidation, loads made safe
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with loads_are_safe():
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    return {k: v.float() for k, v in meta["module"].items()}
