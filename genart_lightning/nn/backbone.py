"""What a denoising backbone is to the diffusion model: settings chosen in YAML, built once the widths are known."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class Backbone:
    """Base class of backbone settings; configs may name its subclasses only.

    The model knows the input channels (pixels or a first stage's latents) and the text widths only after it
    has built its space and text encoder, so a config names settings and `build` makes the network later.
    Subclasses keep their init arguments as same-named attributes (the model saves them to rebuild the net).
    """

    name: str = "backbone"
    lora_targets: tuple[str, ...] = ()
    """Layer names LoRA adapts when `lora.target_modules` is not set (peft matches them as name suffixes)."""

    def build(self, in_channels: int, context_dim: int | None, pooled_dim: int | None,
              gradient_checkpointing: bool = False) -> nn.Module:
        """The network `net(x, t, context=, context_mask=, pooled=) -> output of x's shape`."""
        raise NotImplementedError

    def pretrained_source(self) -> str | None:
        """Where `build` reads pretrained weights from (None: random-init)."""
        return None

    def check_input(self, shape: tuple[int, int, int]) -> None:
        """One line naming both parts when samples of `shape` [C, H, W] cannot go through this backbone: here, when
        the diffused height or width is not a multiple of `size_multiple()`, with `size_rule()` saying why."""
        step = self.size_multiple()
        if shape[-1] % step or shape[-2] % step:
            raise ValueError(f"the {self.name} backbone {self.size_rule()}, so the diffused size must be divisible by "
                             f"{step}; the space gives {shape[-2]}x{shape[-1]}")

    def size_multiple(self) -> int:
        """What the diffused height and width must be multiples of (patch size, 2 ** downsamplings; 1: any size).

        `check_input` judges a shape; this number lets a caller name the nearest sizes that would pass."""
        return 1

    def size_rule(self) -> str:
        """Why sizes must be multiples of `size_multiple()`, and what setting changes it (for `check_input`'s line)."""
        return "takes any size"


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal features [B, dim] of (possibly fractional) timesteps t [B]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)
