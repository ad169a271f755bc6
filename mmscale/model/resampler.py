"""Perceiver resampler (Flamingo, Alayrac et al. 2022, section 2.1 and appendix A.1.1).

A fixed number of learned latents cross-attend to the concatenation of an image's patch features and the
latents themselves, `depth` times (attention then feed-forward, both residual), followed by a final LayerNorm.
Any number of patches becomes `num_latents` visual tokens of the same width:

    (N, P, Dv) -> (N, num_latents, Dv)

One item at a time: a video's frames come flattened into its patches, with their time embeddings already added
(mmscale.media.video).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def feed_forward(dim: int, mult: int, dropout: float = 0.0) -> nn.Sequential:
    """Pre-norm MLP used by the resampler and the gated cross-attention blocks (Flamingo: no biases); `dropout` on
    its output (a last module, so the weights keep their names: `0` norm, `1` and `3` linear)."""
    layers = [nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(), nn.Linear(dim * mult, dim, bias=False)]
    return nn.Sequential(*layers, *([nn.Dropout(dropout)] if dropout > 0 else []))


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0):
        super().__init__()
        # on the output, before the residual add (off in eval mode); none at all when 0
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x (N, P, D) patch features, latents (N, n, D) -> (N, n, D)."""
        x = self.norm_media(x)
        latents = self.norm_latents(latents)
        N, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        # (N, T, h*d) -> (N, h, T, d)
        q, k, v = (t.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # every latent sees every key: no mask
        return self.dropout(self.to_out(out.transpose(1, 2).reshape(N, n, -1)))


class PerceiverResampler(nn.Module):
    def __init__(self, dim: int, depth: int, num_latents: int, heads: int, dim_head: int, ff_mult: int,
                 dropout: float = 0.0):
        super().__init__()
        self.num_latents = num_latents
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * 0.02)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads, dim_head, dropout), feed_forward(dim, ff_mult, dropout)])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, P, D) -> (N, num_latents, D)."""
        latents = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = latents + attn(x, latents)
            latents = latents + ff(latents)
        return self.norm(latents)
