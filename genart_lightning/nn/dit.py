"""Diffusion transformer (Peebles & Xie 2023, DiT) with PixArt-alpha's cross-attention to text tokens (Chen et al. 2024).

Patches of the input are tokens with a 2D sin-cos position embedding computed for the input's own height and
width (non-square latents and aspect buckets work without resizing a table). Time and the pooled caption
condition every block through adaLN-Zero (scale, shift and a gate per sub-layer, all starting at zero, so each
block starts as the identity); text tokens enter through an ungated cross-attention after self-attention.
Attention is torch's scaled_dot_product_attention (flash / memory-efficient kernels where the device has them).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from genart_lightning.nn.attention import Attention
from genart_lightning.nn.backbone import Backbone, timestep_embedding
from genart_lightning.nn.checkpointing import run_block

FREQUENCY_DIM = 256
"""Width of the sinusoidal timestep features before the embedding MLP (DiT's choice)."""


def sincos_position_embedding(height: int, width: int, dim: int, device: torch.device | None = None) -> Tensor:
    """[height * width, dim] fixed 2D embedding: half the channels encode the row, half the column (dim % 4 == 0)."""
    if dim % 4:
        raise ValueError(f"the 2D sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    freqs = 1.0 / 10_000 ** (torch.arange(quarter, device=device, dtype=torch.float64) / quarter)
    rows = torch.arange(height, device=device, dtype=torch.float64)[:, None] * freqs
    cols = torch.arange(width, device=device, dtype=torch.float64)[:, None] * freqs
    rows = torch.cat([rows.sin(), rows.cos()], dim=1)[:, None, :].expand(height, width, 2 * quarter)
    cols = torch.cat([cols.sin(), cols.cos()], dim=1)[None, :, :].expand(height, width, 2 * quarter)
    return torch.cat([rows, cols], dim=-1).reshape(height * width, dim).float()


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention, (ungated) cross-attention to text tokens, adaLN-Zero MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, cross_attention: bool) -> None:
        super().__init__()
        head_channels = dim // heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, None, head_channels)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6) if cross_attention else None
        self.cross_attn = Attention(dim, dim, head_channels) if cross_attention else None
        if self.cross_attn is not None:
            nn.init.zeros_(self.cross_attn.to_out.weight)  # text enters gradually, as PixArt initialises it
            nn.init.zeros_(self.cross_attn.to_out.bias)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.modulation[-1].weight)
        nn.init.zeros_(self.modulation[-1].bias)

    def forward(self, x: Tensor, c: Tensor, context: Tensor | None, mask: Tensor | None) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        if self.cross_attn is not None and context is not None:
            x = x + self.cross_attn(self.norm2(x), context, mask)
        return x + gate2[:, None] * self.mlp(modulate(self.norm3(x), shift2, scale2))


class DiT(nn.Module):
    """Predicts eps / v / x0 / velocity from a noisy input, its time and (optionally) text tokens and a pooled vector."""

    def __init__(
        self,
        in_channels: int = 4,
        patch_size: int = 2,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        context_dim: int | None = None,
        pooled_dim: int | None = None,
        out_channels: int | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"DiT hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.patch_size, self.hidden_size = patch_size, hidden_size
        self.out_channels = out_channels or in_channels
        self.gradient_checkpointing = gradient_checkpointing
        self.patch_embed = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.time_embed = nn.Sequential(nn.Linear(FREQUENCY_DIM, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.pooled_embed = nn.Linear(pooled_dim, hidden_size) if pooled_dim else None
        self.context_embed = (nn.Sequential(nn.Linear(context_dim, hidden_size), nn.GELU(approximate="tanh"),
                                            nn.Linear(hidden_size, hidden_size)) if context_dim else None)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, context_dim is not None) for _ in range(depth))
        self.final_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.final = nn.Linear(hidden_size, patch_size * patch_size * self.out_channels)
        for layer in (self.final_modulation[-1], self.final):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        pooled: Tensor | None = None,
    ) -> Tensor:
        """x [B, C, H, W] (H, W divisible by patch_size), t [B]; context [B, L, D], mask [B, L], pooled [B, E]."""
        b, _, height, width = x.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"DiT input {height}x{width} is not divisible by patch_size {p}")
        h, w = height // p, width // p
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = tokens + sincos_position_embedding(h, w, self.hidden_size, x.device).to(tokens.dtype)
        c = self.time_embed(timestep_embedding(t, FREQUENCY_DIM).to(tokens.dtype))
        if self.pooled_embed is not None and pooled is not None:
            c = c + self.pooled_embed(pooled.to(c.dtype))
        context = self.context_embed(context.to(c.dtype)) if self.context_embed is not None and context is not None else None
        for block in self.blocks:
            tokens = run_block(block, self.gradient_checkpointing, tokens, c, context, context_mask)
        shift, scale = self.final_modulation(c).chunk(2, dim=-1)
        out = self.final(modulate(self.final_norm(tokens), shift, scale))  # [B, h*w, p*p*C]
        out = out.reshape(b, h, w, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, self.out_channels, height, width)


class DiTBackbone(Backbone):
    """The DiT backbone (a transformer over image patches): width, depth, heads and patch size (DiT-S/2 is hidden
    384, depth 12, 6 heads, patch 2).

    It takes any diffused size that patch_size divides, e.g. `genart sample --height/--width` off the trained square:
    there is no position table to resize, the 2D sin-cos embedding is computed for the requested token grid (token
    indices as positions, not interpolated to the trained grid)."""

    name = "dit"
    lora_targets = ("to_q", "to_kv", "to_out")  # self- and cross-attention projections

    def __init__(
        self,
        patch_size: int = 2,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
    ) -> None:
        """
        Args:
            patch_size: side of the square patches that become tokens; (H / p) x (W / p) tokens, so a smaller
                one costs more and sees finer detail. The diffused size must be a multiple of it.
            hidden_size: token width (DiT-S 384, DiT-B 768); a multiple of num_heads and of 4.
            depth: number of transformer blocks.
            num_heads: attention heads per block (hidden_size / num_heads channels each).
            mlp_ratio: width of each block's MLP as a multiple of hidden_size.
        """
        self.patch_size, self.hidden_size, self.depth = patch_size, hidden_size, depth
        self.num_heads, self.mlp_ratio = num_heads, mlp_ratio

    def build(self, in_channels: int, context_dim: int | None, pooled_dim: int | None,
              gradient_checkpointing: bool = False) -> DiT:
        return DiT(in_channels=in_channels, patch_size=self.patch_size, hidden_size=self.hidden_size, depth=self.depth,
                   num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, context_dim=context_dim, pooled_dim=pooled_dim,
                   gradient_checkpointing=gradient_checkpointing)

    def size_multiple(self) -> int:
        return self.patch_size

    def size_rule(self) -> str:
        return f"cuts {self.patch_size}x{self.patch_size} patches (patch_size: use one that divides the size)"
