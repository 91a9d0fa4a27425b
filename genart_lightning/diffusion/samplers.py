"""Samplers as pure functions: a denoiser callable, starting noise and a schedule in, samples out.

Every sampler takes `denoise(x_t, t) -> x0 estimate` (t: long tensor [B] of training steps), so it
does not care what the network predicts; `x0_denoiser` turns a raw network into one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from genart_lightning.diffusion.parameterization import to_x0

Denoiser = Callable[[Tensor, Tensor], Tensor]


def x0_denoiser(model: Callable[[Tensor, Tensor], Tensor], alphas_cumprod: Tensor, prediction: str) -> Denoiser:
    """Wrap `model(x_t, t) -> eps | v | x0` as a denoiser returning x0."""
    return lambda x, t: to_x0(model(x, t), x, alphas_cumprod.to(x.device)[t], prediction)


def sampling_timesteps(num_train_steps: int, steps: int) -> list[int]:
    """`steps` training timesteps from the last (pure noise) down to 0, evenly spaced ("trailing" spacing).

    Starting at the very last step matters for zero-terminal-SNR schedules (Lin et al. 2024).
    """
    if not 1 <= steps <= num_train_steps:
        raise ValueError(f"steps={steps} is out of range; use 1..{num_train_steps} (the training timesteps)")
    return torch.linspace(num_train_steps - 1, 0, steps, dtype=torch.float64).round().long().tolist()


def _levels(alphas_cumprod: Tensor, steps: int) -> list[tuple[int, float, float]]:
    """(t, alpha_bar_t, alpha_bar_next) per step; the step after t=0 is clean data (alpha_bar = 1)."""
    ts = sampling_timesteps(len(alphas_cumprod), steps)
    a = [float(alphas_cumprod[t]) for t in ts] + [1.0]
    return [(t, a[i], a[i + 1]) for i, t in enumerate(ts)]


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Noise drawn on the generator's device, so a seed gives the same samples on CPU and GPU."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _t(x: Tensor, t: int) -> Tensor:
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


@torch.no_grad()
def sample_ddpm(
    denoise: Denoiser,
    noise: Tensor,
    alphas_cumprod: Tensor,
    steps: int,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Ancestral sampling from the posterior q(x_s | x_t, x0) (Ho et al. 2020), on any subset of steps; `eta` unused."""
    x = noise
    for t, a_t, a_s in _levels(alphas_cumprod, steps):
        x0 = denoise(x, _t(x, t))
        beta = 1 - a_t / a_s  # noise added between the two kept steps
        mean = (a_s**0.5 * beta * x0 + (a_t / a_s) ** 0.5 * (1 - a_s) * x) / (1 - a_t)
        var = beta * (1 - a_s) / (1 - a_t)
        x = mean + var**0.5 * _randn_like(x, generator) if var > 0 else mean
    return x


@torch.no_grad()
def sample_ddim(
    denoise: Denoiser,
    noise: Tensor,
    alphas_cumprod: Tensor,
    steps: int,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021): eta=0 is the deterministic ODE path, eta=1 matches DDPM's posterior noise."""
    x = noise
    for t, a_t, a_s in _levels(alphas_cumprod, steps):
        x0 = denoise(x, _t(x, t))
        eps = (x - a_t**0.5 * x0) / (1 - a_t) ** 0.5
        sigma = eta * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)) ** 0.5
        x = a_s**0.5 * x0 + max(1 - a_s - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * _randn_like(x, generator)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoise: Denoiser,
    noise: Tensor,
    alphas_cumprod: Tensor,
    steps: int,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): second-order multistep in log-SNR, deterministic (`eta`, `generator` unused).

    Steps touching an infinite log-SNR (pure noise at the start, clean data at the end) fall back
    to first order, where the update is exact for a constant x0 estimate.
    """
    x, prev_x0, prev_h = noise, None, None
    for t, a_t, a_s in _levels(alphas_cumprod, steps):
        x0 = denoise(x, _t(x, t))
        h = _half_log_snr(a_s) - _half_log_snr(a_t)
        d = x0
        if prev_x0 is not None and math.isfinite(h) and math.isfinite(prev_h):
            r = prev_h / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * prev_x0
        x = ((1 - a_s) / (1 - a_t)) ** 0.5 * x + a_s**0.5 * -math.expm1(-h) * d
        prev_x0, prev_h = x0, h
    return x


def _half_log_snr(alpha_bar: float) -> float:
    """lambda = log(alpha / sigma); -inf at pure noise, +inf at clean data."""
    if alpha_bar <= 0.0 or alpha_bar >= 1.0:
        return math.inf if alpha_bar >= 1.0 else -math.inf
    return 0.5 * math.log(alpha_bar / (1 - alpha_bar))


Sampler = Callable[..., Tensor]
"""`(denoise, noise, alphas_cumprod, steps, eta=, generator=) -> samples`: the one signature of every sampler."""

SAMPLERS: dict[str, Sampler] = {"ddpm": sample_ddpm, "ddim": sample_ddim, "dpmpp_2m": sample_dpmpp_2m}
"""Samplers by name; a new sampler is one entry."""


def check_sampler(name: str) -> Sampler:
    """The sampler called `name`, or one line listing the choices."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r} (--sampler); choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def run_sampler(
    name: str,
    denoise: Denoiser,
    noise: Tensor,
    alphas_cumprod: Tensor,
    steps: int,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Run the sampler called `name` (see SAMPLERS)."""
    return check_sampler(name)(denoise, noise, alphas_cumprod, steps, eta=eta, generator=generator)
