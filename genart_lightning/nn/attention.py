"""Attention over feature maps: DDPM's plain self-attention block (Ho et al. 2020) and latent diffusion's
transformer block with cross-attention to text (Rombach et al. 2022)."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= `groups` that divides `channels` (small nets stay valid)."""
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class Attention(nn.Module):
    """Multi-head attention of x's tokens over `context` tokens (itself when no context is given)."""

    def __init__(self, dim: int, context_dim: int | None = None, head_channels: int = 32) -> None:
        super().__init__()
        self.heads = max(1, dim // head_channels)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim or dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """x [B, N, dim], context [B, L, context_dim], mask [B, L] bool (True = attend) -> [B, N, dim]."""
        context = x if context is None else context
        q = self.to_q(x)
        k, v = self.to_kv(context).chunk(2, dim=-1)
        q, k, v = (y.unflatten(-1, (self.heads, -1)).transpose(1, 2) for y in (q, k, v))
        attn_mask = mask[:, None, None, :] if mask is not None else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.to_out(out.transpose(1, 2).flatten(2))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to text (when configured) and an MLP, each residual."""

    def __init__(self, dim: int, context_dim: int | None, head_channels: int) -> None:
        super().__init__()
        self.norm1, self.self_attn = nn.LayerNorm(dim), Attention(dim, None, head_channels)
        self.cross_attn = Attention(dim, context_dim, head_channels) if context_dim else None
        self.norm2 = nn.LayerNorm(dim) if context_dim else None
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        x = x + self.self_attn(self.norm1(x))
        if self.cross_attn is not None and context is not None:
            x = x + self.cross_attn(self.norm2(x), context, mask)
        return x + self.mlp(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Feature map -> tokens -> TransformerBlock -> feature map, added to the input (output starts at zero)."""

    def __init__(self, channels: int, context_dim: int | None = None, head_channels: int = 32) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.block = TransformerBlock(channels, context_dim, head_channels)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)  # zero residual at init: the block starts as the identity
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        tokens = self.block(tokens, context, mask)
        return x + self.proj_out(tokens.transpose(1, 2).reshape(b, c, h, w))


class SelfAttention2d(nn.Module):
    """DDPM's attention block: GroupNorm, multi-head self-attention over all positions, output projection, residual.

    The same attention as a transformer block with under a third of its weights (no MLP, LayerNorms or 1x1
    in/out projections): the block of DDPM's and ADM's U-Nets and of LDM's unconditional models.
    """

    def __init__(self, channels: int, head_channels: int = 32) -> None:
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.norm = group_norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)  # zero residual at init: the block starts as the identity
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        # one matmul for q, k and v; the permute is a view, SDPA reads the strided heads directly
        q, k, v = self.qkv(tokens).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        out = self.proj_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        return x + out.transpose(1, 2).reshape(b, c, h, w)
