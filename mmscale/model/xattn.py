"""Gated cross-attention (Flamingo, Alayrac et al. 2022, section 2.2) and the decoder-layer wrapper that inserts it.

    y = x + tanh(attn_gate) * CrossAttn(LN(x), visual)     # q from text, k/v from visual tokens
    y = y + tanh(ff_gate)   * FF(y)

Both gates start at 0, so at initialisation the wrapped language model computes exactly what it did before.
Which visual tokens each text token may see is a per-token key interval `key_range[b, t] = [lo, hi)` over the
visual tokens of sample b (laid out image after image); the masking is done by `mmscale.kernels.cross_attention`.

The wrappers hold their conditioning (visual tokens, key ranges) as plain attributes set by the parent model
before each language-model forward (OpenFlamingo-style), because the decoder's own forward has no argument to
carry it. It is overwritten on the next forward, never cleared mid-step, so a recompute under activation
checkpointing sees the same values.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmscale.kernels import cross_attention
from mmscale.model.resampler import feed_forward

_LAYER_LIST_NAMES = ("layers", "h", "blocks")


class GatedCrossAttentionBlock(nn.Module):
    def __init__(self, dim_text: int, dim_visual: int, heads: int, dim_head: int, ff_mult: int, backend: str = "auto",
                 gate_init: float = 0.0, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dim_head, self.backend = heads, dim_head, backend
        inner = heads * dim_head
        self.norm = nn.LayerNorm(dim_text)
        self.to_q = nn.Linear(dim_text, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim_text, bias=False)
        # shape (1,) rather than 0-d: partitioning tools handle 1-d tensors everywhere
        self.attn_gate = nn.Parameter(torch.full((1,), float(gate_init)))
        self.ff = feed_forward(dim_text, ff_mult, dropout)
        # on the attention's output, before its gate (off in eval mode); none at all when 0
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.ff_gate = nn.Parameter(torch.full((1,), float(gate_init)))

    def media_kv(self, media: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values (B, Lk, h, d) that `forward` computes from the visual tokens `media` (B, Lk, Dv).
        They depend on the visual tokens only, not on the text: a decoder generating token by token computes them
        once and passes the pair as `forward`'s `media` (mmscale.inference: the cross-attention's KV cache)."""
        k, v = self.to_kv(media if dtype is None else media.to(dtype)).chunk(2, dim=-1)
        return tuple(t.unflatten(-1, (self.heads, self.dim_head)) for t in (k, v))  # type: ignore[return-value]

    def forward(
        self, x: torch.Tensor, media: torch.Tensor | tuple[torch.Tensor, torch.Tensor], key_range: torch.Tensor,
        kv_lens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, L, Dt) text hidden states; media (B, Lk, Dv) visual tokens, or their (keys, values) from
        `media_kv`; key_range (B, L, 2) int32; kv_lens (B,) valid visual tokens per sample. Returns (B, L, Dt)."""
        B, L, _ = x.shape
        q = self.to_q(self.norm(x)).unflatten(-1, (self.heads, self.dim_head))  # (B, L, h, d)
        if isinstance(media, tuple):  # precomputed (inference)
            k, v = (t.to(x.dtype) for t in media)
        else:
            k, v = self.to_kv(media.to(x.dtype)).chunk(2, dim=-1)
            k, v = (t.unflatten(-1, (self.heads, self.dim_head)) for t in (k, v))  # (B, Lk, h, d)
        attn = cross_attention(q, k, v, key_range=key_range, kv_lens=kv_lens, backend=self.backend)
        x = x + self.attn_gate.tanh() * self.dropout(self.to_out(attn.reshape(B, L, -1)))
        return x + self.ff_gate.tanh() * self.ff(x)


class XAttnDecoderLayer(nn.Module):
    """Runs a gated cross-attention block on the hidden states, then the original decoder layer.

    All arguments are passed through and the original layer's return value (tensor or tuple) is returned as is.
    Without conditioning (`condition` never called, or called with None) it is the original layer.
    """

    def __init__(self, decoder_layer: nn.Module, xattn: GatedCrossAttentionBlock):
        super().__init__()
        self.xattn = xattn
        self.decoder_layer = decoder_layer
        self._conditioning: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None

    def condition(
        self, media: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None, key_range: torch.Tensor | None = None,
        kv_lens: torch.Tensor | None = None
    ) -> None:
        """media: the visual tokens (B, Lk, Dv), or their keys and values from `self.xattn.media_kv` (inference:
        computed once for all the generated tokens); key_range: (B, L, 2) for the L positions of the next forward."""
        self._conditioning = None if media is None else (media, key_range, kv_lens)

    def forward(self, *args, **kwargs):
        if self._conditioning is not None:
            media, key_range, kv_lens = self._conditioning
            if args:
                args = (self._cross_attend(args[0], media, key_range, kv_lens), *args[1:])
            else:
                kwargs["hidden_states"] = self._cross_attend(kwargs["hidden_states"], media, key_range, kv_lens)
        return self.decoder_layer(*args, **kwargs)

    def _cross_attend(self, x, media, key_range, kv_lens):
        # Follow the wrapped layer's activation checkpointing (Hugging Face sets `gradient_checkpointing` on it);
        # the conditioning is passed as checkpoint inputs so the recompute uses the very same tensors.
        if getattr(self.decoder_layer, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled():
            return checkpoint(self.xattn, x, media, key_range, kv_lens, use_reentrant=False)
        return self.xattn(x, media, key_range, kv_lens)

    def __getattr__(self, name: str):
        # Decoders read public attributes of their layers (e.g. `decoder_layer.attention_type`): forward those.
        # Private and `ds_` names are not forwarded: tools such as DeepSpeed ZeRO-3 keep per-module state under
        # them and test it with hasattr, which must not see the wrapped layer's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "decoder_layer" or name.startswith(("_", "ds_")):
                raise
            return getattr(self.decoder_layer, name)


def find_decoder_layers(lm: nn.Module) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of the first ModuleList named `layers`, `h` or `blocks` in `lm`."""
    for name, module in lm.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in _LAYER_LIST_NAMES:
            parent_name, _, attr = name.rpartition(".")
            return lm.get_submodule(parent_name), attr
    raise ValueError(
        f"{type(lm).__name__}: found no nn.ModuleList named one of {_LAYER_LIST_NAMES} holding the decoder layers"
    )


def apply_gated_xattn(
    lm: nn.Module,
    dim_visual: int,
    every_n_layers: int,
    heads: int,
    dim_head: int,
    ff_mult: int,
    backend: str = "auto",
    gate_init: float = 0.0,
    dropout: float = 0.0,
) -> list[XAttnDecoderLayer]:
    """Wrap decoder layers 0, N, 2N, ... of `lm` in place with new gated cross-attention blocks.

    Returns the wrappers, in layer order.
    """
    parent, attr = find_decoder_layers(lm)
    layers: nn.ModuleList = getattr(parent, attr)
    dim_text = lm.config.hidden_size
    wrappers = []
    for i in range(0, len(layers), every_n_layers):
        if isinstance(layers[i], XAttnDecoderLayer):
            raise ValueError(f"decoder layer {i} already has gated cross-attention")
        block = GatedCrossAttentionBlock(dim_text, dim_visual, heads, dim_head, ff_mult, backend, gate_init, dropout)
        layers[i] = XAttnDecoderLayer(layers[i], block)
        wrappers.append(layers[i])
    return wrappers
