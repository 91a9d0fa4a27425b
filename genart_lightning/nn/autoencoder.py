"""Convolutional encoder/decoder of a VAE and a patch discriminator (the first stage of latent diffusion).

The layout follows the autoencoder of Rombach et al. 2022 ("High-Resolution Image Synthesis with
Latent Diffusion Models"): residual blocks with GroupNorm, stride-2 downsampling, nearest
upsampling; the patch discriminator follows Isola et al. 2017 ("pix2pix").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from genart_lightning.nn.checkpointing import run_block


def _norm(channels: int) -> nn.GroupNorm:
    # gcd keeps any channel count legal; groups of several channels keep colour means (instance norm would not)
    return nn.GroupNorm(math.gcd(channels, 8), channels)


class ResBlock(nn.Module):
    """Residual block; with `cond_dim` > 0 a conditioning vector scales and shifts the second norm (FiLM)."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int = 0) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.film = nn.Linear(cond_dim, 2 * out_channels) if cond_dim > 0 else None
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """x [B, C, H, W], cond [B, cond_dim] (required iff built with cond_dim)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.film is not None:
            scale, shift = self.film(cond)[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class Encoder(nn.Module):
    """Image [B, C, H, W] -> feature map [B, out_channels, H/f, W/f], f = 2 ** (len(channel_mults) - 1)."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 8,
        base_channels: int = 32,
        channel_mults: Sequence[int] = (1, 2, 4),
        num_res_blocks: int = 1,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        blocks: list[nn.Module] = []
        ch = base_channels
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, base_channels * mult))
                ch = base_channels * mult
            if level < len(channel_mults) - 1:
                blocks.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        blocks.append(ResBlock(ch, ch))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """Encode images in [-1, 1]."""
        h = self.conv_in(x)
        for block in self.blocks:
            h = run_block(block, self.gradient_checkpointing, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent map [B, in_channels, h, w] -> image [B, out_channels, h*f, w*f]; optionally FiLM-conditioned."""

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 3,
        base_channels: int = 32,
        channel_mults: Sequence[int] = (1, 2, 4),
        num_res_blocks: int = 1,
        cond_dim: int = 0,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        ch = base_channels * channel_mults[-1]
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.blocks = nn.ModuleList([ResBlock(ch, ch, cond_dim)])
        for level, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks):
                self.blocks.append(ResBlock(ch, base_channels * mult, cond_dim))
                ch = base_channels * mult
            if level > 0:
                self.blocks.append(nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)))
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        """Decode latents; the output is unbounded (the loss compares it with images in [-1, 1])."""
        h = self.conv_in(z)
        for block in self.blocks:
            h = run_block(block, self.gradient_checkpointing, h, *((cond,) if isinstance(block, ResBlock) else ()))
        return self.conv_out(F.silu(self.norm_out(h)))


class FlatBottleneck(nn.Module):
    """Fully connected bottleneck: encoder feature map <-> one latent vector per image."""

    def __init__(self, feature_shape: Sequence[int], latent_dim: int) -> None:
        super().__init__()
        self.feature_shape = tuple(feature_shape)
        features = math.prod(self.feature_shape)
        self.to_moments = nn.Linear(features, 2 * latent_dim)
        self.from_latent = nn.Linear(latent_dim, features)

    def moments(self, features: Tensor) -> Tensor:
        """Feature map [B, *feature_shape] -> mean and log-variance [B, 2 * latent_dim]."""
        return self.to_moments(features.flatten(1))

    def expand(self, z: Tensor) -> Tensor:
        """Latent vector [B, latent_dim] -> decoder input map [B, *feature_shape]."""
        return self.from_latent(z).view(z.shape[0], *self.feature_shape)


class PatchDiscriminator(nn.Module):
    """Image [B, C, H, W] -> one real/fake logit per overlapping patch [B, 1, H/2**n, W/2**n]."""

    def __init__(self, in_channels: int = 3, base_channels: int = 32, num_layers: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        ch = base_channels
        for _ in range(num_layers - 1):
            layers += [nn.Conv2d(ch, 2 * ch, 4, stride=2, padding=1), _norm(2 * ch), nn.LeakyReLU(0.2)]
            ch *= 2
        layers.append(nn.Conv2d(ch, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Patch logits; high means real."""
        return self.net(x)


def diagonal_gaussian_kl(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over all but the batch dimension -> [B]."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1)


def reparameterize(mean: Tensor, logvar: Tensor) -> Tensor:
    """Differentiable draw from N(mean, exp(logvar))."""
    return mean + torch.randn_like(mean) * (0.5 * logvar).exp()
