"""Samplers as pure functions over a grid of noise levels, whatever the process (vp, edm, flow) that made the grid.

Every process writes its noisy data as x = alpha * x0 + sigma * eps (vp: alpha^2 + sigma^2 = 1; edm: alpha = 1;
flow: alpha = 1 - t, sigma = t), so one sampler serves all of them: it walks a `NoiseGrid` from pure noise to
clean data and asks `denoise(x, level) -> x0 estimate` at each level. The process builds the grid (its own
spacing: spaced timesteps, Karras sigmas, shifted flow times) and the denoiser (its own network preconditioning).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Level:
    """One noise level: x = alpha * x0 + sigma * eps; `time` is what the process feeds its network there."""

    alpha: float
    sigma: float
    time: float


@dataclass(frozen=True)
class NoiseGrid:
    """Levels from pure noise (index 0) to clean data (the last, sigma 0), in the order a sampler walks them.

    `frame` is the coordinate Heun integrates the probability-flow ODE in: 0 is Karras et al.'s x / alpha over
    sigma / alpha (EDM, and diffusers' Euler/Heun over a VP model), 1 is the flow's own interpolant time t
    (x over sigma / (alpha + sigma)). First-order steps are the same in every frame (they are DDIM).
    """

    alpha: tuple[float, ...]
    sigma: tuple[float, ...]
    time: tuple[float, ...]
    frame: float = 0.0

    def __post_init__(self) -> None:
        if not len(self.alpha) == len(self.sigma) == len(self.time) >= 2:
            raise ValueError("a noise grid needs alpha, sigma and time of one length, at least 2 (noise and clean)")
        if self.sigma[-1] != 0:
            raise ValueError("a noise grid ends at clean data (sigma 0)")

    @property
    def steps(self) -> int:
        return len(self.alpha) - 1

    def __getitem__(self, i: int) -> Level:
        return Level(self.alpha[i], self.sigma[i], self.time[i])


Denoiser = Callable[[Tensor, Level], Tensor]
"""`denoise(x, level) -> x0 estimate`."""


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Noise drawn on the generator's device, so a seed gives the same samples on CPU and GPU."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _eps(x: Tensor, x0: Tensor, level: Level) -> Tensor:
    return (x - level.alpha * x0) / level.sigma


def _snr(level: Level) -> float:
    return math.inf if level.sigma == 0 else (level.alpha / level.sigma) ** 2


@torch.no_grad()
def sample_ddim(
    denoise: Denoiser, noise: Tensor, grid: NoiseGrid, eta: float = 0.0, generator: torch.Generator | None = None
) -> Tensor:
    """DDIM (Song et al. 2021) in alpha/sigma form: eta=0 is the deterministic ODE path, eta=1 is DDPM's posterior.

    The injected noise has variance eta^2 * sigma_s^2 * (1 - SNR_t / SNR_s), the posterior q(x_s | x_t, x0) at eta=1.
    """
    x = noise
    for i in range(grid.steps):
        now, nxt = grid[i], grid[i + 1]
        x0 = denoise(x, now)
        eps = _eps(x, x0, now)
        ratio = _snr(now) / _snr(nxt) if nxt.sigma > 0 else 0.0
        std = eta * nxt.sigma * max(1.0 - ratio, 0.0) ** 0.5
        x = nxt.alpha * x0 + max(nxt.sigma**2 - std**2, 0.0) ** 0.5 * eps
        if std > 0:
            x = x + std * _randn_like(x, generator)
    return x


@torch.no_grad()
def sample_ddpm(
    denoise: Denoiser, noise: Tensor, grid: NoiseGrid, eta: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """Ancestral sampling from the posterior q(x_s | x_t, x0) (Ho et al. 2020) on any subset of levels; `eta` unused."""
    return sample_ddim(denoise, noise, grid, eta=1.0, generator=generator)


@torch.no_grad()
def sample_euler(
    denoise: Denoiser, noise: Tensor, grid: NoiseGrid, eta: float = 0.0, generator: torch.Generator | None = None
) -> Tensor:
    """Euler on the probability-flow ODE (Karras et al. 2022, Alg. 1 without the correction; the flow's Euler).

    In x / alpha over sigma / alpha, and equally in the flow's x over t, one Euler step is exactly DDIM's eta=0
    step, so this is DDIM on the grid the process chose for Euler (Karras sigmas, shifted flow times).
    """
    return sample_ddim(denoise, noise, grid, eta=0.0)


@torch.no_grad()
def sample_heun(
    denoise: Denoiser, noise: Tensor, grid: NoiseGrid, eta: float = 0.0, generator: torch.Generator | None = None
) -> Tensor:
    """Heun's second-order method (Karras et al. 2022, Alg. 1, deterministic) in the grid's frame.

    Frame k: z = x / (alpha + k sigma) at time tau = sigma / (alpha + k sigma), with dz/dtau = eps - k x0.
    The step to clean data is Euler (the derivative there is 0/0), so N steps cost 2N - 1 network calls.
    """
    k = grid.frame
    x = noise
    for i in range(grid.steps):
        now, nxt = grid[i], grid[i + 1]
        x0 = denoise(x, now)
        scale, scale_next = now.alpha + k * now.sigma, nxt.alpha + k * nxt.sigma
        dtau = nxt.sigma / scale_next - now.sigma / scale
        slope = _eps(x, x0, now) - k * x0
        z_euler = x / scale + dtau * slope
        if nxt.sigma == 0:
            x = z_euler * scale_next
            continue
        x_euler = z_euler * scale_next
        x0_next = denoise(x_euler, nxt)
        slope_next = _eps(x_euler, x0_next, nxt) - k * x0_next
        x = (x / scale + dtau * 0.5 * (slope + slope_next)) * scale_next
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoise: Denoiser, noise: Tensor, grid: NoiseGrid, eta: float = 0.0, generator: torch.Generator | None = None
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): second-order multistep in log-SNR, deterministic (`eta`, `generator` unused).

    Steps touching an infinite log-SNR (pure noise at the start, clean data at the end) fall back to first order,
    where the update is exact for a constant x0 estimate.
    """
    x, prev_x0, prev_h = noise, None, None
    for i in range(grid.steps):
        now, nxt = grid[i], grid[i + 1]
        x0 = denoise(x, now)
        h = _half_log_snr(nxt) - _half_log_snr(now)
        d = x0
        if prev_x0 is not None and math.isfinite(h) and math.isfinite(prev_h):
            r = prev_h / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * prev_x0
        x = (nxt.sigma / now.sigma) * x + nxt.alpha * -math.expm1(-h) * d
        prev_x0, prev_h = x0, h
    return x


def _half_log_snr(level: Level) -> float:
    """lambda = log(alpha / sigma); -inf at pure noise, +inf at clean data."""
    if level.alpha <= 0.0:
        return -math.inf
    if level.sigma <= 0.0:
        return math.inf
    return math.log(level.alpha / level.sigma)


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> list[float]:
    """`steps` noise levels from sigma_max down to sigma_min, denser near sigma_min (Karras et al. 2022, eq. 5)."""
    if steps == 1:
        return [sigma_max]
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [(hi + i / (steps - 1) * (lo - hi)) ** rho for i in range(steps)]


Sampler = Callable[..., Tensor]
"""`(denoise, noise, grid, eta=, generator=) -> samples`: the one signature of every sampler."""

SAMPLERS: dict[str, Sampler] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "euler": sample_euler,
    "heun": sample_heun,
}
"""Samplers by name; a new sampler is one entry (and a name in the `samplers` of the processes it suits)."""


ETA_SAMPLERS = ("ddim",)
"""Samplers that read `eta`: ddpm is ddim at eta 1, and euler, heun and dpmpp_2m are deterministic here."""


def check_eta(sampler: str, eta: float) -> None:
    """One line when `eta` is set for a sampler that would ignore it."""
    if eta and sampler not in ETA_SAMPLERS:
        raise ValueError(f"--eta {eta:g} has no effect with the {sampler} sampler (ddpm is ddim at eta 1; euler, heun and "
                         "dpmpp_2m are deterministic); use --sampler ddim --eta, or drop --eta")


def check_sampler(name: str, supported: tuple[str, ...] | None = None, process: str | None = None) -> Sampler:
    """The sampler called `name`, or one line listing the choices (those of `process` when given)."""
    choices = supported if supported is not None else tuple(SAMPLERS)
    if name not in choices:
        where = f" of the {process} process" if process else ""
        raise ValueError(f"unknown sampler {name!r} (--sampler); the samplers{where} are {', '.join(choices)}")
    return SAMPLERS[name]
