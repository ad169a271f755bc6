"""What a medium is: a registered part that owns its tar members and their decoding, its tensor slots in the batch,
its encoder, its placeholder token and what it hands the shared resampler.

Every medium's items are laid out in one sequence of media slots per sample, in the order their placeholders
appear in the text (`collate`), so the cross-attention's key ranges (`media_index`, mmscale.kernels) cover images,
videos and audio clips alike:

    text      "<image> a red circle ... <video> it moves left <audio> three beeps"
    slots     [image 0][video 0][audio 0][padding ...]        max slots = sum of every medium's max_items
    keys      n latents per slot, slot after slot              (n = model.resampler.num_latents)

A batch holds, per medium, `{values}` (B, max_items, *item_shape) with zeros in empty slots, `{mask}` (B,
max_items) True on real items and, when several media are configured, `{slot}` (B, max_items) int64, the media
slot of each item (-1 on padding). Images keep their historical names (`pixel_values`, `image_mask`).

The model (mmscale.model.multimodal) encodes each medium's real items with its encoder (`Medium.build_encoder`'s
module, held in `model.media`; images use the model's own vision tower), resamples them with the one Perceiver
resampler, and places the tokens at their slots. A medium absent from a rank's batch still runs its encoder and the
resampler once on a padded item whose tokens are multiplied by zero: under ZeRO-3 every rank calls every module
in every step, whatever its batch holds, and nothing hangs.

Adding a medium is one file that subclasses `Medium` and registers it (`@register_medium`), imported in
mmscale/media/__init__.py; the trainer does not change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

MEDIA: dict[str, type[Medium]] = {}
"""Registered media (besides images, which every model has), by name: the keys of the config's `media` section."""


def register_medium(cls: type[Medium]) -> type[Medium]:
    if not cls.name or cls.name in MEDIA or cls.name == "image":
        raise ValueError(f"medium {cls.name!r}: names must be unique, non-empty and not 'image'")
    MEDIA[cls.name] = cls
    return cls


@dataclasses.dataclass
class MediumSection:
    """The config section every medium has (`media.NAME`); a medium's own section subclasses it."""

    max_items: int = 1
    """Slots for this medium per sample (the collate pads with masked slots)."""


class Medium:
    """One medium, bound to its config section and the data config (data side: `present`, `decode`, `item_shape`)
    and building its encoder (model side: `build_encoder`). Instances are what the data pipeline carries into its
    workers (picklable: the section, the data config and the placeholder's id)."""

    name: ClassVar[str] = ""
    token: ClassVar[str] = ""
    """The placeholder token that marks where an item sits in the text, e.g. `<video>` (a tokenizer piece)."""
    sample_key: ClassVar[str] = ""
    """Where a decoded sample keeps this medium's items (a list of tensors of `item_shape`)."""
    members: ClassVar[str] = ""
    """The tar members it reads, for messages (e.g. `frame_NNN.png or mp4`)."""
    Section: ClassVar[type[MediumSection]] = MediumSection

    def __init__(self, section: MediumSection, data: Any, token_id: int = -1):
        self.section, self.data, self.token_id = section, data, token_id

    # ------------------------------------------------------------------------------------------- batch layout

    @property
    def max_items(self) -> int:
        return self.section.max_items

    @property
    def values_key(self) -> str:
        return f"{self.name}_values"

    @property
    def mask_key(self) -> str:
        return f"{self.name}_mask"

    @property
    def slot_key(self) -> str:
        return f"{self.name}_slot"

    def item_shape(self) -> tuple[int, ...]:
        """The shape of one item's tensor (static: every batch is shaped the same)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- data side

    @classmethod
    def claims(cls, member: str) -> bool:
        """Whether tar member `member` (its extension, as webdataset names it) belongs to this medium."""
        raise NotImplementedError

    def present(self, raw: Mapping[str, Any]) -> bool:
        return any(self.claims(k) for k in raw if not k.startswith("__"))

    def decode(self, raw: Mapping[str, Any], where: str) -> list[torch.Tensor]:
        """The sample's items of this medium, each of `item_shape` (float32); raises SampleError (skipped, counted)
        for bytes it cannot use. Called only when `present(raw)`."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- model side

    @classmethod
    def build_encoder(cls, section: MediumSection, model_cfg: Any, media_width: int) -> nn.Module:
        """The module that turns a batch of items (R, *item_shape) into resampler inputs (R, P, media_width): its
        `forward(values, vision)` gets the model's vision tower too (video encodes frames with it). Built under
        zero.Init when the engine builds (sharded at birth)."""
        raise NotImplementedError

    @classmethod
    def config_problems(cls, section: MediumSection, cfg: Any) -> list[str]:
        """What is wrong with this section given the whole JobConfig `cfg` (each: field, value, fix)."""
        return []

    @classmethod
    def train_encoder(cls, section: MediumSection) -> bool:
        """Whether the encoder's parameters train."""
        return True


def media_sections(cfg: Any) -> tuple[dict[str, MediumSection], list[str]]:
    """Each configured medium's section, built from `cfg.media` (unknown names and keys, wrong types reported)."""
    from mmscale.config import registered_sections

    entries = dict(getattr(cfg, "media", None) or {})
    problems = []
    if "image" in entries:
        del entries["image"]
        problems.append("media.image: images are every model's own medium, configured by data.image_size, "
                        "data.max_images and model.vision; remove media.image")
    sections, found = registered_sections(entries, MEDIA, "media", "medium", "{max_items: 1}")
    for name, section in sections.items():
        if isinstance(section.max_items, int) and section.max_items < 1:
            found.append(f"media.{name}.max_items: {section.max_items} must be >= 1 (remove media.{name} to have none)")
    return sections, problems + found


def media_problems(cfg: Any) -> list[str]:
    """Every problem with the config's `media` section (names, keys, and what each medium needs of the rest)."""
    sections, problems = media_sections(cfg)
    for name, s in sections.items():
        problems += [f"media.{name}: {p}" for p in MEDIA[name].config_problems(s, cfg)]
    return problems


def bind_media(cfg: Any, tokenizer: Any) -> list[Medium]:
    """The configured media (registration order), bound to their sections, `cfg.data` and their placeholders' ids in
    `tokenizer`: what the data pipeline decodes and collates. Raises ValueError naming the fix when the tokenizer
    has no piece for a placeholder."""
    sections, problems = media_sections(cfg)
    if problems:
        raise ValueError("; ".join(problems))
    bound = []
    for name in MEDIA:
        if name in sections:
            cls = MEDIA[name]
            bound.append(cls(sections[name], cfg.data, placeholder_id(tokenizer, cls.token, f"media.{name}")))
    return bound


def placeholder_id(tokenizer: Any, token: str, where: str) -> int:
    """The id of `token` in `tokenizer`; ValueError with the fix when it has no such piece."""
    i = tokenizer.piece_id(token)
    if i is None:
        raise ValueError(
            f"{where}: the tokenizer {tokenizer.source!r} has no {token!r} token, the placeholder of this medium. "
            f"Train one with it (python -m mmscale.data.tokenizer ... --extra-symbols '{token}', or "
            f"train_sentencepiece(..., extra_symbols=[{token!r}])), or add it to a Hugging Face tokenizer "
            f"(tokenizer.add_special_tokens({{'additional_special_tokens': [{token!r}]}}); save_pretrained)")
    return i


def media_input_keys() -> tuple[str, ...]:
    """Every batch key a registered medium may fill, besides the images' (what the trainer passes to the model)."""
    keys: list[str] = ["image_slot"]
    for cls in MEDIA.values():
        keys += [f"{cls.name}_values", f"{cls.name}_mask", f"{cls.name}_slot"]
    return tuple(keys)
