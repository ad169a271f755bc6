"""Parameter-efficient fine-tuning as callbacks: `lora`, `dora`, `qlora` and `ia3` (through peft and bitsandbytes),
`adapters`, `prompt_tuning` and `bitfit`.

Checkpoints of a run that uses one hold only what trains; the frozen weights come back from `model.init_from` /
`model.lm.path` when it resumes or is reloaded (BuildOptions.checkpoint_frozen, checked by a fingerprint).

Both act in `on_model_built`, after the model (and `model.init_from`'s weights) are in place and before DeepSpeed
wraps it. The cross-attention and the resampler keep what the freeze policy (`model.train_*`) says: they are new
in a Flamingo-style model and train in full precision; the methods only change how the LM (and optionally the
vision tower) is adapted. Each logs trainable and total parameters at start.

Under ZeRO-3 the model is partitioned at birth: peft's LoRA layers are created afterwards as ordinary parameters,
and DeepSpeed partitions them when it wraps the model (its ZeRO-3 offload converts parameters zero.Init did not
see). LoRA reads the base layer's `in_features`/`out_features`, never its (empty) weight.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mmscale.callbacks import register_callback
from mmscale.training.callbacks import Callback

log = logging.getLogger("mmscale.callbacks")

_COMPONENTS = ("lm", "vision")


def _check_components(components: Any) -> list[str]:
    components = [components] if isinstance(components, str) else list(components)
    bad = [c for c in components if c not in _COMPONENTS]
    if not components or bad:
        raise ValueError(f"components must be a non-empty list of {', '.join(_COMPONENTS)}; got {components!r}")
    return components


def _report(name: str, model: torch.nn.Module) -> None:
    counts = model.param_counts()
    log.info("%s: %s of %s parameters train (%.3f%%); by component %s", name, f"{counts['trainable']:,}",
             f"{counts['total']:,}", 100 * counts["trainable"] / max(counts["total"], 1), counts["by_component"])


def _is_bias_or_norm(name: str) -> bool:
    leaf = name.rsplit(".", 2)
    owner = leaf[-2].lower() if len(leaf) > 1 else ""
    return name.endswith(".bias") or "norm" in owner or owner.startswith("ln") or owner.endswith("_ln")


class _PEFT(Callback):
    """What every method shares: checkpoints hold only what trains (BuildOptions.checkpoint_frozen), and new
    weights are drawn from their own seeded generator (`_new_weights`)."""

    def on_build(self, options: Any) -> None:
        options.checkpoint_frozen = False

    def _inject(self, model: torch.nn.Module, config: Any) -> dict[int, bool]:
        """peft's `config` injected into each of `self.components` (whose names must match `self.targets`).
        Returns the freeze policy as it was before (by parameter identity: peft renames what it wraps), which
        `_train_only` gives back: peft marks everything but its own weights frozen in what it adapts, and the
        cross-attention blocks live inside the LM's layer list."""
        from peft import inject_adapter_in_model

        before = {id(p): p.requires_grad for p in model.parameters()}
        for comp in self.components:
            part = model.lm if comp == "lm" else model.vision
            if not any(n.rsplit(".", 1)[-1] in self.targets for n, _ in part.named_modules()):
                raise ValueError(f"{self.name}: no module of the {comp} is named any of {self.targets}")
            with _new_weights():  # (ia3: peft draws its vectors at random before it sets them to one)
                inject_adapter_in_model(config, part)
        return before

    def _train_only(self, model: torch.nn.Module, before: dict[int, bool], marker: str) -> None:
        """The method's own weights (`marker` in their names) train, the adapted components' own weights are
        frozen, everything else keeps the freeze policy it had before; then the counts are logged."""
        adapted = set(self.components)
        for comp, params in model.component_params().items():
            for name, p in params:
                p.requires_grad_(marker in name or (comp not in adapted and before[id(p)]))
        _report(self.name, model)


@contextlib.contextmanager
def _new_weights(seed: int = 0) -> Iterator[None]:
    """The method's new weights from a generator of their own: the same on every rank and at every ZeRO stage,
    whatever building the model drew from the global one before (ZeRO-3's partitioned build draws differently)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@register_callback("bitfit")
class BitFit(_PEFT):
    """Only biases and normalisation weights of `components` train (Ben Zaken et al., 2022); for a Llama, which has
    no biases, that is its RMSNorm scales."""

    def __init__(self, components: list[str] | str = ("lm",)):
        self.components = _check_components(components)

    def on_model_built(self, model: torch.nn.Module) -> None:
        groups = model.component_params()
        for comp in self.components:
            for name, p in groups[comp]:
                p.requires_grad_(_is_bias_or_norm(name))
        _report("bitfit", model)


@register_callback("lora")
class LoRA(_PEFT):
    """Low-rank adapters (Hu et al., 2021) on the linear layers named in `target_modules` of `components`, through
    peft; the adapted components' own weights are frozen. With model.train_xattn / train_resampler = lora, every
    linear layer of the cross-attention blocks / the resampler gets adapters of the same r and alpha too."""

    adapts_lora_modes = True
    """It is what `lora` in model.train_xattn / train_resampler asks for (checked by mmscale.job.preflight)."""
    use_dora = False
    """Weight-decomposed adapters (the `dora` subclass)."""

    def __init__(self, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 target_modules: list[str] | str = ("q_proj", "k_proj", "v_proj", "o_proj"),
                 components: list[str] | str = ("lm",)):
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be an integer >= 1, got {r!r}")
        if not isinstance(alpha, (int, float)) or alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}")
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.r, self.alpha, self.dropout = r, float(alpha), float(dropout)
        self.targets = _names(target_modules, "target_modules")
        self.components = _check_components(components)

    def lora_config(self, targets: list[str], **extra: Any) -> Any:
        """peft's LoraConfig of these adapters on the modules named `targets` (`extra`: peft's own fields)."""
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets,
                          bias="none", use_dora=self.use_dora, **extra)

    def peft_config(self, **extra: Any) -> Any:
        """peft's config of the adapters on `components` (an exported adapter's `adapter_config.json`)."""
        return self.lora_config(self.targets, **extra)

    def on_model_built(self, model: torch.nn.Module) -> None:
        from peft import inject_adapter_in_model

        before = self._inject(model, self.lora_config(self.targets))
        # model.train_xattn / train_resampler = lora: every linear layer of each cross-attention block and of the
        # resampler gets the same adapters (their gates, latents and norms stay as the freeze policy set them)
        for i, part in enumerate(_lora_parts(model, getattr(model, "train_modes", {}))):
            linears = [n for n, m in part.named_modules() if type(m) is nn.Linear]
            with _new_weights(1 + i):
                inject_adapter_in_model(self.lora_config(linears), part)
        self._train_only(model, before, "lora_")  # "qlora" / "dora" in the log for the subclasses


def _lora_parts(model: torch.nn.Module, modes: dict[str, str]) -> list[nn.Module]:
    """The modules that model.train_xattn / train_resampler = lora put LoRA on: each cross-attention block, the
    resampler."""
    parts = list(model.xattn_blocks()) if modes.get("xattn") == "lora" else []
    return parts + ([model.resampler] if modes.get("resampler") == "lora" else [])


@register_callback("dora")
class DoRA(LoRA):
    """Weight-decomposed low-rank adaptation (Liu et al., 2024), through peft's `use_dora`: each adapted weight is
    m * (W + B A * alpha / r) / ||W + B A * alpha / r|| (the norm per output row), a trainable magnitude `m` (peft's
    `lora_magnitude_vector`, starting at ||W||: the adapted model starts as it was) on top of LoRA's A and B. The
    same arguments, targets and components as `lora`, model.train_xattn / train_resampler = lora included.

    Under ZeRO-3 its start reads the partitioned base weights (for ||W||): peft gathers them, transformers' ZeRO-3
    config being alive while the engine builds. Its forward reads the base weight again, outside the base layer's
    own forward: DeepSpeed's engine gathers a parameter read that way (its external-parameter discovery)."""

    use_dora = True


def _names(value: Any, what: str, empty_ok: bool = False) -> list[str]:
    """`value` (a name or a list of them) as a list of module names, or an error naming `what`."""
    names = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if names is None or (not names and not empty_ok) or not all(isinstance(t, str) and t for t in names):
        raise ValueError(f"{what} must be a {'' if empty_ok else 'non-empty '}list of module names, got {value!r}")
    return names


@register_callback("ia3")
class IA3(_PEFT):
    """(IA)^3 (Liu et al., 2022), through peft: a learned vector scales the output of each linear layer named in
    `target_modules` of `components`, or its input for those also in `feedforward_modules`; the vectors start at
    one (the adapted model starts as it was) and train, the adapted components' own weights are frozen. Not for
    model.train_xattn / train_resampler = lora (LoRA's). Under ZeRO-3 the vectors, which peft reads from a
    ParameterDict in the layer's forward, are gathered by the engine's external-parameter discovery."""

    def __init__(self, target_modules: list[str] | str = ("k_proj", "v_proj", "down_proj"),
                 feedforward_modules: list[str] | str = ("down_proj",), components: list[str] | str = ("lm",)):
        self.targets = _names(target_modules, "target_modules")
        self.feedforward = _names(feedforward_modules, "feedforward_modules", empty_ok=True)
        outside = [f for f in self.feedforward if f not in self.targets]
        if outside:
            raise ValueError(f"feedforward_modules {outside} are not in target_modules {self.targets}: the "
                             f"feed-forward ones are target modules whose input is scaled; add them to target_modules")
        self.components = _check_components(components)

    def peft_config(self, **extra: Any) -> Any:
        """peft's IA3Config of these vectors (`extra`: peft's own fields)."""
        from peft import IA3Config

        return IA3Config(target_modules=self.targets, feedforward_modules=self.feedforward, **extra)

    def on_model_built(self, model: torch.nn.Module) -> None:
        self._train_only(model, self._inject(model, self.peft_config()), "ia3_l")


class BottleneckAdapter(nn.Module):
    """h + up(gelu(down(h))) (Houlsby et al., 2019), `up` zero-initialised so the adapted model starts as it was."""

    def __init__(self, dim: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(F.gelu(self.down(h)))


def _adapt_output(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook: the module's output (or the first item of a tuple output, as attention returns) through its
    adapter. The adapter is called as a module, so ZeRO-3 gathers its parameters like any other's."""
    if isinstance(output, tuple):
        return (module.adapter(output[0]), *output[1:])
    return module.adapter(output)


@register_callback("adapters")
class Adapters(_PEFT):
    """A bottleneck adapter after the attention and after the MLP of every LM decoder layer; the LM's own weights
    are frozen, the adapters (and what the freeze policy trains: cross-attention, resampler) train."""

    def __init__(self, bottleneck: int = 16, after: list[str] | str = ("self_attn", "mlp")):
        if not isinstance(bottleneck, int) or bottleneck < 1:
            raise ValueError(f"bottleneck must be an integer >= 1, got {bottleneck!r}")
        after = [after] if isinstance(after, str) else list(after)
        if not after or any(a not in ("self_attn", "mlp") for a in after):
            raise ValueError(f"after must list 'self_attn' and/or 'mlp', got {after!r}")
        self.bottleneck, self.after = bottleneck, after

    def on_model_built(self, model: torch.nn.Module) -> None:
        dim = model.lm.config.hidden_size
        targets = [m for n, m in model.lm.named_modules() if n.rsplit(".", 1)[-1] in self.after]
        if not targets:
            raise ValueError(f"adapters: the LM has no module named {self.after}")
        for name, p in model.component_params()["lm"]:
            p.requires_grad_(False)
        with _new_weights():
            for module in targets:
                module.adapter = BottleneckAdapter(dim, self.bottleneck)
                module.register_forward_hook(_adapt_output)
        _report("adapters", model)


@register_callback("qlora")
class QLoRA(LoRA):
    """LoRA over an LM whose linear layers are quantized to 4 bits as it loads (Dettmers et al., 2023): NF4 (or FP4),
    optional double quantization, bf16 compute, and bf16 storage so that ZeRO-3 can partition the packed weights.
    The LM comes from `model.lm.path`; cross-attention and resampler stay trainable in full precision."""

    def __init__(self, quant_type: str = "nf4", double_quant: bool = False, quantize_vision: bool = False,
                 **lora_args: Any):
        if quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
        for name, value in (("double_quant", double_quant), ("quantize_vision", quantize_vision)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        self.quantize_vision = quantize_vision
        super().__init__(**{"components": ("lm",), **lora_args})
        if self.components != ["lm"]:
            raise ValueError(f"qlora quantizes the LM only; components must be ['lm'], got {self.components}")
        self.quant_type, self.double_quant = quant_type, double_quant

    def _qlora_problems(self, cfg: Any) -> list[str]:
        problems = []
        if cfg.train.precision != "bf16":
            problems.append(f"the 4-bit weights compute and are stored in bf16; set train.precision=bf16 (got "
                            f"{cfg.train.precision!r})")
        if not cfg.model.lm.path and not cfg.model.init_from:
            problems.append("the LM is quantized as it loads; set model.lm.path to a save_pretrained folder of the "
                            "base LM, or model.init_from to the run to fine-tune (its LM is written out and loaded)")
        return problems

    def on_build(self, options: Any) -> None:
        super().on_build(options)
        options.lm_quantization = {
            "load_in_4bit": True, "bnb_4bit_quant_type": self.quant_type,
            "bnb_4bit_use_double_quant": self.double_quant, "bnb_4bit_compute_dtype": torch.bfloat16,
            "bnb_4bit_quant_storage": torch.bfloat16,
        }
        # the vision tower is quantized in on_model_built, after model.init_from's weights are in: whole then
        options.build_whole = options.build_whole or self.quantize_vision

    def config_problems(self, cfg: Any) -> list[str]:
        problems = self._qlora_problems(cfg)
        if self.quantize_vision and cfg.model.train_vision:
            problems.append("quantize_vision freezes the vision tower in 4 bits; set model.train_vision=false")
        return problems

    def on_model_built(self, model: torch.nn.Module) -> None:
        import bitsandbytes as bnb

        if self.quantize_vision:
            n = quantize_linears(model.vision, self.quant_type, self.double_quant)
            log.info("qlora: %d linear layers of the vision tower in 4 bits (%s)", n, self.quant_type)
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                # Trap (shared/notes/qlora-zero3-cpu.md): on CPUs with AVX512-BF16, a Linear4bit in eval mode with
                # no grad repacks its weight in place into a CPU-only layout, which ZeRO-3 loses when it releases
                # and re-gathers the parameter; evaluation after the first batch then goes wrong silently.
                module.support_avx512bf16_for_cpu = False
        super().on_model_built(model)


class SoftPrompt(nn.Module):
    """`num_tokens` learned input embeddings, the same for every sample (Lester et al., 2021)."""

    def __init__(self, num_tokens: int, dim: int, std: float):
        super().__init__()
        self.embeddings = nn.Parameter(torch.randn(num_tokens, dim) * std)

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.embeddings.unsqueeze(0).expand(batch_size, -1, -1)


@register_callback("prompt_tuning")
class PromptTuning(_PEFT):
    """`num_tokens` soft tokens before the text (MultimodalModel.prompt); the LM's own weights are frozen, the soft
    tokens (and what the freeze policy trains: cross-attention, resampler) train."""

    def __init__(self, num_tokens: int = 8):
        if not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"num_tokens must be an integer >= 1, got {num_tokens!r}")
        self.num_tokens = num_tokens

    def on_model_built(self, model: torch.nn.Module) -> None:
        for _, p in model.component_params()["lm"]:
            p.requires_grad_(False)
        config = model.lm.config
        # the scale of the LM's own embeddings at initialisation (read from the config: under ZeRO-3 the weights
        # are partitioned here)
        with _new_weights():
            model.prompt = SoftPrompt(self.num_tokens, config.hidden_size, getattr(config, "initializer_range", 0.02))
        _report("prompt_tuning", model)


def quantize_linears(module: nn.Module, quant_type: str, double_quant: bool) -> int:
    """Replace every nn.Linear inside `module` by a frozen bitsandbytes Linear4bit holding the same weights (bf16
    compute and storage, like the LM's); the module must be whole (not partitioned). Returns how many."""
    import bitsandbytes as bnb

    targets = [(name, child) for name, child in module.named_modules() if type(child) is nn.Linear]
    for name, lin in targets:
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=torch.bfloat16, compress_statistics=double_quant, quant_type=quant_type,
                              quant_storage=torch.bfloat16)
        q.weight = bnb.nn.Params4bit(lin.weight.data.detach().float().clone(), requires_grad=False,
                                     quant_type=quant_type, compress_statistics=double_quant,
                                     quant_storage=torch.bfloat16)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.detach().clone(), requires_grad=False)
        q = q.to(lin.weight.device)  # bitsandbytes quantizes as the weight moves to its device
        parent = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        setattr(parent, name.rsplit(".", 1)[-1], q)
    return len(targets)
