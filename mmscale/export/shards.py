"""Writing weights as a stream: safetensors files written tensor by tensor, each tensor asked for only when its bytes
are due, cut into Hugging Face's shards (`model-0000i-of-0000N.safetensors` and `model.safetensors.index.json`)
above a size. With it: the sizes (`--max-shard-size`) and dtype names (`--dtype`) it is given, which names of a state
dict are one tensor (tied, written once), and the process's resident memory that shows the stream holds one tensor
at a time."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from mmscale.training.readers import SAFETENSORS, SAFETENSORS_INDEX, _st_dtypes

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_SIZE = "2GB"

# ----------------------------------------------------------------------------------------------- sizes, dtypes

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes of a size as Hugging Face writes them: `2GB` (10^9), `500MiB` (2^20), `4096` (bytes)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", str(text), flags=re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"--max-shard-size {text!r}: give a size such as 2GB, 500MB, 512MiB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


_DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "float": "float32", "bf16": "bfloat16",
                "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "half": "float16"}


def as_dtype(value: Any) -> torch.dtype:
    """torch dtype of `fp32` / `bf16` / `fp16` (or their torch names, or a torch dtype)."""
    import torch

    if isinstance(value, torch.dtype):
        return value
    name = _DTYPE_NAMES.get(str(value).lower().removeprefix("torch."))
    if name is None:
        raise ValueError(f"dtype {value!r}: choose fp32, bf16 or fp16")
    return getattr(torch, name)


def _itemsize(dtype: torch.dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def tied_groups(state: dict[str, Any]) -> dict[str, str]:
    """{alias: first name} for state entries that are the same tensor (tied weights: written once)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, t in state.items():
        if id(t) in first:
            aliases[name] = first[id(t)]
        else:
            first[id(t)] = name
    return aliases


# ----------------------------------------------------------------------------------------------- memory


def memory_status() -> dict[str, int]:
    """This process's resident memory now (`rss`) and at its peak (`peak`), in bytes (Linux /proc)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out["rss" if key == "VmRSS" else "peak"] = int(value.split()[0]) * 1024
    except OSError:
        import resource

        out["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def reset_peak_memory() -> bool:
    """Start this process's peak-RSS count again from what it holds now (Linux: /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------- writing, as a stream


def shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def plan_shards(items: list[tuple[str, tuple[int, ...], Any]], max_bytes: int) -> list[list[tuple[str, tuple, Any]]]:
    """Cut `items` (name, shape, dtype), in order, into shards of at most `max_bytes` of tensor data each (a
    tensor larger than that alone in its shard), as transformers' save_pretrained does."""
    shards: list[list[tuple[str, tuple, Any]]] = [[]]
    size = 0
    for item in items:
        nbytes = math.prod(item[1]) * _itemsize(item[2])
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    return shards


def write_safetensors(path: Path, items: list[tuple[str, tuple[int, ...], Any]],
                      read: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Write one safetensors file from `items` (name, shape, dtype: what to write), asking `read(name)` for each
    tensor only when its bytes are due and letting it go right after; returns the bytes of tensor data. The header
    (names, dtypes, shapes, offsets) is known from the items, so nothing needs holding: the file format of
    safetensors (8-byte little-endian header length, JSON header padded to 8 bytes, raw little-endian data)."""
    import torch

    codes = _st_dtypes()
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, shape, dtype in items:
        if dtype not in codes:
            raise ValueError(f"{name}: dtype {dtype} has no safetensors code here")
        nbytes = math.prod(shape) * _itemsize(dtype)
        header[name] = {"dtype": codes[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype in items:
            t = read(name)
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: expected shape {tuple(shape)}, read {tuple(t.shape)}")
            t = t.detach().to(dtype=dtype).contiguous()
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t
        f.flush()
        os.fsync(f.fileno())
    return offset


def write_weights(out: Path, items: list[tuple[str, tuple[int, ...], Any]], read: Callable[[str], torch.Tensor],
                  max_shard_bytes: int, metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """`model.safetensors`, or the shards and `model.safetensors.index.json` (Hugging Face's convention) when the
    tensors take more than `max_shard_bytes`. Returns {"files", "total_size", "index"}."""
    shards = plan_shards(items, max_shard_bytes)
    total, weight_map = 0, {}
    files = [SAFETENSORS] if len(shards) == 1 else [shard_name(i + 1, len(shards)) for i in range(len(shards))]
    for file, shard in zip(files, shards):
        total += write_safetensors(out / file, shard, read, metadata)
        weight_map.update({name: file for name, _, _ in shard})
        log.info("wrote %s (%d tensors)", file, len(shard))
    index = None
    if len(shards) > 1:
        index = SAFETENSORS_INDEX
        (out / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return {"files": files, "total_size": total, "index": index}
