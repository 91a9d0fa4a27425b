"""Classifier-free guidance (Ho & Salimans 2022): conditional and unconditional in one batched call."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from genart_lightning.diffusion.samplers import Denoiser, Level

ConditionalModel = Callable[[Tensor, Tensor, dict[str, Tensor]], Tensor]
"""`model(x_t, t, cond) -> raw output`; `cond` maps names to batch-first tensors."""


def classifier_free_guidance(
    model: ConditionalModel, cond: dict[str, Tensor], uncond: dict[str, Tensor], scale: float
) -> Callable[[Tensor, Tensor], Tensor]:
    """`(x_t, t) -> uncond + scale * (cond - uncond)`, with both halves computed in ONE forward of a doubled batch.

    One call of twice the batch keeps the GPU busier than two calls; scale 1 is the conditional output.
    """
    both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}

    def guided(x: Tensor, t: Tensor) -> Tensor:
        out_cond, out_uncond = model(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return out_uncond + scale * (out_cond - out_uncond)

    return guided


def check_interval(interval: tuple[float, float] | None) -> tuple[float, float] | None:
    """A guidance interval is two noise levels LO < HI (sigma / alpha; HI may be inf): one line when it is not."""
    if interval is None:
        return None
    values = tuple(float(v) for v in interval)
    if len(values) != 2 or not 0 <= values[0] < values[1]:
        raise ValueError(f"guidance interval {list(interval)} is not two noise levels LO < HI; write e.g. 0.3,5")
    return values


def limited_interval(guided: Denoiser, plain: Denoiser, interval: tuple[float, float]) -> Denoiser:
    """Guidance only at noise levels inside `interval`, the plain conditional denoiser elsewhere (Kynkäänniemi et al.
    2024). Levels are sigma / alpha = exp(-log SNR / 2), one axis for every process. Guidance at high noise pulls every
    sample of a prompt towards the same layout and costs diversity; at low noise it does little; in the middle it
    gives the prompt's identity. Outside the interval one forward pass is saved, too."""
    low, high = interval

    def denoise(x: Tensor, level: Level) -> Tensor:
        ratio = level.sigma / level.alpha if level.alpha > 0 else math.inf
        return guided(x, level) if low < ratio <= high else plain(x, level)

    return denoise
