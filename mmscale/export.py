"""Take what a run trained out of mmscale, in formats other tools load.

    python launchers/export.py --run runs/demo --out exported/demo [--checkpoint DIR] [--adapters merged|separate]
                               [--max-shard-size 2GB] [--dtype fp32|bf16|fp16] [--overwrite]
    python -m mmscale.export model ...                    (the same)
    python -m mmscale.export adapter --run runs/demo-finetune --out exported/adapter [--base-out exported/base_lm]

`model`: one checkpoint of a run (its newest that passes its manifest, or `--checkpoint`, which must; any ZeRO stage,
any world size) as one Hugging Face-style folder that loads without DeepSpeed. The model is the one the config
recorded with those weights builds (the checkpoint's manifest, mmscale.training.runs), not the run's config.yaml:

    config.yaml                    that config, resolved and made self-contained: the model it builds is this one
                                   (model.init_from cleared, a model.lm.path / vision.path Llama / tower turned into
                                   its config, lora/qlora taken out of the callbacks, data.tokenizer -> the copy here)
    config.json                    format and version, vocabulary size, dtype, the weight files, what trained it
    model.safetensors              the weights; above --max-shard-size several `model-00001-of-0000N.safetensors`
                                   and `model.safetensors.index.json` ({"metadata": {"total_size"}, "weight_map"})
    tokenizer.model | tokenizer/   the run's data.tokenizer (a sentencepiece file, or a Hugging Face folder)
    adapter/                       --adapters separate only: the LoRA adapters in peft's format
    README.md                      what trained it (config, step, the checkpoint's metrics) and how to load it

    model, tokenizer, cfg = mmscale.export.load_exported("exported/demo")   # no DeepSpeed, no process group
    deepspeed ... launchers/train.py --config ... model.init_from=exported/demo  # fine-tune it

The weights stream: a checkpoint that holds every weight goes to the files tensor by tensor, read from DeepSpeed's
ZeRO files memory-mapped (`torch.load(mmap=True, weights_only=True)`) and written by a safetensors writer that needs
only the names and shapes up front; the model is never built and never held. A fine-tuning run whose checkpoints
hold only what trained (lora, qlora, adapters, prompt_tuning, bitfit) is rebuilt once, in this process, the frozen
weights streamed in from where training took them (model.init_from, model.lm.path, the seed) and checked against
the checkpoint's fingerprint; its LoRA adapters are merged into the base weights (`--adapters merged`, the default:
a plain model, peft not needed to load it; a qlora base dequantized from 4 bits first) or written beside the base
in peft's format (`--adapters separate`). Nothing but tensors is unpickled, and only safetensors is written.

`adapter`: the LoRA adapters of a `lora` / `qlora` run on the LM, in peft's own format (`adapter_config.json` and
`adapter_model.safetensors`), named as in the plain Hugging Face LM (mmscale's cross-attention wrappers taken out
of the names), so `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), OUT)` loads them. BASE is
the LM the run started from: its `model.lm.path`, or, for a run that fine-tuned another run (`model.init_from`),
the LM written out of that run (`--base-out` writes it). The cross-attention and resampler weights the run also
trained are not part of an LM adapter: the run's checkpoint keeps them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import re
import shutil
import struct
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from mmscale.training import run_paths

if TYPE_CHECKING:
    import torch

log = logging.getLogger("mmscale.export")

FORMAT = "mmscale-export"
FORMAT_VERSION = 1
CONFIG_JSON = "config.json"
CONFIG_YAML = "config.yaml"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
ADAPTER_DIR = "adapter"
LORA_METHODS = ("lora", "qlora")
DEFAULT_MAX_SHARD_SIZE = "2GB"


class ExportError(ValueError):
    """What stops an export, every problem found, each with its fix."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n  ".join(self.problems) if len(self.problems) == 1 else
                         "\n  - " + "\n  - ".join(self.problems))


# ----------------------------------------------------------------------------------------------- adapters (peft)


def lora_settings(cfg: Any) -> Any:
    """The run's `lora` / `qlora` callback (its r, alpha, dropout, targets), or an error saying there is none."""
    from mmscale.callbacks import build_callbacks
    from mmscale.callbacks.peft_methods import LoRA

    found = [cb for cb in build_callbacks(cfg.callbacks) if isinstance(cb, LoRA)]
    if not found:
        raise ValueError(f"the run's callbacks ({[c.name for c in cfg.callbacks]}) hold no lora or qlora: no LoRA "
                         f"adapter to export")
    if found[0].components != ["lm"]:
        raise ValueError(f"only adapters on the LM export in peft's format; this run adapts {found[0].components}")
    return found[0]


def write_adapter(model: Any, lora: Any, out: Path, base: str | None, run: str | Path) -> int:
    """The LM adapters of `model` (LoRA injected into `model.lm`) in peft's format in `out`. Returns how many
    tensors were written."""
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    from mmscale.training.weights import plain_lm_name

    state = get_peft_model_state_dict(model.lm)  # names relative to the LM, the adapter name taken out
    tensors = {"base_model.model." + plain_lm_name(k): v.detach().float().contiguous() for k, v in state.items()}
    out.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.targets,
               bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base or None).save_pretrained(out)
    save_file(tensors, out / "adapter_model.safetensors")
    (out / "mmscale_export.json").write_text(json.dumps({"run": str(run), "base": base, "tensors": len(tensors)},
                                                        indent=2))
    return len(tensors)


def export_adapter(run_dir: str | Path, out: str | Path, base_out: str | Path | None = None,
                   checkpoint_dir: str | Path | None = None) -> Path:
    """Write the run's LM adapters to `out` in peft's format; `base_out` also writes the plain base LM (for a run
    that fine-tuned another run). Returns `out`."""
    from mmscale.data import load_tokenizer
    from mmscale.training.weights import export_base_lm

    problems: list[str] = []
    cfg, ckpt = _open_run(Path(run_dir), checkpoint_dir, problems)  # verified; the config recorded with it
    if problems:
        raise ValueError(problems[0])
    lora = lora_settings(cfg)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    # built as training built it (init_from, the callbacks), then the checkpoint, read tensor by tensor
    model = _build_trained(cfg, ckpt, tokenizer.vocab_size)
    out = Path(out)
    base = cfg.model.lm.path
    if base_out is not None:
        base = str(export_base_lm(cfg, tokenizer.vocab_size, Path(base_out)))
    write_adapter(model, lora, out, base, run_dir)
    return out


def _adapter_key(name: str) -> str:
    """The peft-format name (as `write_adapter` writes it) of a LoRA parameter of the multimodal model:
    `lm.model.layers.0.decoder_layer.self_attn.q_proj.lora_A.default.weight` ->
    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`."""
    from mmscale.training.weights import plain_lm_name

    inside = re.sub(r"\.(lora_[A-Za-z_]+)\.default(?=\.|$)", r".\1", name.removeprefix("lm."))
    return "base_model.model." + plain_lm_name(inside)


# ----------------------------------------------------------------------------------------------- sizes, dtypes, memory

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


def _st_dtypes() -> dict[Any, str]:
    import torch

    return {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
            torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
            torch.bool: "BOOL"}


def _itemsize(dtype: torch.dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


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


# ----------------------------------------------------------------------------------------------- reading, lazily


def _natural(p: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def _mmap_load(path: Path) -> Any:
    """A DeepSpeed (or mmscale) checkpoint file, memory-mapped: tensors, plain containers and DeepSpeed's few data
    classes only (`weights_only=True`); no tensor data is read until it is used."""
    import torch

    from mmscale.training.zero_checkpoint import _safe_globals

    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


class _Released:
    """A reader holding memory-mapped files counts the bytes it has read and maps them afresh every
    `release_every` bytes: pages it touched leave this process's resident memory with the old mapping."""

    release_every = 64 << 20

    def __init__(self) -> None:
        self._touched = 0

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
        return self._shapes[self.aliases.get(name, name)]

    def dtype(self, name: str) -> Any:
        return self._dtypes[self.aliases.get(name, name)]

    def __contains__(self, name: str) -> bool:
        return name in self._where or name in self.aliases

    def read(self, name: str) -> torch.Tensor:
        import torch

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
        self.aliases: dict[str, str] = {}
        self._handles: dict[str, Any] = {}

    def _open(self) -> None:
        self._handles = {}

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> Any:
        return self._dtypes[name]

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

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


# ----------------------------------------------------------------------------------------------- building models


def build_exported_model(cfg: Any, vocab_size: int, meta: bool = False) -> Any:
    """The model an exported config describes: `build_model` plus what its callbacks add to the architecture
    (adapters, prompt tuning); no DeepSpeed, no process group, random weights (meta=True: no memory at all)."""
    from mmscale.callbacks import build_callbacks
    from mmscale.model import BuildOptions, build_model

    callbacks = build_callbacks(cfg.callbacks)
    options = BuildOptions()
    for cb in callbacks:
        cb.on_build(options)
    model = build_model(cfg.model, vocab_size=vocab_size, meta=meta, options=options)
    for cb in callbacks:
        cb.on_model_built(model)
    return model


def open_source(path: str | Path) -> CheckpointReader | SafetensorsReader:
    """A reader over a `model.init_from` source (a run, a checkpoint, a safetensors folder such as an export)."""
    from mmscale.training import checkpoint, weights

    kind, where = weights.resolve_source(str(path))
    if kind == "checkpoint":
        if (checkpoint.read_manifest(where) or {}).get("frozen_fingerprint"):
            raise ValueError(f"{where} holds only what its fine-tuning method trained (its frozen weights come from "
                             f"its own model.init_from / model.lm.path); start from its base run instead, or from "
                             f"a merged export of it")
        return CheckpointReader(where)
    return SafetensorsReader(where)


def _load_init_from(model: Any, source: str) -> None:
    """`model.init_from` as training applies it (engine.load_initial_weights), streamed: every parameter the source
    has, 4-bit weights excepted; a shape mismatch is refused with the names."""
    import torch

    from mmscale.training import weights

    reader = open_source(source)
    params = {n: p for n, p in model.named_parameters() if type(p).__name__ != "Params4bit"}
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    report = weights.compare(shapes, {n: torch.empty(reader.shape(n), device="meta") for n in reader.names})
    if report["mismatched"]:
        raise ValueError(f"model.init_from {source}: shapes differ from the model built here:\n  "
                         + "\n  ".join(report["mismatched"][:20]))
    with torch.no_grad():
        for name in params:
            if name in reader:
                params[name].copy_(reader.read(name))
    log.info(weights.describe(report, Path(source)))


def _build_trained(cfg: Any, ckpt: Path, vocab_size: int) -> Any:
    """The model of a run whose checkpoint holds only what trained, as `build.build_from_checkpoint` builds it (the
    callbacks' build requests and changes, model.init_from, then the checkpoint; the frozen weights checked against
    the fingerprint it recorded), with every source read tensor by tensor: one model in memory, never two."""
    import torch

    from mmscale.training import checkpoint
    from mmscale.training.build import build_as_trained
    from mmscale.training.engine import frozen_fingerprint, param_dtype

    model = build_as_trained(cfg, vocab_size, load_init=_load_init_from)  # init_from streamed, tensor by tensor
    saved = (checkpoint.read_manifest(ckpt) or {}).get("frozen_fingerprint", "")
    reader = CheckpointReader(ckpt)
    state = model.state_dict(keep_vars=True)
    expected = {n for n, _ in model.named_parameters()} | _persistent_buffers(model)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    unexpected = [n for n in reader.names if n not in state]
    missing = sorted(n for n in expected if n not in reader)
    if unexpected or (set(missing) - frozen if saved else missing):
        raise ValueError(f"checkpoint {ckpt} does not fit the model built from its config: missing "
                         f"{sorted(set(missing) - (frozen if saved else set()))[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name in reader.names:
            state[name].copy_(reader.read(name))
    if saved and frozen_fingerprint(model, param_dtype(cfg)) != saved:
        raise ValueError(f"checkpoint {ckpt} holds only the trainable weights, and the frozen weights rebuilt here "
                         f"(model.init_from={cfg.model.init_from!r}, model.lm.path={cfg.model.lm.path!r}) are not "
                         f"the ones it was trained on")
    return model


def _persistent_buffers(model: Any) -> set[str]:
    return {f"{prefix}.{name}" if prefix else name for prefix, module in model.named_modules()
            for name, b in module._buffers.items()
            if b is not None and name not in module._non_persistent_buffers_set}


def _no_grad(fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    wrapped.__doc__, wrapped.__name__ = fn.__doc__, fn.__name__
    return wrapped


def _dense_weight(layer: Any) -> torch.Tensor:
    """The weight of a linear layer as a plain fp32 (out, in) tensor: a bitsandbytes 4-bit one dequantized."""
    if type(layer).__name__ == "Linear4bit":
        import bitsandbytes as bnb

        w = layer.weight
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float().reshape(layer.out_features,
                                                                                    layer.in_features)
    return layer.weight.detach().float()


def _plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Any:
    from torch import nn

    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
    return lin


def _replace(model: Any, name: str, new: Any) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@_no_grad
def plain_linears(model: Any, merge: bool) -> dict[str, int]:
    """Make `model` a plain one, in place, a layer at a time: every LoRA layer becomes an nn.Linear holding its
    base weight (dequantized when it was 4-bit) plus, with `merge`, its adapters' delta (B A * alpha / r, merged in
    fp32); every other 4-bit linear layer becomes an nn.Linear of its dequantized weight. The names are then the
    ones of the model built without lora/qlora. Returns how many layers of each kind."""
    counts = {"lora_merged": 0, "lora_removed": 0, "dequantized": 0}
    lora_layer = None
    if "peft" in sys.modules:
        from peft.tuners.lora import LoraLayer as lora_layer
    # by name, each layer looked up when its turn comes: a replaced layer is freed right away, not at the end
    lora_names = [n for n, m in model.named_modules() if lora_layer is not None and isinstance(m, lora_layer)]
    for name in lora_names:
        module = model.get_submodule(name)
        base = module.get_base_layer()
        if not hasattr(base, "in_features"):
            raise ValueError(f"{name}: LoRA on a {type(base).__name__} layer cannot be merged here (linear "
                             f"layers only)")
        w = _dense_weight(base)  # an fp32 base weight itself (merged in place), a 4-bit one dequantized
        if merge:
            for adapter in module.lora_A:
                if module.use_dora.get(adapter):
                    raise ValueError(f"{name}: a DoRA adapter does not merge as B A; export with --adapters "
                                     f"separate")
                # in fp32 (peft's get_delta_weight rounds to the adapters' own dtype, bf16 under qlora)
                a, b = module.lora_A[adapter].weight.float(), module.lora_B[adapter].weight.float()
                delta = b @ a * module.scaling[adapter]
                w += delta.T if module.fan_in_fan_out else delta
        counts["dequantized"] += type(base).__name__ == "Linear4bit"
        _replace(model, name, _plain_linear(w, base.bias))
        counts["lora_merged" if merge else "lora_removed"] += 1
        del module, base, w
    for name in [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]:
        module = model.get_submodule(name)
        _replace(model, name, _plain_linear(_dense_weight(module), module.bias))
        counts["dequantized"] += 1
        del module
    return counts


# ----------------------------------------------------------------------------------------------- the exported config


_HF_CONFIG_NOISE = ("architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype",
                    "quantization_config", "model_type", "_attn_implementation_autoset")


def _config_dict(config: Any) -> dict[str, Any]:
    return {k: v for k, v in config.to_diff_dict().items() if k not in _HF_CONFIG_NOISE}


def export_config(cfg: Any, tokenizer_name: str, vocab_size: int) -> tuple[Any, list[str]]:
    """The run's config made to describe the exported model and nothing outside it. Returns (config, changes)."""
    from mmscale.config import CallbackSpec

    m, changes = cfg.model, []
    model = dataclasses.replace(m, init_from="")
    if m.init_from:
        changes.append(f"model.init_from: {m.init_from!r} -> '' (the weights it gave are in this folder)")
    if m.lm.path:
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(m.lm.path)
        if hf.model_type == "llama":
            config = {**_config_dict(hf), "vocab_size": vocab_size}
            model = dataclasses.replace(model, lm=dataclasses.replace(m.lm, path="", config=config))
            changes.append(f"model.lm.path: {m.lm.path!r} -> '' (its architecture in model.lm.config; its weights "
                           f"in this folder)")
        else:
            changes.append(f"model.lm.path: {m.lm.path!r} kept: a {hf.model_type} LM is rebuilt from it (its "
                           f"weights are then replaced by this folder's)")
    if m.vision.path:
        from mmscale.model.vision import _TOWERS

        config_cls, _, overrides = _TOWERS[m.vision.type]
        config = _config_dict(config_cls.from_pretrained(m.vision.path, **overrides))
        model = dataclasses.replace(model, vision=dataclasses.replace(m.vision, path="", config=config))
        changes.append(f"model.vision.path: {m.vision.path!r} -> '' (its architecture in model.vision.config; its "
                       f"weights in this folder)")
    callbacks = [CallbackSpec(**dataclasses.asdict(c)) for c in cfg.callbacks if c.name not in LORA_METHODS]
    for c in cfg.callbacks:
        if c.name in LORA_METHODS:
            changes.append(f"callbacks: {c.name} taken out (the adapters are merged into the weights, or in "
                           f"{ADAPTER_DIR}/)")
    data = dataclasses.replace(cfg.data, tokenizer=tokenizer_name)
    changes.append(f"data.tokenizer: {cfg.data.tokenizer!r} -> {tokenizer_name!r} (the copy in this folder)")
    return dataclasses.replace(cfg, model=model, callbacks=callbacks, data=data), changes


# ----------------------------------------------------------------------------------------------- export


def _find_checkpoint(run: Path, given: str | Path | None, problems: list[str]) -> Path | None:
    """The checkpoint to export, verified against its manifest (mmscale.training.runs): `given` (a path, or a name
    under the run's checkpoints/), else the run's newest that verifies, damaged ones skipped with a warning."""
    from mmscale.training import checkpoint, runs

    if given is not None:
        ckpt = Path(given)
        if not ckpt.is_dir() and (run / "checkpoints" / given).is_dir():  # a name: `--checkpoint step_00000100`
            ckpt = run / "checkpoints" / given
        if not ckpt.is_dir():
            problems.append(f"--checkpoint {str(ckpt)!r} is not a directory; give a checkpoint directory such as "
                            f"{run / 'checkpoints' / 'step_00000100'}, or leave it out for the run's newest")
            return None
        try:
            return runs.verify_given(ckpt, "--checkpoint")
        except runs.RunOpenError as e:
            problems.append(f"{e} (or leave --checkpoint out)")
            return None
    root = run / "checkpoints"
    if not checkpoint.candidates(root):
        problems.append(f"{root} holds no complete checkpoint: nothing to export. Train the run until it saves one "
                        f"(train.checkpoint_every, or the save at the end of training), or name one with "
                        f"--checkpoint")
        return None
    try:
        return runs.newest_verified(run, "--run")
    except runs.RunOpenError as e:
        problems.append(f"{e}; name one with --checkpoint after checking it")
        return None


def _is_export(path: Path) -> bool:
    try:
        return json.loads((path / CONFIG_JSON).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _out_problems(out: Path, run: Path, overwrite: bool) -> list[str]:
    if out.exists() and not out.is_dir():
        return [f"--out {str(out)!r} is a file; choose a folder"]
    resolved, run_resolved = out.resolve(), run.resolve()
    if resolved == run_resolved or resolved in run_resolved.parents or \
            (run_resolved / "checkpoints") in (resolved, *resolved.parents):
        return [f"--out {str(out)!r} would hold the run {str(run)!r} or sit among its checkpoints; choose a folder "
                f"outside them (e.g. {str(run / 'export')!r})"]
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            return [f"--out {str(out)!r} exists and is not empty; choose another --out, or pass --overwrite to "
                    f"replace it"]
        if not _is_export(out):
            return [f"--out {str(out)!r} holds files that are not an mmscale export (no {CONFIG_JSON} of format "
                    f"{FORMAT!r}); --overwrite replaces only an earlier export: remove the folder yourself, or "
                    f"choose another --out"]
    return []


def _open_run(run: Path, given: str | Path | None, problems: list[str]) -> tuple[Any, Path | None]:
    """(the config recorded with the weights, the verified checkpoint) of the run to export, as every tool opens a
    run (mmscale.training.runs: the checkpoint's manifest, not the run's newest config.yaml, which a later start
    may have changed). What is wrong goes into `problems`: then the checkpoint is None (and the config that of
    config.yaml, to find the other problems, or None)."""
    from mmscale.training import runs

    if not run.is_dir():
        problems.append(f"--run {str(run)!r} is not a directory; give the output_dir of a training run")
        return None, None
    if not (run / CONFIG_YAML).is_file():
        problems.append(f"--run {str(run)!r} holds no {CONFIG_YAML}: not the output_dir of a training run "
                        f"(launchers/train.py writes it there when the job starts)")
        return None, None
    ckpt = _find_checkpoint(run, given, problems)
    try:
        if ckpt is None:  # no export; the run's config.yaml still shows what else is wrong (every problem at once)
            return run_paths.config_for_run(run), None
        return runs.checkpoint_config(ckpt), ckpt
    except ValueError as e:  # RunOpenError, ConfigError
        problems.append(str(e) if ckpt is not None else f"{run / CONFIG_YAML}: {e}")
        return None, None


def _copy_tokenizer(src: str, out: Path) -> str:
    """The run's tokenizer into `out`: a sentencepiece file as `tokenizer.model`, a folder as `tokenizer/`."""
    p = Path(src)
    if p.is_file():
        shutil.copy2(p, out / "tokenizer.model")
        return "tokenizer.model"
    shutil.copytree(p, out / "tokenizer")
    return "tokenizer"


def _tied_groups(state: dict[str, Any]) -> dict[str, str]:
    """{alias: first name} for state entries that are the same tensor (tied weights)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, t in state.items():
        if id(t) in first:
            aliases[name] = first[id(t)]
        else:
            first[id(t)] = name
    return aliases


def export_model(run_dir: str | Path, out: str | Path, checkpoint_dir: str | Path | None = None,
                 adapters: str = "merged", max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
                 dtype: str | None = None, overwrite: bool = False, command: str | None = None) -> dict[str, Any]:
    """Export one checkpoint of the run in `run_dir` to the folder `out` (see the module's docstring). Written into
    a temporary sibling folder and renamed into place when complete. Returns a summary (files, sizes, peak memory).
    Raises ExportError naming every problem (and its fix) before any work."""
    from mmscale.callbacks import build_callbacks
    from mmscale.data import load_tokenizer
    from mmscale.model import BuildOptions, build_model
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
    cfg, ckpt = _open_run(run, checkpoint_dir, problems)
    problems += _out_problems(out, run, overwrite)
    lora = None
    if cfg is not None:
        methods = [c.name for c in cfg.callbacks if c.name in LORA_METHODS]
        if adapters == "separate":
            if not methods:
                problems.append(f"--adapters separate: the run's callbacks ({[c.name for c in cfg.callbacks]}) hold "
                                f"no lora or qlora; leave --adapters out")
            else:
                try:
                    lora = lora_settings(cfg)
                except ValueError as e:
                    problems.append(f"--adapters separate: {e}; export with --adapters merged")
        if not Path(cfg.data.tokenizer).exists():
            problems.append(f"the run's tokenizer {cfg.data.tokenizer!r} (data.tokenizer, as {ckpt or run / CONFIG_YAML} records it) "
                            f"does not exist; put it back there")
        try:
            export_dtype = as_dtype(dtype or cfg.train.precision)
        except ValueError as e:
            problems.append(f"--dtype: {e}")
    if problems:
        raise ExportError(problems)

    manifest = ckpts.read_manifest(ckpt) or {}
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    methods = [c.name for c in cfg.callbacks if c.name in LORA_METHODS]
    options = BuildOptions()
    for cb in build_callbacks(cfg.callbacks):
        cb.on_build(options)
    run_model = build_model(cfg.model, vocab_size=tokenizer.vocab_size, meta=True, options=options)
    vocab_size = int(run_model.lm.get_input_embeddings().num_embeddings)
    del run_model

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        tok_name = _copy_tokenizer(cfg.data.tokenizer, tmp)
        cfg_out, changes = export_config(cfg, tok_name, vocab_size)
        expected_model = build_exported_model(cfg_out, vocab_size, meta=True)  # the names and shapes to write
        state = expected_model.state_dict(keep_vars=True)
        tied = _tied_groups(state)
        expected = {n: tuple(t.shape) for n, t in state.items() if n not in tied}
        num_params = sum(math.prod(s) for s in expected.values())
        del expected_model, state

        full = not manifest.get("frozen_fingerprint")
        merge_counts: dict[str, int] = {}
        model = None
        if full:  # every weight is in the checkpoint: straight from its files to ours
            source: Any = CheckpointReader(ckpt)
            log.info("streaming the ZeRO-%d checkpoint %s (world size %s)", source.stage, ckpt,
                     manifest.get("world_size"))
        else:  # only what trained: rebuild once, frozen weights from their sources; merge or set aside the adapters
            log.info("rebuilding the model of %s (its checkpoint holds only what trained)", ckpt)
            model = _build_trained(cfg, ckpt, tokenizer.vocab_size)
            if lora is not None:
                n = write_adapter(model, lora, tmp / ADAPTER_DIR, cfg.model.lm.path or None, run)
                log.info("wrote %d adapter tensors in peft's format to %s/", n, ADAPTER_DIR)
            merge_counts = plain_linears(model, merge=adapters == "merged")
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
        if methods:
            callback = next(c for c in cfg.callbacks if c.name in LORA_METHODS)
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
            "trained_by": _provenance(cfg, run, ckpt, manifest),
            "config_changes": changes,
            "exported": {
                "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "command": command,
                "mmscale_version": _version(),
                "path": "streamed from the checkpoint files" if full else "rebuilt in memory, then streamed",
                "peak_rss_bytes": peak.get("peak"),
                "rss_at_start_bytes": at_start.get("rss"),
                "rss_before_weights_bytes": before_weights.get("rss"),
            },
        }
        (tmp / CONFIG_JSON).write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "README.md").write_text(_readme(info, cfg, out))
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


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("mmscale")
    except Exception:  # noqa: BLE001  (not installed as a package)
        return "unknown"


def _provenance(cfg: Any, run: Path, ckpt: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    m, t, d = cfg.model, cfg.train, cfg.data
    last_train = None
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            with contextlib.suppress(ValueError):
                r = json.loads(line)
                if r.get("step") == manifest.get("step") and "loss" in r:
                    last_train = r["loss"]
    return {
        "run": str(run.resolve()),
        "checkpoint": str(ckpt.resolve()),
        "step": manifest.get("step"),
        "max_steps": t.max_steps,
        "world_size": manifest.get("world_size"),
        "zero_stage": cfg.deepspeed.zero_stage,
        "precision": t.precision,
        "preset": m.preset,
        "init_from": m.init_from,
        "lm_path": m.lm.path,
        "vision_path": m.vision.path,
        "callbacks": [{"name": c.name, "args": dict(c.args)} for c in cfg.callbacks],
        "train_shards": d.train_shards,
        "val_shards": d.val_shards,
        "global_batch_size": t.global_batch_size,
        "lr": t.lr,
        "seed": t.seed,
        "metrics": manifest.get("metrics") or {},
        "train_loss_at_step": last_train,
    }


def _readme(info: dict[str, Any], cfg: Any, out: Path) -> str:
    tb = info["trained_by"]
    metrics = tb["metrics"]
    if metrics:
        rows = "\n".join(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |"
                         for k, v in metrics.items())
        metric_text = (f"Recorded in the checkpoint's manifest at step {tb['step']}:\n\n| metric | value |\n"
                       f"|---|---|\n{rows}\n")
    else:
        metric_text = f"The checkpoint's manifest records no evaluation at step {tb['step']}.\n"
    if tb["train_loss_at_step"] is not None:
        metric_text += f"\nTraining loss logged at step {tb['step']}: {tb['train_loss_at_step']:.6g}.\n"
    callbacks = ", ".join(c["name"] + (f" {c['args']}" if c["args"] else "") for c in tb["callbacks"]) or "none"
    ad = info["adapters"]
    if ad is None:
        adapters = "No LoRA adapters: the weights are the checkpoint's."
    elif ad["mode"] == "merged":
        adapters = (f"The {ad['method']} adapters are merged into the base weights (W + B A * alpha / r, in fp32"
                    f"{', the 4-bit base dequantized first' if ad['method'] == 'qlora' else ''}): a plain model, peft "
                    f"is not needed to load it.")
    else:
        adapters = (f"The {ad['method']} adapters are in `{ADAPTER_DIR}/` in peft's format (names as in the plain "
                    f"Hugging Face LM); the weights here are the base without them"
                    f"{' (dequantized from 4 bits)' if ad['method'] == 'qlora' else ''}. `load_exported` applies "
                    f"them (peft needed); `load_exported(..., adapters=False)` gives the base alone.")
    files = "\n".join(f"- `{f}`" for f in info["files"])
    if info["weights"] == SAFETENSORS_INDEX:
        files += f"\n- `{SAFETENSORS_INDEX}` (which tensor is in which shard)"
    size = info["total_size"]
    start = f"`{tb['init_from']}`" if tb["init_from"] else "its own initialisation"
    if tb["lm_path"]:
        start += f"; LM from `{tb['lm_path']}`"
    adapter_files = f"- `{ADAPTER_DIR}/`: adapter_config.json, adapter_model.safetensors (peft)" \
        if ad and ad["mode"] == "separate" else ""
    return f"""# {out.name}: an mmscale model

A Flamingo-style multimodal model (vision tower, Perceiver resampler, language model with gated cross-attention)
exported by mmscale from a training run: {info['num_parameters']:,} parameters, {info['dtype']}, {size:,} bytes
of weights in safetensors.

## What trained it

- run: `{tb['run']}`, checkpoint `{Path(tb['checkpoint']).name}` (step {tb['step']} of {tb['max_steps']})
- {tb['world_size']} rank(s), ZeRO stage {tb['zero_stage']}, precision {tb['precision']}, global batch size
  {tb['global_batch_size']}, lr {tb['lr']}, seed {tb['seed']}
- model: preset `{tb['preset'] or '-'}`; started from {start}
- callbacks: {callbacks}
- data: `{tb['train_shards']}` (validation `{tb['val_shards'] or '-'}`), tokenizer `{info['tokenizer']}`
  ({info['tokenizer_vocab_size']} tokens; the model's vocabulary: {info['vocab_size']})

{metric_text}
{adapters}

## Files

- `config.yaml`: the run's config, self-contained (what changed: see `config_changes` in `config.json`)
- `config.json`: format {info['format']} v{info['format_version']}, dtype, vocabulary, provenance
{files}
- `{info['tokenizer']}`: the tokenizer
{adapter_files}

## Load it

```python
from mmscale.export import load_exported

model, tokenizer, cfg = load_exported("{out}")          # no DeepSpeed; dtype={info['dtype']} unless dtype=...
```

Fine-tune it: `deepspeed --num_gpus N launchers/train.py --config ... model.init_from={out}`.

Exported with: `{info['exported']['command'] or 'mmscale.export.export_model'}`
"""


# ----------------------------------------------------------------------------------------------- loading


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_exported(directory: str | Path, dtype: Any = None, adapters: bool = True) -> tuple[Any, Any, Any]:
    """(model, tokenizer, cfg) of an exported folder: the model built from its config.yaml (no DeepSpeed, no process
    group) in `dtype` (default: the export's), its weights loaded tensor by tensor from the safetensors (one file or
    shards), in eval mode. An export with separate adapters gets them applied (peft needed) unless
    `adapters=False`. `cfg` is the exported config with data.tokenizer pointing into the folder."""
    import torch
    import yaml

    from mmscale.config import config_from_dict
    from mmscale.data import load_tokenizer

    d = Path(directory)
    try:
        info = json.loads((d / CONFIG_JSON).read_text())
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{d} is not an mmscale export: no readable {CONFIG_JSON} ({e}); make one with "
                                f"launchers/export.py --run RUN --out {d}") from e
    if info.get("format") != FORMAT or int(info.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{d / CONFIG_JSON}: format {info.get('format')!r} v{info.get('format_version')}; this "
                         f"mmscale reads {FORMAT!r} up to v{FORMAT_VERSION}")
    # relative paths against this folder where it is now (an export from before: as they were)
    cfg = config_from_dict(run_paths.resolve_config(yaml.safe_load((d / CONFIG_YAML).read_text()), d, legacy=False),
                           check_paths=False)
    tok_path = d / info["tokenizer"]
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(tok_path)))
    tokenizer = load_tokenizer(tok_path)
    dt = as_dtype(dtype or info["dtype"])
    with _default_dtype(dt):
        model = build_exported_model(cfg, int(info["vocab_size"]))
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dt:
            p.data = p.data.to(dt)
    reader = SafetensorsReader(d)
    state = model.state_dict(keep_vars=True)
    tied = {**_tied_groups(state), **info.get("tied_weights", {})}
    missing = [n for n in state if n not in reader and n not in tied]
    unexpected = [n for n in reader.names if n not in state]
    if missing or unexpected:
        raise ValueError(f"{d}: its weights do not fit the model its config.yaml builds: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name in reader.names:
            state[name].copy_(reader.read(name))
    del reader
    ad = info.get("adapters") or {}
    if adapters and ad.get("mode") == "separate":
        _apply_adapters(model, d / ad.get("path", ADAPTER_DIR), ad, dt)
    return model.eval(), tokenizer, cfg


def _apply_adapters(model: Any, path: Path, ad: dict[str, Any], dtype: torch.dtype) -> None:
    """The adapters of a separate export onto its base model, as the run's lora callback put them (peft)."""
    import torch
    from safetensors.torch import load_file

    from mmscale.callbacks.peft_methods import LoRA

    lora_args = {k: v for k, v in (ad.get("args") or {}).items()
                 if k in ("r", "alpha", "dropout", "target_modules", "components")}
    LoRA(**lora_args).on_model_built(model)
    saved = load_file(path / "adapter_model.safetensors")
    params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    keys = {n: _adapter_key(n) for n in params}
    missing = [k for k in keys.values() if k not in saved]
    if missing or len(saved) != len(keys):
        raise ValueError(f"{path}: its adapters do not fit the model: missing {missing[:5]}, "
                         f"unexpected {sorted(set(saved) - set(keys.values()))[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            p.data = saved[keys[name]].to(dtype)


# ----------------------------------------------------------------------------------------------- command line


def _model_parser(p: Any) -> None:
    p.add_argument("--run", required=True, help="output_dir of the training run")
    p.add_argument("--out", required=True, help="folder to write (must not exist or be empty; see --overwrite)")
    p.add_argument("--checkpoint", default=None,
                   help="a checkpoint directory of the run (default: its newest that passes its manifest)")
    p.add_argument("--adapters", choices=("merged", "separate"), default="merged",
                   help="lora/qlora runs: merge the adapters into the weights (default), or write the base without "
                        "them plus the adapters in peft's format")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                   help="above this, several model-0000i-of-0000N.safetensors and an index (default 2GB; 10^9 bytes "
                        "a GB, 2^30 a GiB)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: the run's train.precision)")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it holds an earlier export")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    _model_parser(sub.add_parser("model", help="the whole model, one folder, loads without DeepSpeed"))
    a = sub.add_parser("adapter", help="a lora/qlora run's LM adapters in peft's format")
    a.add_argument("--run", required=True, help="output_dir of the run")
    a.add_argument("--out", required=True, help="folder to write adapter_config.json and adapter_model.safetensors")
    a.add_argument("--base-out", default=None, help="also write the base LM the adapters go on (init_from runs)")
    a.add_argument("--checkpoint", default=None, help="a checkpoint directory (default: the run's newest)")
    args = p.parse_args(argv)
    if args.what == "adapter":
        try:
            out = export_adapter(args.run, args.out, args.base_out, args.checkpoint)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(json.dumps({"adapter": str(out), **json.loads((out / "mmscale_export.json").read_text())}))
        return 0
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = " ".join([prog, *argv[1:]] if prog else ["python -m mmscale.export", *argv])
    try:
        summary = export_model(args.run, args.out, args.checkpoint, args.adapters, args.max_shard_size, args.dtype,
                               args.overwrite, command=command)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
