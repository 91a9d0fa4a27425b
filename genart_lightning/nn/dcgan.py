"""DCGAN generator and discriminator (Radford et al. 2016), optionally conditioned on a vector (text embedding)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

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


class DCGANGenerator(nn.Module):
    """Noise (plus an optional condition vector, concatenated) -> 4x4 map -> transposed-conv doublings -> tanh image."""

    def __init__(
        self,
        z_dim: int = 64,
        cond_dim: int = 0,
        image_size: int = 32,
        channels: int = 3,
        base_channels: int = 64,
        norm: Norm = "batch",
    ) -> None:
        super().__init__()
        steps = _num_doublings(image_size)
        self.z_dim, self.cond_dim = z_dim, cond_dim
        width = base_channels * 2 ** (steps - 1)
        self.stem = nn.Linear(z_dim + cond_dim, width * 16)
        self.stem_act = nn.Sequential(_norm2d(norm, width), nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        for _ in range(steps):
            layers += [nn.Upsample(scale_factor=2), nn.Conv2d(width, width // 2, 3, 1, 1), _norm2d(norm, width // 2), nn.ReLU(inplace=True)]
            width //= 2
        layers += [nn.Conv2d(width, channels, 3, 1, 1), nn.Tanh()]
        self.body = nn.Sequential(*layers)

    def forward(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        """Images in [-1, 1] [B, channels, image_size, image_size]."""
        if self.cond_dim:
            z = torch.cat([z, cond], dim=1)
        x = self.stem(z)
        x = self.stem_act(x.view(x.shape[0], -1, 4, 4))
        return self.body(x)


class DCGANDiscriminator(nn.Module):
    """Strided convs down to 4x4, then a real/fake logit; a condition enters as a projection term (Miyato & Koyama 2018).

    The projection term <embed(cond), features> makes the logit depend on how well image and condition match,
    which is what a matching-aware discriminator needs.
    """

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 3,
        base_channels: int = 64,
        cond_dim: int = 0,
        spectral_norm: bool = False,
        norm: Norm = "none",
    ) -> None:
        super().__init__()
        steps = _num_doublings(image_size)
        sn = _spectral_norm if spectral_norm else (lambda layer: layer)
        width = base_channels
        # No norm on the first layer, as in DCGAN: it would normalise away the image's own statistics.
        layers: list[nn.Module] = [sn(nn.Conv2d(channels, width, 4, 2, 1)), nn.LeakyReLU(0.2, inplace=True)]
        for _ in range(steps - 1):
            layers += [sn(nn.Conv2d(width, width * 2, 4, 2, 1)), _norm2d(norm, width * 2), nn.LeakyReLU(0.2, inplace=True)]
            width *= 2
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.head = sn(nn.Linear(width * 16, 1))
        self.embed = sn(nn.Linear(cond_dim, width * 16, bias=False)) if cond_dim else None

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """Logits [B]: high for real (and, with a condition, matching) inputs."""
        h = self.body(x)
        logit = self.head(h).squeeze(1)
        if self.embed is not None:
            logit = logit + (self.embed(cond) * h).sum(dim=1)
        return logit
