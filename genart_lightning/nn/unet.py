"""U-Net for diffusion (ADM layout, Dhariwal & Nichol 2021), text-conditional through LDM's cross-attention."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genart_lightning.nn.attention import SelfAttention2d, SpatialTransformer, group_norm
from genart_lightning.nn.backbone import Backbone, timestep_embedding
from genart_lightning.nn.checkpointing import run_block

ATTENTION_BLOCKS = ("transformer", "plain")
"""U-Net attention block kinds: latent diffusion's transformer block (self + cross attention + MLP), DDPM's plain one."""


def check_attention_block(kind: str, context_dim: int | None) -> str:
    """Return `kind` if it is a known attention block that can take the given text tokens, else fail naming the fix."""
    if kind not in ATTENTION_BLOCKS:
        raise ValueError(f"unknown attention_block {kind!r}; choose one of {', '.join(ATTENTION_BLOCKS)}")
    if kind == "plain" and context_dim:
        raise ValueError("attention_block='plain' has no cross-attention for text tokens (context_dim is set); use 'transformer'")
    return kind


class ResBlock(nn.Module):
    """Two 3x3 convs with the time(+text) embedding as a per-channel scale and shift in between."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels))
        self.out_norm = group_norm(out_channels)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(out_channels, out_channels, 3, padding=1))
        nn.init.zeros_(self.out_layers[-1].weight)  # the block starts as its skip path
        nn.init.zeros_(self.out_layers[-1].bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.out_norm(h) * (1 + scale) + shift
        return self.skip(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Strided 3x3 conv halving the resolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour doubling then a 3x3 conv (no checkerboard artefacts of transposed convs)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Layer(nn.ModuleList):
    """A few blocks run in order, each given what it needs (embedding for ResBlocks, text for attention)."""

    def forward(self, h: Tensor, emb: Tensor, context: Tensor | None, mask: Tensor | None) -> Tensor:
        for block in self:
            if isinstance(block, ResBlock):
                h = block(h, emb)
            elif isinstance(block, SpatialTransformer):
                h = block(h, context, mask)
            else:
                h = block(h)
        return h


def with_coordinates(x: Tensor) -> Tensor:
    """x with two more channels, the column and row of each pixel from -1 to 1 (CoordConv, Liu et al. 2018):
    convolutions are translation-equivariant and learn where they are only from the zero padding at the borders."""
    b, _, h, w = x.shape
    rows = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)[:, None].expand(h, w)
    cols = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)[None, :].expand(h, w)
    return torch.cat([x, torch.stack([cols, rows]).expand(b, 2, h, w)], dim=1)


class UNet(nn.Module):
    """Predicts eps / v / x0 from a noisy image, its timestep and (optionally) text tokens and a pooled text vector.

    Level i of `channel_mult` runs at 1/2**i of the input resolution with base_channels * mult channels;
    `attention_levels` lists the levels that get attention; the middle block always has it.
    `attention_block` picks its kind: "transformer" (self-attention, cross-attention to text when
    `context_dim` is set, MLP) or "plain" (DDPM's self-attention block, no text tokens). `coordinates` feeds each
    pixel's column and row to the first conv (`with_coordinates`).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int | None = None,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_levels: Sequence[int] = (1, 2),
        head_channels: int = 32,
        attention_block: str = "transformer",
        context_dim: int | None = None,
        pooled_dim: int | None = None,
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
        coordinates: bool = False,
    ) -> None:
        super().__init__()
        bad = [lv for lv in attention_levels if not 0 <= lv < len(channel_mult)]
        if bad:
            raise ValueError(f"attention_levels {bad} outside 0..{len(channel_mult) - 1} (one per channel_mult entry)")
        check_attention_block(attention_block, context_dim)
        self.gradient_checkpointing = gradient_checkpointing
        self.num_levels = len(channel_mult)
        emb_dim = 4 * base_channels
        self.time_embed = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.pooled_embed = nn.Linear(pooled_dim, emb_dim) if pooled_dim else None

        def attn(ch: int) -> nn.Module:
            if attention_block == "plain":
                return SelfAttention2d(ch, head_channels)
            return SpatialTransformer(ch, context_dim, head_channels)

        ch = base_channels
        self.coordinates = coordinates
        self.input_conv = nn.Conv2d(in_channels + (2 if coordinates else 0), ch, 3, padding=1)
        skips, self.down = [ch], nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                blocks = [ResBlock(ch, base_channels * mult, emb_dim, dropout)]
                ch = base_channels * mult
                blocks += [attn(ch)] if level in attention_levels else []
                self.down.append(Layer(blocks))
                skips.append(ch)
            if level < self.num_levels - 1:
                self.down.append(Layer([Downsample(ch)]))
                skips.append(ch)
        self.middle = Layer([ResBlock(ch, ch, emb_dim, dropout), attn(ch), ResBlock(ch, ch, emb_dim, dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                blocks = [ResBlock(ch + skips.pop(), base_channels * mult, emb_dim, dropout)]
                ch = base_channels * mult
                blocks += [attn(ch)] if level in attention_levels else []
                blocks += [Upsample(ch)] if level > 0 and i == num_res_blocks else []
                self.up.append(Layer(blocks))
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, out_channels or in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)
        self.base_channels = base_channels

    def _run(self, layer: Layer, h: Tensor, emb: Tensor, context: Tensor | None, mask: Tensor | None) -> Tensor:
        return run_block(layer, self.gradient_checkpointing, h, emb, context, mask)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        pooled: Tensor | None = None,
    ) -> Tensor:
        """x [B, C, H, W] (H, W divisible by 2**(levels-1)), t [B]; context [B, L, D], mask [B, L], pooled [B, E]."""
        if x.shape[-1] % 2 ** (self.num_levels - 1) or x.shape[-2] % 2 ** (self.num_levels - 1):
            raise ValueError(f"U-Net input {tuple(x.shape[-2:])} must be divisible by {2 ** (self.num_levels - 1)}")
        emb = self.time_embed(timestep_embedding(t, self.base_channels).to(x.dtype))
        if self.pooled_embed is not None and pooled is not None:
            emb = emb + self.pooled_embed(pooled.to(emb.dtype))
        h = self.input_conv(with_coordinates(x) if self.coordinates else x)
        hs = [h]
        for layer in self.down:
            h = self._run(layer, h, emb, context, context_mask)
            hs.append(h)
        h = self._run(self.middle, h, emb, context, context_mask)
        for layer in self.up:
            h = self._run(layer, torch.cat([h, hs.pop()], dim=1), emb, context, context_mask)
        return self.out(h)


class UNetBackbone(Backbone):
    """The U-Net backbone: its widths, depth and attention levels. `attention_block` None picks by conditioning: "transformer" (self + cross
    attention + MLP, as in latent diffusion) with a text encoder, "plain" (DDPM's block) without one."""

    name = "unet"
    lora_targets = ("to_q", "to_kv", "to_out", "qkv", "proj_out")  # attention projections of both block kinds

    def __init__(
        self,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_levels: Sequence[int] = (1, 2),
        head_channels: int = 32,
        attention_block: str | None = None,
        dropout: float = 0.0,
        coordinates: bool = False,
    ) -> None:
        """
        Args:
            base_channels: width of the first level (level i has base_channels x channel_mult[i]); the main
                lever on the network's size, cost growing about with its square.
            channel_mult: width multiplier per level; each level after the first halves the resolution, so the
                diffused size must be a multiple of 2 ** (len - 1).
            num_res_blocks: residual blocks per level on the way down (one more on the way up).
            attention_levels: levels (indices into channel_mult) with attention after every residual block;
                the middle block always has it. Attention at high resolution costs the most.
            head_channels: channels per attention head (a block of width w has w / head_channels heads).
            attention_block: "transformer" (self-attention, cross-attention to text tokens, MLP) or "plain"
                (DDPM's self-attention, no text tokens); None: transformer when the backbone reads text
                tokens, else plain.
            dropout: dropout inside the residual blocks; for small datasets, where the model starts to
                memorise.
            coordinates: give the first conv each pixel's column and row (-1 to 1 across the picture, whatever
                its size) as two more input channels; without them the convs learn where they are only from the
                borders, so a place a prompt names ("on the left") is learned later (32px shapes, 1,000 steps:
                position 0.58 with, 0.20 without; 1.00 either way at 3,000: benchmarks/QUALITY.md).
        """
        self.base_channels, self.channel_mult, self.num_res_blocks = base_channels, list(channel_mult), num_res_blocks
        self.attention_levels, self.head_channels = list(attention_levels), head_channels
        self.attention_block, self.dropout, self.coordinates = attention_block, dropout, coordinates

    def build(self, in_channels: int, context_dim: int | None, pooled_dim: int | None,
              gradient_checkpointing: bool = False) -> UNet:
        # recorded resolved, so a checkpoint rebuilds the same net whatever the default becomes
        self.attention_block = self.attention_block or ("transformer" if context_dim else "plain")
        return UNet(in_channels=in_channels, base_channels=self.base_channels, channel_mult=tuple(self.channel_mult),
                    num_res_blocks=self.num_res_blocks, attention_levels=tuple(self.attention_levels),
                    head_channels=self.head_channels, attention_block=self.attention_block, context_dim=context_dim,
                    pooled_dim=pooled_dim, dropout=self.dropout, gradient_checkpointing=gradient_checkpointing,
                    coordinates=self.coordinates)

    def size_multiple(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)  # each level after the first halves the input

    def size_rule(self) -> str:
        return (f"halves its input {len(self.channel_mult) - 1} times (channel_mult {self.channel_mult}: change it or "
                "image_size)")
