"""Start a run from another run's weights: `model.init_from`.

A source is one of
    a run directory        its newest checkpoint that passes its manifest (any ZeRO stage, any world size)
    a checkpoint directory `runs/x/checkpoints/step_00000400`, which must pass its manifest
    a Hugging Face-style directory with `model.safetensors` (or shards listed in `model.safetensors.index.json`)
Only weights are taken: not the optimizer, the schedule or the data position. Names that the model has and the
source lacks (missing) or the reverse (unexpected) are reported; a shape mismatch is refused with the names.
Nothing is unpickled beyond tensors (safetensors, or `torch.load(weights_only=True)`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmscale.training import checkpoint

log = logging.getLogger("mmscale.weights")

if TYPE_CHECKING:  # torch is imported where tensors are read: config validation imports this module
    import torch

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def source_problems(path: str, field: str = "model.init_from") -> list[str]:
    """Cheap check for config validation: the path is one of the three kinds of source."""
    p = Path(path)
    if not p.exists():
        return [f"{field}: {path!r} does not exist; give a run directory, a checkpoint directory or a folder with "
                f"{SAFETENSORS}"]
    if _kind(p) is None:
        return [f"{field}: {path!r} holds no checkpoint (checkpoints/step_*), no DeepSpeed checkpoint "
                f"(*model_states.pt) and no {SAFETENSORS}; give a run directory, a checkpoint directory or an "
                f"exported model folder"]
    return []


def _kind(p: Path) -> str | None:
    if (p / SAFETENSORS).is_file() or (p / SAFETENSORS_INDEX).is_file():
        return "safetensors"
    if p.is_dir() and any(p.glob("*model_states.pt")):
        return "checkpoint"
    if checkpoint.complete_checkpoints(p / "checkpoints"):
        return "run"
    return None


def resolve_source(path: str) -> tuple[str, Path]:
    """(kind, the directory to read): a run directory resolves to its newest checkpoint that passes its manifest
    (damaged ones skipped with a warning); a checkpoint directory must pass it (mmscale.job.runs). A
    RunOpenError (a ValueError) says why not."""
    from mmscale.training import verified as runs

    p = Path(path)
    kind = _kind(p)
    if kind == "run":
        return "checkpoint", runs.newest_verified(p, "model.init_from")
    if kind == "checkpoint":
        return kind, runs.verify_given(p, "model.init_from")
    if kind is None:
        raise ValueError(source_problems(path)[0])
    return kind, p


def read_weights(path: str) -> tuple[dict[str, torch.Tensor], Path]:
    """The full state dict of a source, on the CPU, and the directory it came from."""
    return read_resolved(*resolve_source(path))


def read_resolved(kind: str, where: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """`read_weights` of a source `resolve_source` has resolved (and verified) already."""
    if kind == "checkpoint":
        manifest = where / checkpoint.MANIFEST
        if manifest.is_file() and checkpoint.read_manifest(where).get("frozen_fingerprint"):
            raise ValueError(f"{where} holds only what its fine-tuning method trained (its frozen weights come from "
                             f"its own model.init_from / model.lm.path); start from its base run instead, or from "
                             f"a merged export of it")
        return checkpoint.consolidated_state_dict(where), where
    from safetensors.torch import load_file

    if (where / SAFETENSORS).is_file():
        return load_file(where / SAFETENSORS), where
    index = json.loads((where / SAFETENSORS_INDEX).read_text())
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(where / shard))
    return out, where


def compare(shapes: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Missing, unexpected and mismatched names of `state` against the model's full parameter shapes."""
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    mismatched = sorted(f"{n}: model {tuple(shapes[n])}, source {tuple(state[n].shape)}"
                        for n in set(shapes) & set(state) if tuple(shapes[n]) != tuple(state[n].shape))
    return {"missing": missing, "unexpected": unexpected, "mismatched": mismatched,
            "loaded": len(set(shapes) & set(state)) - len(mismatched)}


def describe(report: dict[str, Any], source: Path) -> str:
    def few(names: list[str]) -> str:
        return ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")

    text = f"model.init_from {source}: {report['loaded']} tensors loaded"
    if report["missing"]:
        text += f"; {len(report['missing'])} missing in the source (kept as built): {few(report['missing'])}"
    if report["unexpected"]:
        text += f"; {len(report['unexpected'])} unexpected (ignored): {few(report['unexpected'])}"
    return text


LM_PREFIX = "lm."
WRAPPER = ".decoder_layer."  # mmscale's XAttnDecoderLayer holds the LM's own decoder layer under this name


def plain_lm_name(name: str) -> str:
    """A name inside the multimodal model's LM as the plain Hugging Face LM has it:
    `lm.model.layers.0.decoder_layer.self_attn...` -> `model.layers.0.self_attn...` (names relative to the LM are
    taken as they are)."""
    return name.removeprefix(LM_PREFIX).replace(WRAPPER, ".")


def export_base_lm(cfg: Any, vocab_size: int, out: Path) -> Path:
    """Write the language model of `cfg.model.init_from` (the LM of a multimodal run: its decoder layers without the
    cross-attention blocks) as a Hugging Face model folder `out`, for a job that loads the LM by path (quantized).
    Skipped when `out` already holds the export of the same source."""
    import torch

    from mmscale.model.multimodal import build_lm

    kind, where = resolve_source(cfg.model.init_from)
    stamp = out / "mmscale_source.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("source") == str(where.resolve()):
        return out  # a restart: the export is there (and the source not read again)
    state, where = read_resolved(kind, where)
    lm_state = {plain_lm_name(k): v for k, v in state.items() if k.startswith(LM_PREFIX) and ".xattn." not in k}
    lm = build_lm(cfg.model, vocab_size)
    missing, unexpected = lm.load_state_dict(lm_state, strict=False)
    missing = [k for k in missing if k not in (getattr(lm, "_tied_weights_keys", None) or {})]
    if missing or unexpected:
        raise ValueError(f"{where}: its LM does not fit model.lm: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        lm.save_pretrained(out)
    stamp.write_text(json.dumps({"source": str(where.resolve())}))
    return out


class InitFromError(RuntimeError):
    """`model.init_from` cannot be used (unreadable, or a shape mismatch); raised on every rank alike."""


def base_names(names: list[str]) -> dict[str, str]:
    """{name in a freshly built model: name in the source}: a source saved with peft's layers in place (a lora or
    task_adapters run whose checkpoint holds every weight) keeps a base weight as `....q_proj.base_layer.weight`,
    which is the built model's `....q_proj.weight`; the adapters' own tensors are nobody's base and stay unmatched."""
    out = {n: n for n in names if ".base_layer." not in n}
    for n in names:
        out.setdefault(n.replace(".base_layer.", "."), n)
    return out


def load_initial_weights(model: torch.nn.Module, source: str, rank: int) -> dict[str, Any]:
    """Copy the weights of `source` into the freshly built model, before DeepSpeed wraps it (or, in one process, as
    evaluation and export build a run's model). Rank 0 opens the source (mmscale.training.readers: one tensor in
    memory at a time) and checks it against the model's full shapes; every rank gets its verdict before any
    collective, so a bad source stops all ranks with the same message. Returns the report."""
    import torch
    import torch.distributed as dist

    from mmscale.training.engine import broadcast_object
    from mmscale.training.readers import open_source

    # 4-bit weights were quantized from the source's own LM as it loaded (build.base_lm_from_init): not again here
    quantized = {n for n, p in model.named_parameters() if type(p).__name__ == "Params4bit"}
    shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters() if n not in quantized}
    reader, verdict = None, None
    if rank == 0:
        try:
            reader = open_source(source)
            where = getattr(reader, "ckpt", None) or reader.directory
            alias = base_names(reader.names)
            report = compare(shapes, {n: torch.empty(reader.shape(src), device="meta") for n, src in alias.items()
                                      if n not in quantized})
            error = (f"model.init_from {where}: shapes differ from the model built here:\n  "
                     + "\n  ".join(report["mismatched"][:20])) if report["mismatched"] else None
            verdict = (error, report, str(where))
        except Exception as e:  # noqa: BLE001  (any reader error is the source's problem, reported as such)
            verdict = (f"model.init_from {source!r}: cannot read it ({type(e).__name__}: {e})", None, source)
    error, report, where = broadcast_object(verdict)
    if error:
        raise InitFromError(error)
    params = dict(model.named_parameters())
    names = sorted(set(shapes) - set(report["missing"]))
    with torch.no_grad():
        for name in names:
            p = params[name]
            if hasattr(p, "ds_id"):  # partitioned at birth: gather, let rank 0 write, DeepSpeed re-partitions on exit
                import deepspeed

                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if rank == 0:
                        p.data.copy_(reader.read(alias[name]))
            else:
                if rank == 0:
                    p.copy_(reader.read(alias[name]))
                if dist.is_initialized() and dist.get_world_size() > 1:
                    dist.broadcast(p.data, src=0)
    if rank == 0:
        log.info(describe(report, Path(where)))
    return report
