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
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from mmscale.config import ModelConfig
from mmscale.kernels import build_media_key_range
from mmscale.model.resampler import PerceiverResampler
from mmscale.model.vision import VisionTower, build_vision_tower
from mmscale.model.xattn import GatedCrossAttentionBlock, XAttnDecoderLayer, apply_gated_xattn

IGNORE_INDEX = -100
COMPONENTS = ("vision", "resampler", "lm", "xattn", "head")


@dataclass
class MultimodalOutput(ModelOutput):
    # a ModelOutput (an ordered dict) so that ZeRO-3's module hooks can see the tensors inside it
    logits: torch.Tensor | None = None
    """(B, L, V) next-token logits."""
    loss_sum: torch.Tensor | None = None
    """fp32 scalar: SUM of next-token cross-entropy over the positions where labels[:, 1:] != -100."""
    num_tokens: torch.Tensor | None = None
    """int64 scalar: how many positions `loss_sum` sums over."""
    loss: torch.Tensor | None = None
    """loss_sum / max(num_tokens, 1): the local mean, for convenience. Training normalises by the global count."""
    class_logits: torch.Tensor | None = None
    """(B, num_classes) fp32, with a classification head (inactive classes at the dtype's minimum)."""
    cls_loss_sum: torch.Tensor | None = None
    """fp32 scalar: SUM of the classification cross-entropy over the samples with a label (class_labels given)."""
    cls_num: torch.Tensor | None = None
    """int64 scalar: how many samples have a label."""
    cls_correct: torch.Tensor | None = None
    """int64 scalar: how many of them the head gets right."""
    token_loss: torch.Tensor | None = None
    """(B, L-1) fp32 cross-entropy of predicting labels[:, t+1] at position t, 0 where ignored
    (only with return_token_loss=True)."""


class MultimodalModel(nn.Module):
    def __init__(
        self,
        vision: VisionTower,
        resampler: PerceiverResampler,
        lm: PreTrainedModel,
        media_mode: str = "previous",
        num_classes: int = 0,
    ):
        super().__init__()
        if media_mode not in ("previous", "all"):
            raise ValueError(f"media_mode: {media_mode!r} is not one of 'previous', 'all'")
        self.classifier = nn.Linear(lm.config.hidden_size, num_classes) if num_classes > 0 else None
        """Classification head on the pooled features: the LM's last hidden states (after its final norm) averaged
        over the attended positions."""
        if num_classes > 0:
            # class-incremental learning: logits of classes not (yet) active are masked out
            self.register_buffer("active_classes", torch.ones(num_classes, dtype=torch.bool))
        self.vision = vision
        self.resampler = resampler
        self.lm = lm
        self.media_mode = media_mode
        self.prompt: nn.Module | None = None
        """Optional (prompt tuning): a module mapping the batch size to (B, k, D) embeddings put before the text's.
        The k positions see no image and are dropped from the logits: outputs line up with `input_ids`."""

    # --------------------------------------------------------------------------------------------- forward

    def xattn_layers(self) -> list[XAttnDecoderLayer]:
        """The decoder-layer wrappers inside `lm` (looked up each time: a transform of `lm` may move them)."""
        return [m for m in self.lm.modules() if isinstance(m, XAttnDecoderLayer)]

    def xattn_blocks(self) -> list[GatedCrossAttentionBlock]:
        return [layer.xattn for layer in self.xattn_layers()]

    @property
    def vision_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.vision.parameters())

    def encode_media(self, pixel_values: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, M, 3, H, W) -> visual tokens (B, M*n, Dv), image after image; the shape is static whatever the mask.

        image_mask (B, M) bool: only the slots it marks real go through the vision tower and the resampler; the
        tokens of the other (padded) slots are zeros. None: every slot is encoded. A batch without a real image
        still runs both modules once, on one padded slot whose tokens are multiplied by zero: under ZeRO-3 every
        rank must call each module's forward (its parameters are gathered in a collective) and get a gradient for
        each parameter, whatever its batch holds. A frozen tower runs under no_grad.
        """
        B, M = pixel_values.shape[:2]
        flat = pixel_values.flatten(0, 1)  # (B*M, 3, H, W)
        real = None
        if image_mask is not None:
            if image_mask.shape != (B, M):
                raise ValueError(f"encode_media: image_mask {tuple(image_mask.shape)} does not match pixel_values "
                                 f"{tuple(pixel_values.shape)}; want (B, M) = {(B, M)}")
            real = image_mask.flatten().nonzero().squeeze(1)  # note: a CPU-GPU sync point (a data-dependent size)
        keep = None
        if real is not None and real.numel() == 0:
            real, keep = real.new_zeros(1), 0.0  # slot 0 stands in; its tokens are zeroed below
        with torch.no_grad() if self.vision_frozen else contextlib.nullcontext():
            feats = self.vision.encode_images(flat if real is None else flat[real])  # (R, P, Dv)
        tokens = self.resampler(feats)  # (R, n, Dv)
        n, dv = tokens.shape[1:]
        if real is None:
            return tokens.reshape(B, M * n, dv)
        if keep is not None:
            tokens = tokens * keep  # the graph still reaches every parameter: all-zero gradients, never missing ones
        out = tokens.new_zeros(B * M, n, dv).index_copy(0, real, tokens)  # gradients flow back to the real slots
        return out.reshape(B, M * n, dv)

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
    ) -> MultimodalOutput:
        """pixel_values (B, M, 3, H, W) float; image_mask (B, M) bool (real slots first, padding after);
        input_ids, attention_mask, media_index, labels (B, L) int64; media_index[b, t] = latest image at or
        before token t, -1 before the first image."""
        if pixel_values.shape[:2] != image_mask.shape or media_index.shape != input_ids.shape:
            raise ValueError(
                f"batch shapes disagree: pixel_values {tuple(pixel_values.shape)} vs image_mask"
                f" {tuple(image_mask.shape)} (want (B, M, 3, H, W) and (B, M)); media_index {tuple(media_index.shape)} vs input_ids"
                f" {tuple(input_ids.shape)} (want both (B, L))"
            )
        media = self.encode_media(pixel_values, image_mask)
        n = self.resampler.num_latents
        kv_lens = image_mask.sum(dim=1) * n  # (B,) assumes real images fill the first slots
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
        for layer in self.xattn_layers():
            layer.condition(media, key_range, kv_lens)
        want_features = self.classifier is not None
        lm_out = self.lm(**lm_inputs, attention_mask=attention_mask, use_cache=False,
                         output_hidden_states=want_features)
        logits = lm_out.logits[:, k:]
        attention_mask = attention_mask[:, k:]
        cls = self._classify(lm_out.hidden_states[-1][:, k:], attention_mask, class_labels) if want_features else {}
        if labels is None:
            return MultimodalOutput(logits=logits, **cls)
        # predict labels[:, t+1] from position t; fp32 whatever the logits' dtype
        target = labels[:, 1:]
        token_loss = F.cross_entropy(
            logits[:, :-1].float().flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        ).view(target.shape)
        loss_sum = token_loss.sum()
        num_tokens = (target != IGNORE_INDEX).sum()
        return MultimodalOutput(
            logits=logits,
            loss_sum=loss_sum,
            num_tokens=num_tokens,
            loss=loss_sum / num_tokens.clamp(min=1),
            token_loss=token_loss if return_token_loss else None,
            **cls,
        )

    def _classify(self, last: torch.Tensor, attention_mask: torch.Tensor,
                  class_labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        mask = attention_mask.unsqueeze(-1).to(last.dtype)
        pooled = (last * mask).sum(1) / mask.sum(1).clamp(min=1)
        class_logits = self.classifier(pooled.to(self.classifier.weight.dtype)).float()
        class_logits = class_logits.masked_fill(~self.active_classes, torch.finfo(class_logits.dtype).min)
        if class_labels is None:
            return {"class_logits": class_logits}
        valid = class_labels != IGNORE_INDEX
        cls_loss_sum = F.cross_entropy(class_logits, class_labels, ignore_index=IGNORE_INDEX, reduction="sum")
        return {"class_logits": class_logits, "cls_loss_sum": cls_loss_sum, "cls_num": valid.sum(),
                "cls_correct": ((class_logits.argmax(-1) == class_labels) & valid).sum()}

    # --------------------------------------------------------------------------------------------- accounting

    def component_params(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Named parameters grouped by component: vision, resampler, lm (the original LM weights), xattn."""
        xattn_ids = {id(p) for block in self.xattn_blocks() for p in block.parameters()}
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {c: [] for c in COMPONENTS}
        for name, p in self.named_parameters():
            top = name.split(".", 1)[0]
            if top == "prompt":  # prompt tuning's soft tokens: counted with the LM they feed
                groups["lm"].append((name, p))
            elif top == "classifier":
                groups["head"].append((name, p))
            elif top == "lm":
                groups["xattn" if id(p) in xattn_ids else "lm"].append((name, p))
            else:
                groups[top].append((name, p))
        return groups

    def param_counts(self) -> dict:
        """{"total", "trainable", "by_component": {vision, resampler, lm, xattn}}. Works on meta tensors, on
        ZeRO-3 partitioned parameters (their full size is `ds_numel`; `numel()` is 0 locally) and on 4-bit weights
        (counted by the shape they quantize, not their packed storage)."""
        by_component, total, trainable = {}, 0, 0
        for comp, params in self.component_params().items():
            if comp == "head" and not params:  # no classification head
                continue
            count = 0
            for _, p in params:
                quant = getattr(p, "quant_state", None)  # 4-bit weights: several packed into one stored element
                numel = quant.shape.numel() if quant is not None else getattr(p, "ds_numel", p.numel())
                count += numel
                trainable += numel if p.requires_grad else 0
            by_component[comp] = count
            total += count
        return {"total": total, "trainable": trainable, "by_component": by_component}


def apply_freeze_policy(model: MultimodalModel, cfg: ModelConfig) -> None:
    """Set requires_grad per component from cfg.train_vision / train_resampler / train_lm / train_xattn."""
    flags = {
        "vision": cfg.train_vision,
        "resampler": cfg.train_resampler,
        "lm": cfg.train_lm,
        "xattn": cfg.train_xattn,
        "head": True,  # new with the model: it always trains
    }
    for comp, params in model.component_params().items():
        for _, p in params:
            p.requires_grad_(flags[comp])


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

        return AutoModelForCausalLM.from_pretrained(cfg.lm.path, quantization_config=BitsAndBytesConfig(**quantization),
                                                    dtype=quantization["bnb_4bit_compute_dtype"])
    if cfg.lm.path:
        if meta:
            config = AutoConfig.from_pretrained(cfg.lm.path)
            if vocab_size is not None and vocab_size > config.vocab_size:
                config.vocab_size = vocab_size
            with device:
                return AutoModelForCausalLM.from_config(config)
        lm = AutoModelForCausalLM.from_pretrained(cfg.lm.path)
        if vocab_size is not None and vocab_size > lm.get_input_embeddings().num_embeddings:
            lm.resize_token_embeddings(vocab_size)
        return lm
    kwargs = dict(cfg.lm.config)
    if vocab_size is not None:
        kwargs["vocab_size"] = vocab_size
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
        resampler = PerceiverResampler(vision.hidden_size, r.depth, r.num_latents, r.heads, r.dim_head, r.ff_mult)
        apply_gated_xattn(lm, vision.hidden_size, x.every_n_layers, x.heads, x.dim_head, x.ff_mult, x.backend,
                          x.gate_init)
    if cfg.activation_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(lm, "activation_checkpointing_enable"):
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = MultimodalModel(vision, resampler, lm, media_mode=x.media_mode, num_classes=cfg.num_classes)
    apply_freeze_policy(model, cfg)
    return model
