"""Discrete noise schedules as `alphas_cumprod` tensors (the signal fraction of x_t at each step t)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

SCHEDULES = ("linear", "scaled_linear", "cosine")
DEFAULT_BETAS = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}
"""(beta_start, beta_end) of the linear schedules when a config names none: DDPM's and latent diffusion's."""


def linear_schedule(timesteps: int = 1000, beta_start: float = DEFAULT_BETAS["linear"][0],
                    beta_end: float = DEFAULT_BETAS["linear"][1]) -> Tensor:
    """DDPM's betas linear in t (Ho et al. 2020); suits pixel space."""
    betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def scaled_linear_schedule(timesteps: int = 1000, beta_start: float = DEFAULT_BETAS["scaled_linear"][0],
                           beta_end: float = DEFAULT_BETAS["scaled_linear"][1]) -> Tensor:
    """Latent diffusion's betas linear in sqrt(beta) (Rombach et al. 2022); suits unit-variance latents."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def cosine_schedule(timesteps: int = 1000, offset: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Improved-DDPM cosine schedule (Nichol & Dhariwal 2021): less time wasted at near-pure noise."""
    s = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((s + offset) / (1 + offset) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)  # the clamp keeps the last step from being exactly pure noise
    return torch.cumprod(1.0 - betas, dim=0)


def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Shift and scale sqrt(alphas_cumprod) so the last step has SNR 0 (Lin et al. 2024), keeping the first.

    Without it the model never sees pure noise in training but starts from it at sampling time,
    which caps how dark or bright samples can get. Pair it with v or x0 prediction.
    """
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return root**2


def make_schedule(name: str, timesteps: int = 1000, zero_terminal_snr: bool = False, beta_start: float | None = None,
                  beta_end: float | None = None) -> Tensor:
    """alphas_cumprod [timesteps] (float64) of a schedule named in SCHEDULES; `beta_start` / `beta_end` replace the
    linear schedules' defaults (a pretrained pipeline's scheduler config names its own)."""
    builders = {"linear": linear_schedule, "scaled_linear": scaled_linear_schedule, "cosine": cosine_schedule}
    if name not in builders:
        raise ValueError(f"unknown noise schedule {name!r} (schedule=); choose one of {', '.join(SCHEDULES)}")
    if timesteps < 2:
        raise ValueError(f"timesteps={timesteps} is too small; use at least 2 (1000 is usual)")
    betas = {k: v for k, v in (("beta_start", beta_start), ("beta_end", beta_end)) if v is not None}
    if betas and name == "cosine":
        raise ValueError(f"the cosine schedule has no {' or '.join(betas)}; set them with schedule linear or scaled_linear")
    alphas_cumprod = builders[name](timesteps, **betas)
    return rescale_zero_terminal_snr(alphas_cumprod) if zero_terminal_snr else alphas_cumprod


def snr(alphas_cumprod: Tensor) -> Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) of each step."""
    return alphas_cumprod / (1 - alphas_cumprod)
