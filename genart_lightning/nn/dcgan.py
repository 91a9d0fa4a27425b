"""DCGAN generator and discriminator (Radford et al. 2016), optionally conditioned on a vector (text embedding)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from genart_lightning.nn.checkpointing import run_block

Norm = Literal["batch", "none"]


def _num_doublings(image_size: int) -> int:
    """Number of 2x resolution steps between the 4x4 base and `image_size`; sizes must be 4 * 2**k."""
    steps = math.log2(image_size / 4) if image_size >= 8 else 0.0
    if steps < 1 or steps != int(steps):
        raise ValueError(f"image_size {image_size} is not supported by the DCGAN nets; use 8, 16, 32, 64, 128 or 256")
    return int(steps)


def _norm2d(norm: Norm, width: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(width)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; use 'batch' or 'none'")


def condition_norm(cond_dim: int) -> nn.Module | None:
    """Standardise each dimension of the condition over the data (running statistics when sampling).

    A frozen text embedding's dimensions carry arbitrary offsets and scales, and most of its length is shared by all
    captions; standardising hands the nets' linear maps the part that tells captions apart.
    """
    return nn.BatchNorm1d(cond_dim, affine=False) if cond_dim else None


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm whose per-channel gain and bias are predicted from the condition (as in BigGAN, Brock et al. 2019).

    Colour is a per-channel property, so letting the caption set channel gains reaches it in one step.
    """

    def __init__(self, width: int, cond_dim: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(width, affine=False)
        self.gain = nn.Linear(cond_dim, width)
        self.bias = nn.Linear(cond_dim, width)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        return self.norm(x) * (1 + self.gain(cond))[:, :, None, None] + self.bias(cond)[:, :, None, None]


class _UpBlock(nn.Module):
    """2x nearest upsample + 3x3 conv (resize-convolution: no checkerboard, Odena et al. 2016), norm, ReLU."""

    def __init__(self, width_in: int, width_out: int, norm: Norm, cond_dim: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(width_in, width_out, 3, 1, 1))
        self.cond_norm = ConditionalBatchNorm2d(width_out, cond_dim) if norm == "batch" and cond_dim else None
        self.norm = _norm2d(norm, width_out) if self.cond_norm is None else None

    def forward(self, x: Tensor, cond: Tensor | None) -> Tensor:
        x = self.conv(x)
        x = self.cond_norm(x, cond) if self.cond_norm is not None else self.norm(x)
        return torch.relu(x)


class DCGANGenerator(nn.Module):
    """Noise -> 4x4 map -> 2x up blocks; an optional condition sets the gain and bias of every block's BatchNorm.

    DCGAN's layout with resize-convolutions in place of transposed convolutions, which learned flat-colour shapes
    several times faster in our CPU runs. The condition enters through normalisation only (as in BigGAN): when it was
    also concatenated to the noise, G learned to ignore the noise (one image per caption, 16px shapes runs); with the
    4x4 layout drawn from the noise alone, samples of one caption stayed 3-4x more varied.
    """

    def __init__(
        self,
        z_dim: int = 64,
        cond_dim: int = 0,
        image_size: int = 32,
        channels: int = 3,
        base_channels: int = 64,
        norm: Norm = "batch",
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        steps = _num_doublings(image_size)
        self.gradient_checkpointing = gradient_checkpointing
        if cond_dim and norm != "batch":
            raise ValueError(f"a conditional generator needs norm='batch' (the condition drives its BatchNorm), got {norm!r}; set g_norm: batch")
        self.z_dim, self.cond_dim = z_dim, cond_dim
        self.cond_norm = condition_norm(cond_dim)
        width = base_channels * 2**steps
        self.stem = nn.Linear(z_dim, width * 16)
        self.stem_act = nn.Sequential(_norm2d(norm, width), nn.ReLU(inplace=True))
        self.blocks = nn.ModuleList(_UpBlock(width // 2**i, width // 2 ** (i + 1), norm, cond_dim) for i in range(steps))
        self.out = nn.Sequential(nn.Conv2d(width // 2**steps, channels, 3, 1, 1), nn.Tanh())

    def forward(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        """Images in [-1, 1] [B, channels, image_size, image_size]."""
        if self.cond_norm is not None:
            cond = self.cond_norm(cond)
        x = self.stem(z)
        x = self.stem_act(x.view(x.shape[0], -1, 4, 4))
        for block in self.blocks:
            x = run_block(block, self.gradient_checkpointing, x, cond)
        return self.out(x)


class DCGANDiscriminator(nn.Module):
    """Strided convs down to 4x4, then a real/fake logit; a condition enters as a projection term (Miyato & Koyama 2018).

    The projection term <embed(cond), spatially averaged features> makes the logit depend on how well image and
    condition match, which is what a matching-aware discriminator needs. Features are averaged over positions as in
    the projection discriminator: a caption says what is in the image more than where.
    """

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 3,
        base_channels: int = 64,
        cond_dim: int = 0,
        spectral_norm: bool = False,
        norm: Norm = "none",
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        steps = _num_doublings(image_size)
        self.gradient_checkpointing = gradient_checkpointing
        sn = _spectral_norm if spectral_norm else (lambda layer: layer)
        width = base_channels
        # No norm on the first layer, as in DCGAN: it would normalise away the image's own statistics.
        layers: list[nn.Module] = [sn(nn.Conv2d(channels, width, 4, 2, 1)), nn.LeakyReLU(0.2, inplace=True)]
        for _ in range(steps - 1):
            layers += [sn(nn.Conv2d(width, width * 2, 4, 2, 1)), _norm2d(norm, width * 2), nn.LeakyReLU(0.2, inplace=True)]
            width *= 2
        self.body = nn.Sequential(*layers)
        # the body's stages (first conv + act, then conv + norm + act per resolution), for checkpointing; a plain
        # list of views over `body`'s layers, so parameter names stay body.N.*
        self._stages = [nn.Sequential(*layers[:2])] + [nn.Sequential(*layers[i : i + 3]) for i in range(2, len(layers), 3)]
        self.head = sn(nn.Linear(width * 16, 1))
        self.cond_norm = condition_norm(cond_dim)
        self.embed = sn(nn.Linear(cond_dim, width, bias=False)) if cond_dim else None

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """Logits [B]: high for real (and, with a condition, matching) inputs."""
        h = x
        for stage in self._stages:  # = self.body(x): [B, width, 4, 4]
            h = run_block(stage, self.gradient_checkpointing and self.training, h)
        logit = self.head(h.flatten(1)).squeeze(1)
        if self.embed is not None:
            logit = logit + (self.embed(self.cond_norm(cond)) * h.mean(dim=(2, 3))).sum(dim=1)
        return logit
