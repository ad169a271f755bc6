"""Read DeepSpeed checkpoint files in one process without unpickling anything but tensors and plain data.

DeepSpeed's own readers call `torch.load(..., weights_only=False)`, which runs whatever code a pickle names. Here
every load is `weights_only=True`, with exactly two DeepSpeed classes allowed (the ZeRO stage enum and the loss
scaler's plain attributes, which DeepSpeed stores in its optimizer files). DeepSpeed's consolidation logic is reused
as it is, with its `torch.load` calls redirected through `safe_load` while it runs.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch


def _safe_globals() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address  # in ZeRO-1/2 optimizer files

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


_torch_load = torch.load


def safe_load(path: str | Path, map_location: Any = "cpu", **_ignored: Any) -> Any:
    """`torch.load` that unpickles tensors, plain containers and DeepSpeed's few data classes only."""
    with torch.serialization.safe_globals(_safe_globals()):
        return _torch_load(path, map_location=map_location, weights_only=True)


@contextlib.contextmanager
def _loads_are_safe() -> Iterator[None]:
    """While DeepSpeed's reader runs, its `torch.load(..., weights_only=False)` calls become `safe_load`."""
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

        with _loads_are_safe():
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    return {k: v.float() for k, v in meta["module"].items()}
