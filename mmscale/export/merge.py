"""A fine-tuned model made plain before it is written: LoRA layers merged (W + B A * alpha / r, in fp32; DoRA's
m * (W + B A * alpha / r) / ||W + B A * alpha / r||), IA3 layers merged (W scaled per output row, or per input column
for a feed-forward one), or their adapters taken off, 4-bit (QLoRA, bitsandbytes) linears dequantized, each replaced
by an nn.Linear a layer at a time, so that the names are those of the model built without lora/dora/qlora/ia3."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch


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


def _lora_merged(module: Any, w: torch.Tensor) -> torch.Tensor:
    """`w` (the fp32 base weight, (out, in)) with the adapter of the LoRA layer `module` merged, in place, in fp32
    (peft's get_delta_weight rounds to the adapters' own dtype, bf16 under qlora). DoRA as peft's forward computes
    it: m * (W + B A * s) / ||W + B A * s||, the norm of each output row (detached in training: a constant here)."""
    import torch

    for adapter in module.active_adapters:  # "default" as lora injects it; task_adapters': the selected task's
        a, b = module.lora_A[adapter].weight.float(), module.lora_B[adapter].weight.float()
        delta = b @ a * module.scaling[adapter]
        w += delta.T if module.fan_in_fan_out else delta
        if module.use_dora.get(adapter):
            magnitude = module.lora_magnitude_vector[adapter].weight.float()  # (out,)
            w *= (magnitude / torch.linalg.norm(w, dim=1)).unsqueeze(1)  # (out, in) * (out, 1)
    return w


def _ia3_merged(module: Any, w: torch.Tensor, bias: torch.Tensor | None) -> tuple[Any, Any]:
    """(weight, bias) of the IA3 layer `module` over the fp32 base weight `w` (out, in) of an nn.Linear (peft then
    keeps fan_in_fan_out off), merged in place in fp32: its vector (out, 1) scales the output (each row of W, and
    the bias), a feed-forward layer's (1, in) the input (each column of W; the bias is added after it)."""
    bias = None if bias is None else bias.detach().float().clone()
    for adapter in module.active_adapters:  # one, "default", as the callback injects it
        scale = module.ia3_l[adapter].float()
        w *= scale
        if bias is not None and not module.is_feedforward:
            bias *= scale.flatten()
    return w, bias


@_no_grad
def plain_linears(model: Any, merge: bool, merge_also: Callable[[str], bool] | None = None) -> dict[str, int]:
    """Make `model` a plain one, in place, a layer at a time: every LoRA (or DoRA, or IA3) layer becomes an nn.Linear
    holding its base weight (dequantized when it was 4-bit) with, with `merge` (or where `merge_also(name)` holds),
    its adapters merged in fp32 (B A * alpha / r added; DoRA's magnitude over the row norm applied; IA3's vectors
    scaling rows or columns); every other 4-bit linear layer becomes an nn.Linear of its dequantized weight. The
    names are then the ones of the model built without the method. Returns how many layers of each kind (DoRA
    layers count as LoRA ones; `ia3_merged` / `ia3_removed` only where the model has IA3 layers)."""
    counts = {"lora_merged": 0, "lora_removed": 0, "dequantized": 0}
    kinds: tuple[type, ...] = ()
    if "peft" in sys.modules:
        from peft.tuners.ia3 import IA3Layer
        from peft.tuners.lora import LoraLayer

        kinds = (LoraLayer, IA3Layer)
    # by name, each layer looked up when its turn comes: a replaced layer is freed right away, not at the end
    adapted = [n for n, m in model.named_modules() if kinds and isinstance(m, kinds)]
    for name in adapted:
        module = model.get_submodule(name)
        merge_here = merge or (merge_also is not None and merge_also(name))
        lora = hasattr(module, "lora_A")
        base = module.get_base_layer()
        if not hasattr(base, "in_features"):
            raise ValueError(f"{name}: {'LoRA' if lora else 'IA3'} on a {type(base).__name__} layer cannot be "
                             f"merged here (linear layers only)")
        w, bias = _dense_weight(base), base.bias  # an fp32 base weight itself (merged in place), 4-bit dequantized
        if merge_here and lora:
            w = _lora_merged(module, w)
        elif merge_here:
            w, bias = _ia3_merged(module, w, bias)
        counts["dequantized"] += type(base).__name__ == "Linear4bit"
        _replace(model, name, _plain_linear(w, bias))
        if not lora and "ia3_merged" not in counts:
            counts.update(ia3_merged=0, ia3_removed=0)
        counts[f"{'lora' if lora else 'ia3'}_{'merged' if merge_here else 'removed'}"] += 1
        del module, base, w, bias
    for name in [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]:
        module = model.get_submodule(name)
        _replace(model, name, _plain_linear(_dense_weight(module), module.bias))
        counts["dequantized"] += 1
        del module
    return counts
