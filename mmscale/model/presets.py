"""Named model presets (`model.preset=...`), like torchtitan's model flavors.

Each preset is a function returning a fresh ModelConfig; config.py applies it under the YAML and command-line
values. The LM's `vocab_size` here is a placeholder: build_model sets it from the tokenizer.

    tiny         tests: a forward in milliseconds
    demo         CPU demo on the synthetic shapes data, a few million parameters, everything trained from scratch
    flamingo-3b  CLIP ViT-L/14 (224 px) + a ~1B Llama, cross-attention before every decoder layer
    flamingo-9b  CLIP ViT-L/14 (224 px) + a 7B Llama, cross-attention before every 4th decoder layer
"""

from __future__ import annotations

from typing import Callable

from mmscale.config import CrossAttentionConfig, LMConfig, ModelConfig, ResamplerConfig, VisionConfig

PRESETS: dict[str, Callable[[], ModelConfig]] = {}


def register_preset(name: str) -> Callable[[Callable[[], ModelConfig]], Callable[[], ModelConfig]]:
    def register(fn: Callable[[], ModelConfig]) -> Callable[[], ModelConfig]:
        if name in PRESETS:
            raise ValueError(f"model preset {name!r} is already registered (by {PRESETS[name].__qualname__})")
        PRESETS[name] = fn
        return fn

    return register


def _clip(hidden: int, layers: int, heads: int, intermediate: int, patch: int, image: int) -> VisionConfig:
    return VisionConfig(
        type="clip",
        config=dict(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=intermediate,
            patch_size=patch,
            image_size=image,
        ),
    )


def _llama(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, max_pos: int) -> LMConfig:
    return LMConfig(
        config=dict(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            intermediate_size=intermediate,
            max_position_embeddings=max_pos,
            vocab_size=32000,
        )
    )


@register_preset("tiny")
def tiny() -> ModelConfig:
    return ModelConfig(
        preset="tiny",
        vision=_clip(hidden=32, layers=2, heads=2, intermediate=64, patch=8, image=32),
        lm=_llama(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, max_pos=256),
        resampler=ResamplerConfig(num_latents=8, depth=1, heads=2, dim_head=16, ff_mult=2),
        xattn=CrossAttentionConfig(every_n_layers=1, heads=4, dim_head=16, ff_mult=2),
    )


@register_preset("demo")
def demo() -> ModelConfig:
    # No pretrained towers exist for the synthetic shapes, so every component trains from random init.
    return ModelConfig(
        preset="demo",
        # A small ResNet (basic blocks, 3 stages of one block, 0.3M parameters): its 4x4 map on 64 px images is 16
        # tokens of width 128. A ViT trained from scratch (CLIP, 8 px patches: the demo's tower until then) reads
        # the colours but leaves the shapes at chance (ln 4) even after 1,200 steps; so does a ConvNeXt of the same
        # widths after 400. With the ResNet, the demo's 1,000 steps name 95% of the objects in held-out images
        # (`python -m mmscale.evaluation.demo_objects --samples 1024`: shape words 0.08 nats, 6.0 shuffled).
        vision=VisionConfig(type="resnet", config=dict(embedding_size=32, hidden_sizes=[32, 64, 128], depths=[1, 1, 1],
                                                       layer_type="basic")),
        lm=_llama(hidden=128, layers=4, heads=4, kv_heads=4, intermediate=344, max_pos=512),
        resampler=ResamplerConfig(num_latents=16, depth=2, heads=4, dim_head=32, ff_mult=2),
        # Gates open at tanh(1) = 0.76: with no pretrained LM to protect, Flamingo's closed gates (0) only delay
        # the gradient to the visual side (colour loss 0.33 instead of 0.40 nats after 400 steps, ViT tower).
        xattn=CrossAttentionConfig(every_n_layers=1, heads=4, dim_head=32, ff_mult=2, gate_init=1.0),
        train_vision=True,
        train_lm=True,
    )


@register_preset("flamingo-3b")
def flamingo_3b() -> ModelConfig:
    return ModelConfig(
        preset="flamingo-3b",
        vision=_clip(hidden=1024, layers=24, heads=16, intermediate=4096, patch=14, image=224),
        lm=_llama(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, max_pos=2048),
        resampler=ResamplerConfig(num_latents=64, depth=6, heads=16, dim_head=64, ff_mult=4),
        xattn=CrossAttentionConfig(every_n_layers=1, heads=16, dim_head=128, ff_mult=4),
    )


@register_preset("flamingo-9b")
def flamingo_9b() -> ModelConfig:
    return ModelConfig(
        preset="flamingo-9b",
        vision=_clip(hidden=1024, layers=24, heads=16, intermediate=4096, patch=14, image=224),
        lm=_llama(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, max_pos=2048),
        resampler=ResamplerConfig(num_latents=64, depth=6, heads=16, dim_head=64, ff_mult=4),
        xattn=CrossAttentionConfig(every_n_layers=4, heads=32, dim_head=128, ff_mult=4),
    )
