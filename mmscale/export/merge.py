"""A fine-tuned model made plain before it is written: LoRA layers merged (W + B A * alpha / r, in fp32) or their
adapters taken off, 4-bit (QLoRA, bitsandbytes) linears dequantized, each replaced by an nn.Linear a layer at a
time, so that the names are those of the model built without lora/qlora."""

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
