"""Read a model's weights one tensor at a time, whatever wrote them: an mmscale (DeepSpeed) checkpoint at any ZeRO
stage and world size, a safetensors folder (an export, a Hugging Face model), or a model in memory.

    reader = open_source("runs/demo")            # a run (its newest verified checkpoint), a checkpoint, a folder
    for name in reader.names: t = reader.read(name)

Every reader has `names`, `shape(n)`, `dtype(n)`, `n in reader`, `read(n)` and `aliases` (tied names stored once).
Nothing but tensors is unpickled (`torch.load(weights_only=True, mmap=True)`, safetensors): `model.init_from`, the
load of a run's checkpoint into one process (mmscale.job.runs) and export all read through here, so that only the
tensor asked for is ever in memory.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmscale.training import checkpoint

if TYPE_CHECKING:
    import torch

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def _st_dtypes() -> dict[Any, str]:
    import torch

    return {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
            torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
            torch.bool: "BOOL"}


def _natural(p: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def _mmap_load(path: Path) -> Any:
    """A DeepSpeed (or mmscale) checkpoint file, memory-mapped: tensors, plain containers and DeepSpeed's few data
    classes only (`weights_only=True`); no tensor data is read until it is used."""
    import torch

    from mmscale.training.zero_checkpoint import _safe_globals

    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


LEGACY_NAMES = (("classifier.", "objectives.classification.head."),
                ("active_classes", "objectives.classification.active_classes"))
"""Tensor names of earlier versions -> today's: the classification head moved into its objective
(mmscale.objectives). A reader lists today's names and reads the stored ones."""


def current_name(name: str) -> str:
    for old, new in LEGACY_NAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


class _Released:
    """A reader holding memory-mapped files counts the bytes it has read and maps them afresh every
    `release_every` bytes: pages it touched leave this process's resident memory with the old mapping."""

    release_every = 64 << 20

    def __init__(self) -> None:
        self._touched = 0
        self._legacy: dict[str, str] = {}  # today's name -> the name stored (LEGACY_NAMES)

    def _rename_legacy(self) -> None:
        """List today's names for tensors stored under an earlier version's (LEGACY_NAMES)."""
        for i, name in enumerate(self.names):
            new = current_name(name)
            if new != name:
                self._legacy[new] = name
                self.names[i] = new

    def _stored(self, name: str) -> str:
        return self._legacy.get(name, name)

    def _open(self) -> None:
        raise NotImplementedError

    def _count(self, nbytes: int) -> None:
        self._touched += nbytes
        if self._touched >= self.release_every:
            self._touched = 0
            self._open()


class CheckpointReader(_Released):
    """The full weights of one mmscale checkpoint directory, one tensor at a time, whatever the ZeRO stage and world
    size it was saved at; the same tensors `checkpoint.consolidated_state_dict` gives all at once (DeepSpeed's
    consolidation), read from memory-mapped files, so that only the tensor asked for is ever materialized.

    `names` in the model's state-dict order; `shape(n)`, `dtype(n)` without reading data; `read(n)` a new tensor
    (fp32 master weights where the optimizer holds them). `aliases`: tied names DeepSpeed stored once."""

    def __init__(self, ckpt: str | Path):
        super().__init__()
        self.ckpt = Path(ckpt)
        self._model_files = sorted(self.ckpt.glob("*model_states.pt"), key=_natural)
        if not self._model_files:
            raise FileNotFoundError(f"{self.ckpt} holds no DeepSpeed model states (*model_states.pt)")
        self._optim_files = sorted(self.ckpt.glob("*optim_states.pt"), key=_natural)
        self._open()
        m0 = self._models[0]
        self.stage = int(((m0.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0))
        self._where: dict[str, tuple[Any, ...]] = {}  # name -> (how, args...)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, Any] = {}
        if self.stage >= 2 and not self._optim_files:
            raise FileNotFoundError(f"{self.ckpt}: a ZeRO-{self.stage} checkpoint without its *optim_states.pt files")
        if self.stage < 2:  # as consolidated_state_dict: the module's weights, or their fp32 masters in a 16-bit run
            import torch

            from mmscale.training import zero_checkpoint

            self._optim_files = zero_checkpoint.optim_files(self.ckpt, m0)  # ZeRO-1 16-bit only
            self._optims = [_mmap_load(f)["optimizer_state_dict"] for f in self._optim_files]
            masters = zero_checkpoint.master_index(m0, self._optims, self.ckpt)
            for name, t in m0["module"].items():
                if name in masters:
                    self._add(name, t.shape, torch.float32, ("master", masters[name]))
                else:
                    self._add(name, t.shape, t.dtype, ("module", name))
        else:
            self._index_zero(m0)
        self.aliases = {a: s for a, s in (m0.get("shared_params") or {}).items() if s in self._where}
        order = [n for n in m0.get("module", {}) if n in self._where]
        self.names = order + [n for n in self._where if n not in set(order)]
        self._rename_legacy()

    def _open(self) -> None:
        self._models = [_mmap_load(f) for f in self._model_files] if self._needs_all_models() else \
            [_mmap_load(self._model_files[0])]
        self._optims = [_mmap_load(f)["optimizer_state_dict"] for f in self._optim_files] \
            if getattr(self, "stage", 2) >= 1 else []  # below ZeRO-2 only a 16-bit run's masters (optim_files)

    def _needs_all_models(self) -> bool:  # ZeRO-3 keeps a fragment of each frozen weight in every rank's file
        return getattr(self, "stage", 3) == 3

    def _add(self, name: str, shape: Any, dtype: Any, where: tuple[Any, ...]) -> None:
        self._where[name], self._shapes[name], self._dtypes[name] = where, tuple(int(s) for s in shape), dtype

    def _index_zero(self, m0: dict[str, Any]) -> None:
        import torch

        world = self._optims[0]["partition_count"]
        world = max(world) if isinstance(world, list) else int(world)
        if world != len(self._optim_files) or (self.stage == 3 and world != len(self._models)):
            raise ValueError(f"{self.ckpt}: saved by {world} ranks, but holds {len(self._optim_files)} optimizer and "
                             f"{len(self._model_files)} model-state files (an incomplete checkpoint)")
        for name in m0.get("buffer_names") or []:  # DeepSpeed keeps buffers whole in rank 0's module
            t = m0["module"][name]
            self._add(name, t.shape, torch.float32 if t.is_floating_point() else t.dtype, ("buffer", name))
        shapes = m0["param_shapes"]
        if self.stage == 2:  # each group one flat fp32 vector, cut into equal partitions over the ranks
            key = "single_partition_of_fp32_groups"
            paddings = self._optims[0].get("param_alignment_paddings")
            self._sizes = [[int(o[key][g].numel()) for o in self._optims] for g in range(len(shapes))]
            for g, group in enumerate(shapes):
                offset = 0
                for i, (name, shape) in enumerate(group.items()):
                    numel = math.prod(shape)
                    self._add(name, shape, torch.float32, ("flat2", g, offset, numel))
                    offset += numel + (paddings[g][i] if paddings else 0)
            for name, shape in (m0.get("frozen_param_shapes") or {}).items():  # whole, in rank 0's file
                self._add(name, shape, m0["frozen_param_fragments"][name].dtype, ("frozen2", name))
        else:  # ZeRO-3: every weight cut into world-size partitions, each rank's laid end to end over its groups
            key = "fp32_flat_groups"
            sizes = [int(t.numel()) for t in self._optims[0][key]]
            self._group_bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
            offset = 0
            for group in shapes:
                for name, shape in group.items():
                    numel = math.prod(shape)
                    part = math.ceil(numel / world)
                    self._add(name, shape, torch.float32, ("flat3", offset, part, numel))
                    offset += part
            if offset * world != self._group_bounds[-1] * world:
                raise ValueError(f"{self.ckpt}: its weights take {offset} of {self._group_bounds[-1]} partition "
                                 f"elements per rank: not a checkpoint of these parameter shapes")
            for name, shape in (m0.get("frozen_param_shapes") or {}).items():
                self._add(name, shape, m0["frozen_param_fragments"][name].dtype, ("frozen3", name))

    def shape(self, name: str) -> tuple[int, ...]:
        name = self._stored(name)
        return self._shapes[self.aliases.get(name, name)]

    def dtype(self, name: str) -> Any:
        name = self._stored(name)
        return self._dtypes[self.aliases.get(name, name)]

    def __contains__(self, name: str) -> bool:
        name = self._stored(name)
        return name in self._where or name in self.aliases

    def read(self, name: str) -> torch.Tensor:
        import torch

        name = self._stored(name)
        name = self.aliases.get(name, name)
        how, *args = self._where[name]
        shape = self._shapes[name]
        if how == "master":
            from mmscale.training import zero_checkpoint

            out = zero_checkpoint.read_master(zero_checkpoint.master_groups(self._models[0], self._optims),
                                              args[0]).clone()
        elif how == "module":
            t = self._models[0]["module"][name]
            out = t.float() if t.is_floating_point() and t.dtype != torch.float32 else t.clone()
        elif how == "buffer":
            t = self._models[0]["module"][name]
            out = t.float() if t.is_floating_point() else t.clone()
        elif how == "frozen2":
            out = self._models[0]["frozen_param_fragments"][name].clone()
        elif how == "frozen3":
            numel = math.prod(shape)
            out = torch.cat([m["frozen_param_fragments"][name].reshape(-1) for m in self._models])[:numel].clone()
        elif how == "flat2":
            g, offset, numel = args
            pieces, start = [], 0
            for rank, size in enumerate(self._sizes[g]):
                lo, hi = max(offset, start), min(offset + numel, start + size)
                if lo < hi:
                    pieces.append(self._optims[rank]["single_partition_of_fp32_groups"][g][lo - start:hi - start])
                start += size
            out = torch.cat(pieces)
        else:  # flat3
            offset, part, numel = args
            pieces = []
            for opt in self._optims:
                for g, flat in enumerate(opt["fp32_flat_groups"]):
                    lo = max(offset, self._group_bounds[g]) - self._group_bounds[g]
                    hi = min(offset + part, self._group_bounds[g + 1]) - self._group_bounds[g]
                    if lo < hi:
                        pieces.append(flat[lo:hi])
            out = torch.cat(pieces)[:numel]
        out = out.reshape(shape)
        self._count(out.numel() * out.element_size())
        return out


class SafetensorsReader(_Released):
    """The tensors of a safetensors folder (`model.safetensors`, or the shards `model.safetensors.index.json` lists),
    one at a time."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        super().__init__()
        self.directory = Path(directory)
        index = self.directory / SAFETENSORS_INDEX
        if (self.directory / SAFETENSORS).is_file():
            files = [SAFETENSORS]
            weight_map = None
        elif index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            raise FileNotFoundError(f"{self.directory} holds neither {SAFETENSORS} nor {SAFETENSORS_INDEX}")
        self._file_of: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, Any] = {}
        by_name = {v: k for k, v in _st_dtypes().items()}
        for file in files:
            if not (self.directory / file).is_file():
                raise FileNotFoundError(f"{self.directory / file}: a shard {SAFETENSORS_INDEX} lists is missing")
            with safe_open(self.directory / file, framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    self._file_of[name] = file
                    self._shapes[name] = tuple(sl.get_shape())
                    self._dtypes[name] = by_name.get(sl.get_dtype(), sl.get_dtype())
        if weight_map is not None and set(weight_map) != set(self._file_of):
            raise ValueError(f"{index}: its weight_map and the shards' tensors differ "
                             f"({sorted(set(weight_map) ^ set(self._file_of))[:5]})")
        self.names = list(self._file_of)
        self._rename_legacy()
        self.aliases: dict[str, str] = {}
        self._handles: dict[str, Any] = {}

    def _open(self) -> None:
        self._handles = {}

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[self._stored(name)]

    def dtype(self, name: str) -> Any:
        return self._dtypes[self._stored(name)]

    def __contains__(self, name: str) -> bool:
        return self._stored(name) in self._file_of

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        name = self._stored(name)
        file = self._file_of[name]
        if file not in self._handles:
            self._handles = {file: safe_open(self.directory / file, framework="pt")}
        t = self._handles[file].get_tensor(name)
        self._count(t.numel() * t.element_size())
        return t


class ModelTensors:
    """The state of a model in memory as a reader: `read` gives the model's own tensor (no copy)."""

    def __init__(self, model: Any):
        self._state = model.state_dict(keep_vars=True)
        self.names = list(self._state)
        self.aliases: dict[str, str] = {}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape)

    def dtype(self, name: str) -> Any:
        return self._state[name].dtype

    def __contains__(self, name: str) -> bool:
        return name in self._state

    def read(self, name: str) -> torch.Tensor:
        return self._state[name].detach()


def open_source(path: str | Path) -> CheckpointReader | SafetensorsReader:
    """A reader over a `model.init_from` source (a run, a checkpoint, a safetensors folder such as an export)."""
    from mmscale.training import weights

    kind, where = weights.resolve_source(str(path))
    if kind == "checkpoint":
        if (checkpoint.read_manifest(where) or {}).get("frozen_fingerprint"):
            raise ValueError(f"{where} holds only what its fine-tuning method trained (its frozen weights come from "
                             f"its own model.init_from / model.lm.path); start from its base run instead, or from "
                             f"a merged export of it")
        return CheckpointReader(where)
    return SafetensorsReader(where)
