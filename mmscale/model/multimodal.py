"""The multimodal model: vision tower -> Perceiver resampler -> language model with gated cross-attention.

    images (B, M, 3, H, W) --vision--> (R, P, Dv) --resampler--> visual tokens (B, M*n, Dv), image after image
    (R: the real slots of `image_mask`; a padded slot's n tokens are zeros)
    text (B, L) --LM, with a gated cross-attention block before decoder layers 0, N, 2N, ...--> logits (B, L, V)

Text token t of sample b sees the visual tokens of image `media_index[b, t]` (media_mode "previous", Flamingo)
or of images 0..media_index[b, t] ("all"); tokens before the first image (media_index -1) see none.

Plain single-device PyTorch: ranks, ZeRO and DeepSpeed are applied from outside (mmscale/training/engine.py).
To stay buildable under `deepspeed.zero.Init`, every parameter is created in a module's `__init__`, none is
modified afterwards, and no parent reads parameter values while building.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from mmscale.config import ModelConfig
from mmscale.kernels import build_media_key_range
from mmscale.model.resampler import PerceiverResampler
from mmscale.model.vision import VisionTower, build_vision_tower
from mmscale.model.xattn import GatedCrossAttentionBlock, XAttnDecoderLayer, apply_gated_xattn, find_decoder_layers

COMPONENTS = ("vision", "resampler", "lm", "xattn", "head", "media")


@dataclass
class MultimodalOutput(ModelOutput):
    # a ModelOutput (an ordered dict) so that ZeRO-3's module hooks can see the tensors inside it
    logits: torch.Tensor | None = None
    """(B, L, V) next-token logits."""
    hidden: torch.Tensor | None = None
    """(B, L, D) the LM's last hidden states (after its final norm), only when an objective asks for them."""
    media: torch.Tensor | None = None
    """(B, M*n, Dv) the visual tokens the text attended to, image after image (zeros for padded slots)."""
    terms: dict[str, dict[str, torch.Tensor]] | None = None
    """Each objective's outputs (mmscale.objectives): its scalar sums (`loss_sum`, ...) and whatever else it gives
    (e.g. classification's `logits`, captioning's `token_loss` with return_token_loss=True)."""


class MultimodalModel(nn.Module):
    def __init__(
        self,
        vision: VisionTower,
        resampler: PerceiverResampler,
        lm: PreTrainedModel,
        media_mode: str = "previous",
    ):
        super().__init__()
        if media_mode not in ("previous", "all"):
            raise ValueError(f"media_mode: {media_mode!r} is not one of 'previous', 'all'")
        self.objectives = nn.ModuleDict()
        """The objectives (mmscale.objectives) called at the end of each forward, with their heads: attached by the
        job that builds the model (mmscale.job.build), in whatever order; none = logits only. (First among the
        submodules: the parameter order the optimizer sees is the one it had when the classification head was
        the model's own first submodule.)"""
        self.vision = vision
        self.resampler = resampler
        self.lm = lm
        self.media_mode = media_mode
        self.train_modes: dict[str, str] = {"resampler": "full", "xattn": "full"}
        """How the resampler and the cross-attention train (`full`, `lora`, `frozen`): set by apply_freeze_policy,
        read by the lora/qlora callback, which puts adapters on the `lora` ones."""
        self.prompt: nn.Module | None = None
        """Optional (prompt tuning): a module mapping the batch size to (B, k, D) embeddings put before the text's.
        The k positions see no image and are dropped from the logits: outputs line up with `input_ids`."""
        self.media = nn.ModuleDict()
        """The encoders of the media besides images (mmscale.media: video, audio), attached by the job that builds
        the model (mmscale.job.build); empty for an images-only model. (Last among the submodules: an images-only
        model's parameter order is the one it had before media existed.)"""

    # --------------------------------------------------------------------------------------------- forward

    @property
    def media_size(self) -> int:
        """The visual tokens' width (the vision tower's, which the resampler keeps)."""
        return self.vision.hidden_size

    def xattn_layers(self) -> list[XAttnDecoderLayer]:
        """The decoder-layer wrappers inside `lm` (looked up each time: a transform of `lm` may move them)."""
        return [m for m in self.lm.modules() if isinstance(m, XAttnDecoderLayer)]

    def xattn_blocks(self) -> list[GatedCrossAttentionBlock]:
        return [layer.xattn for layer in self.xattn_layers()]

    @property
    def vision_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.vision.parameters())

    def encode_media(self, pixel_values: torch.Tensor, image_mask: torch.Tensor | None = None,
                     **media: torch.Tensor) -> torch.Tensor:
        """(B, M, 3, H, W) images and every other medium's items -> media tokens (B, S*n, Dv), media slot after
        media slot (mmscale.media.base); the shape is static whatever the masks. S: the slots of every medium
        together (M alone for an images-only model).

        image_mask (B, M) bool: only the slots it marks real go through the vision tower and the resampler; the
        tokens of the other (padded) slots are zeros. None: every slot is encoded. `media`: the batch's
        `{name}_values`, `{name}_mask` and `{name}_slot` of each medium in `self.media` (and `image_slot` when
        there are several media: each item's slot; without one a medium's items follow the ones before it).

        A medium without a real item in the batch still runs its encoder and the resampler once, on one padded item
        whose tokens are multiplied by zero: under ZeRO-3 every rank must call each module's forward (its parameters
        are gathered in a collective) and get a gradient for each parameter, whatever its batch holds. A frozen
        tower runs under no_grad.
        """
        B, M = pixel_values.shape[:2]
        if image_mask is not None and image_mask.shape != (B, M):
            raise ValueError(f"encode_media: image_mask {tuple(image_mask.shape)} does not match pixel_values "
                             f"{tuple(pixel_values.shape)}; want (B, M) = {(B, M)}")
        kinds = [("image", pixel_values, image_mask, media.get("image_slot"))]
        for name in self.media:
            values = media.get(f"{name}_values")
            if values is None:  # a batch made without this medium (e.g. captioning images): none of its items. A
                continue        # training batch carries every configured medium's tensors: every rank runs each
            kinds.append((name, values, media.get(f"{name}_mask"), media.get(f"{name}_slot")))
        S = sum(values.shape[1] for _, values, _, _ in kinds)
        out, first = None, 0
        for name, values, mask, slot in kinds:
            Mk = values.shape[1]
            flat = values.flatten(0, 1)  # (B*Mk, ...)
            # note: a CPU-GPU sync point (a data-dependent size)
            real = None if mask is None else mask.flatten().nonzero().squeeze(1)
            empty = real is not None and real.numel() == 0
            if empty:  # the padded first item stands in; its tokens are zeroed below
                real = real.new_zeros(1)
            with _statistics_frozen(self) if empty else contextlib.nullcontext():
                feats = self._media_features(name, flat if real is None else flat[real])  # (R, P, Dv)
                tokens = self.resampler(feats)  # (R, n, Dv)
            n, dv = tokens.shape[1:]
            if out is None:
                out = tokens.new_zeros(B * S, n, dv)
            if empty:  # the graph still reaches every parameter: all-zero gradients, never missing ones
                out = out + tokens.sum() * 0.0
                continue
            if slot is None:  # this medium's items after the ones before it
                slot = torch.arange(first, first + Mk, device=tokens.device).expand(B, Mk)
            rows = torch.arange(B, device=tokens.device).unsqueeze(1) * S
            target = (rows + slot).flatten()
            target = target if real is None else target[real]
            out = out.index_copy(0, target, tokens)  # gradients flow back to the real items
            first += Mk
        return out.reshape(B, S * n, dv)

    def _media_features(self, name: str, values: torch.Tensor) -> torch.Tensor:
        """A medium's items (R, ...) -> the resampler's input (R, P, Dv): images through the vision tower, any
        other medium through its encoder (`self.media[name]`)."""
        if name != "image":
            return self.media[name](values, self.vision)
        with torch.no_grad() if self.vision_frozen else contextlib.nullcontext():
            return self.vision.encode_images(values)

    def forward(
        self,
        pixel_values: torch.Tensor,
        image_mask: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        media_index: torch.Tensor,
        labels: torch.Tensor | None = None,
        return_token_loss: bool = False,
        class_labels: torch.Tensor | None = None,
        **media: torch.Tensor,
    ) -> MultimodalOutput:
        """pixel_values (B, M, 3, H, W) float; image_mask (B, M) bool (real slots first, padding after);
        input_ids, attention_mask, media_index, labels (B, L) int64; media_index[b, t] = the latest media slot at
        or before token t, -1 before the first. `media`: the other media's tensors (see `encode_media`)."""
        if pixel_values.shape[:2] != image_mask.shape or media_index.shape != input_ids.shape:
            raise ValueError(
                f"batch shapes disagree: pixel_values {tuple(pixel_values.shape)} vs image_mask"
                f" {tuple(image_mask.shape)} (want (B, M, 3, H, W) and (B, M)); media_index {tuple(media_index.shape)} vs input_ids"
                f" {tuple(input_ids.shape)} (want both (B, L))"
            )
        media_tokens = self.encode_media(pixel_values, image_mask, **media)
        n = self.resampler.num_latents
        # (B,) real items of every medium fill the first slots (they are numbered in text order)
        kv_lens = (image_mask.sum(dim=1) + sum(media[f"{name}_mask"].sum(dim=1) for name in self.media
                                               if f"{name}_mask" in media)) * n
        media = media_tokens
        lm_inputs: dict[str, torch.Tensor] = {"input_ids": input_ids}
        k = 0  # prompt tuning: k soft tokens before the text, which see no image and leave the outputs after
        if self.prompt is not None:
            prefix = self.prompt(input_ids.shape[0])  # called as a module: ZeRO-3 gathers its parameters
            k = prefix.shape[1]
            embeds = self.lm.get_input_embeddings()(input_ids)
            lm_inputs = {"inputs_embeds": torch.cat([prefix.to(embeds.dtype), embeds], dim=1)}
            attention_mask = torch.cat([attention_mask.new_ones(prefix.shape[:2]), attention_mask], dim=1)
            media_index = torch.cat([media_index.new_full(prefix.shape[:2], -1), media_index], dim=1)
        key_range = build_media_key_range(media_index, n, self.media_mode)  # (B, L, 2); kernel also applies kv_lens
        objectives = list(self.objectives.values())
        want_hidden = any(getattr(o, "needs_hidden", False) for o in objectives)
        logits = hidden = None
        # the image-conditioned pass, unless every objective says it reads nothing of it (the same on every rank:
        # the objectives are the config's)
        if not objectives or any(getattr(o, "needs_logits", True) for o in objectives):
            for layer in self.xattn_layers():
                layer.condition(media, key_range, kv_lens)
            lm_out = self.lm(**lm_inputs, attention_mask=attention_mask, use_cache=False,
                             output_hidden_states=want_hidden)
            logits = lm_out.logits[:, k:]
            hidden = lm_out.hidden_states[-1][:, k:] if want_hidden else None
        out = MultimodalOutput(logits=logits, hidden=hidden, media=media)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask[:, k:], "image_mask": image_mask,
                 "media_index": media_index[:, k:], "labels": labels, "class_labels": class_labels,
                 "return_token_loss": return_token_loss}
        # each objective's sums and outputs (ZeRO-3: its head is a submodule, called inside this forward)
        terms = {name: objective(self, out, batch) for name, objective in self.objectives.items()}
        # built whole, not assigned after: ZeRO-3's hooks see a ModelOutput's tensors through its keys, which
        # only construction fills
        return MultimodalOutput(logits=logits, hidden=hidden, media=media, terms=terms)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, D) the LM's last hidden states of the text alone: every token sees no image (the cross-attention
        blocks get no keys), as a text tower would. For objectives that compare text with images (contrastive)."""
        media_index = torch.full_like(input_ids, -1)
        n = self.resampler.num_latents
        key_range = build_media_key_range(media_index, n, self.media_mode)  # every range empty
        dtype = self.lm.get_input_embeddings().weight.dtype
        no_media = torch.zeros(input_ids.shape[0], n, self.media_size, dtype=dtype, device=input_ids.device)
        for layer in self.xattn_layers():
            layer.condition(no_media, key_range, torch.zeros(input_ids.shape[0], dtype=torch.long,
                                                             device=input_ids.device))
        lm_out = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                         output_hidden_states=True)
        return lm_out.hidden_states[-1]

    # --------------------------------------------------------------------------------------------- accounting

    def component_params(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Named parameters grouped by component: vision, resampler, lm (the original LM weights), xattn."""
        xattn_ids = {id(p) for block in self.xattn_blocks() for p in block.parameters()}
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {c: [] for c in COMPONENTS}
        for name, p in self.named_parameters():
            top = name.split(".", 1)[0]
            if top == "prompt":  # prompt tuning's soft tokens: counted with the LM they feed
                groups["lm"].append((name, p))
            elif top == "objectives":  # the objectives' heads
                groups["head"].append((name, p))
            elif top == "lm":
                groups["xattn" if id(p) in xattn_ids else "lm"].append((name, p))
            else:
                groups[top].append((name, p))
        return groups

    def param_counts(self) -> dict:
        """{"total", "trainable", "by_component": {vision, resampler, lm, xattn, head}, "trainable_by_component"}.
        Works on meta tensors, on
        ZeRO-3 partitioned parameters (their full size is `ds_numel`; `numel()` is 0 locally) and on 4-bit weights
        (counted by the shape they quantize, not their packed storage)."""
        by_component, trainable_by, total, trainable = {}, {}, 0, 0
        for comp, params in self.component_params().items():
            if comp in ("head", "media") and not params:  # no objective with a head; images only
                continue
            count = count_trainable = 0
            for _, p in params:
                quant = getattr(p, "quant_state", None)  # 4-bit weights: several packed into one stored element
                numel = quant.shape.numel() if quant is not None else getattr(p, "ds_numel", p.numel())
                count += numel
                count_trainable += numel if p.requires_grad else 0
            by_component[comp], trainable_by[comp] = count, count_trainable
            total, trainable = total + count, trainable + count_trainable
        return {"total": total, "trainable": trainable, "by_component": by_component,
                "trainable_by_component": trainable_by}


@contextlib.contextmanager
def _statistics_frozen(model: nn.Module):
    """BatchNorm layers in eval mode for a stand-in pass (a padded item run only so that every rank calls every
    module): its zeros must not move the running statistics that evaluation uses."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        for m in norms:
            m.train()


def apply_freeze_policy(model: MultimodalModel, cfg: ModelConfig) -> None:
    """Set requires_grad per component from cfg.train_vision / train_resampler / train_lm / train_xattn.

    A component in `lora` mode (cross-attention, resampler) is frozen here but for the cross-attention's tanh gates,
    which stay trainable scalars; `model.train_modes` records the modes, and the lora/qlora callback puts its
    adapters on the components it names (mmscale.callbacks.peft_methods)."""
    modes = {"resampler": train_mode(cfg.train_resampler), "xattn": train_mode(cfg.train_xattn)}
    flags = {
        "vision": cfg.train_vision,
        "resampler": modes["resampler"] == "full",
        "lm": cfg.train_lm,
        "xattn": modes["xattn"] == "full",
        "head": True,  # new with the model: it always trains
        "media": None,  # the media encoders': set as they are attached (mmscale.media.attach_media)
    }
    groups = model.component_params()
    for comp, params in groups.items():
        if flags[comp] is None:
            continue
        for _, p in params:
            p.requires_grad_(flags[comp])
    if modes["xattn"] == "lora":
        for block in model.xattn_blocks():
            block.attn_gate.requires_grad_(True)
            block.ff_gate.requires_grad_(True)
    model.train_modes = modes
    if cfg.train_lm and cfg.lm.train_top_layers:
        parent, attr = find_decoder_layers(model.lm)
        _train_top_layers(model, groups["lm"], getattr(parent, attr), cfg.lm.train_top_layers,
                          "model.lm.train_top_layers")
    if cfg.train_vision and cfg.vision.train_top_layers:
        _train_top_layers(model, groups["vision"], _tower_layers(model.vision), cfg.vision.train_top_layers,
                          "model.vision.train_top_layers")


def train_mode(value: str | bool) -> str:
    """`full`, `lora` or `frozen` for a model.train_xattn / train_resampler value (true/false: full/frozen)."""
    return {True: "full", False: "frozen"}.get(value, value) if isinstance(value, bool) else value


def _tower_layers(tower: nn.Module) -> nn.ModuleList:
    """A vision tower's layer list: the longest ModuleList in it (a ViT's encoder layers, a conv tower's stages)."""
    lists = [m for m in tower.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"model.vision.train_top_layers: {type(tower.model).__name__} has no layer list to choose from")
    return max(lists, key=len)  # (the first of the longest: a conv tower's stages before a stage's blocks)


def _train_top_layers(model: nn.Module, params: list[tuple[str, nn.Parameter]], layers: nn.ModuleList, n: int,
                      field: str) -> None:
    """Of one component's `params`, only the top `n` of `layers` and what comes after them in the model (the final
    norm, an untied head) keep training; the rest (embeddings, lower layers) is frozen. A head tied to the input
    embeddings is one parameter with them, and stays frozen with them."""
    if n > len(layers):
        raise ValueError(f"{field}: {n}, but the model has {len(layers)} layers there; give at most {len(layers)}")
    top = {id(p) for layer in list(layers)[len(layers) - n:] for p in layer.parameters()}
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    order = {id(p): i for i, (_, p) in enumerate(model.named_parameters())}
    last = max(order[i] for i in in_layers if i in order)
    for _, p in params:
        if p.requires_grad and id(p) not in top and (id(p) in in_layers or order[id(p)] < last):
            p.requires_grad_(False)


@dataclass
class BuildOptions:
    """What a fine-tuning method needs decided while the model is built, not after (a callback's `on_build` fills
    it; this module reads it and imports no callback)."""

    lm_quantization: dict[str, Any] | None = None
    """transformers.BitsAndBytesConfig arguments: the LM is loaded from `model.lm.path` with its linear layers
    quantized as they load."""

    build_whole: bool = False
    """True: never partition the model at birth (ZeRO-3's zero.Init), because a callback changes layers in
    `on_model_built` that must be whole then (qlora quantizing the vision tower); DeepSpeed partitions it when it
    wraps the model."""
    checkpoint_frozen: bool = True
    """False (the fine-tuning methods): checkpoints hold only what trains. The frozen weights come back from where
    they came from (`model.init_from`, `model.lm.path`, the seed) when the run resumes or is reloaded; a fingerprint
    saved with each checkpoint checks that they are the same."""

    @property
    def sharded_at_birth(self) -> bool:
        """Whether the model may be built partitioned (ZeRO-3's zero.Init). A quantized LM may not: transformers
        quantizes while it loads full tensors, so the model is built whole on each rank (the LM in 4 bits) and
        partitioned when DeepSpeed wraps it."""
        return self.lm_quantization is None and not self.build_whole


LM_DROPOUT_KEYS = ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                   "hidden_dropout_prob", "attention_probs_dropout_prob", "activation_dropout", "dropout")
"""The dropout probabilities `model.lm.dropout` sets, where the LM's Hugging Face config has them (a Llama has
`attention_dropout` only: its MLP has no dropout)."""


def lm_dropout_overrides(config: Any, p: float) -> dict[str, float]:
    """{key: p} for every dropout key of LM_DROPOUT_KEYS that `config` has ({} when p is 0: the config's own)."""
    return {k: p for k in LM_DROPOUT_KEYS if p > 0 and hasattr(config, k)} if p else {}


def build_lm(cfg: ModelConfig, vocab_size: int | None, meta: bool = False,
             quantization: dict[str, Any] | None = None) -> PreTrainedModel:
    """LlamaForCausalLM from cfg.lm.config (random weights) or any causal LM from the local cfg.lm.path.

    `vocab_size` (the tokenizer's) overrides the config's; a loaded LM with fewer embeddings is resized up.
    `quantization`: BitsAndBytesConfig arguments; the LM then loads from cfg.lm.path quantized.
    """
    device = torch.device("meta") if meta else contextlib.nullcontext()
    if quantization is not None and not meta:
        if not cfg.lm.path:
            raise ValueError("a quantized LM (qlora) is loaded from weights: set model.lm.path to a save_pretrained "
                             "folder of the base LM")
        from transformers import BitsAndBytesConfig

        drop = lm_dropout_overrides(AutoConfig.from_pretrained(cfg.lm.path), cfg.lm.dropout)
        return AutoModelForCausalLM.from_pretrained(cfg.lm.path, quantization_config=BitsAndBytesConfig(**quantization),
                                                    dtype=quantization["bnb_4bit_compute_dtype"], **drop)
    if cfg.lm.path:
        if meta:
            config = AutoConfig.from_pretrained(cfg.lm.path)
            for k, v in lm_dropout_overrides(config, cfg.lm.dropout).items():
                setattr(config, k, v)
            if vocab_size is not None and vocab_size > config.vocab_size:
                config.vocab_size = vocab_size
            with device:
                return AutoModelForCausalLM.from_config(config)
        lm = AutoModelForCausalLM.from_pretrained(
            cfg.lm.path, **lm_dropout_overrides(AutoConfig.from_pretrained(cfg.lm.path), cfg.lm.dropout))
        if vocab_size is not None and vocab_size > lm.get_input_embeddings().num_embeddings:
            lm.resize_token_embeddings(vocab_size)
        return lm
    kwargs = dict(cfg.lm.config)
    if vocab_size is not None:
        kwargs["vocab_size"] = vocab_size
    kwargs.update(lm_dropout_overrides(LlamaConfig(), cfg.lm.dropout))
    with device:  # `_from_config`: the weights are initialised right under ZeRO-3 too (see vision.build_vision)
        return LlamaForCausalLM._from_config(LlamaConfig(**kwargs))


def build_model(cfg: ModelConfig, vocab_size: int | None = None, meta: bool = False,
                options: BuildOptions | None = None) -> MultimodalModel:
    """Build the multimodal model described by `cfg` (a resolved config: presets are applied by config.py).

    meta=True builds every parameter on the meta device from configs only (nothing is loaded): for sizing.
    """
    vision = build_vision_tower(cfg.vision, meta=meta)
    lm = build_lm(cfg, vocab_size, meta=meta, quantization=(options or BuildOptions()).lm_quantization)
    r, x = cfg.resampler, cfg.xattn
    with torch.device("meta") if meta else contextlib.nullcontext():
        resampler = PerceiverResampler(vision.hidden_size, r.depth, r.num_latents, r.heads, r.dim_head, r.ff_mult,
                                       r.dropout)
        apply_gated_xattn(lm, vision.hidden_size, x.every_n_layers, x.heads, x.dim_head, x.ff_mult, x.backend,
                          x.gate_init, x.dropout)
    if cfg.activation_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(lm, "activation_checkpointing_enable"):
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = MultimodalModel(vision, resampler, lm, media_mode=x.media_mode)
    apply_freeze_policy(model, cfg)
    return model
