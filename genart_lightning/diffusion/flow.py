"""Rectified flow (Liu et al. 2023; Esser et al. 2024, SD3): straight paths from data to noise, velocity target."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from genart_lightning.diffusion.process import Network, Process, bcast, normal_quantile
from genart_lightning.diffusion.samplers import Denoiser, Level, NoiseGrid

TIME_SCALE = 1000.0
"""The network sees 1000 t, so its timestep embedding spans the range of a 1000-step DDPM (as SD3 does)."""

DENSITIES = ("uniform", "logit_normal")


def shift_time(t: Tensor, shift: float) -> Tensor:
    """SD3's timestep shift t -> s t / (1 + (s - 1) t): s > 1 spends more time at high noise (large images need it)."""
    return shift * t / (1 + (shift - 1) * t)


class Flow(Process):
    """x_t = (1 - t) x0 + t eps, t in [0, 1]; the network predicts the velocity eps - x0.

    Training times are uniform or logit-normal (m, s) (SD3's best), then shifted. The shift is `shift`, times
    sqrt(H * W) / `shift_base_size` when that is set: SD3's resolution-dependent shift, for the sample's own
    height and width (so one config trains and samples at any size). Samplers walk t = shift(1 - i / N), i = 0..N:
    N equal steps of unshifted time down to 0. diffusers' FlowMatchEulerDiscreteScheduler instead puts N points on
    [1, 1/1000] and adds a last step to 0 (for 20 steps at shift 1 its last two times are 0.054 and 0.001, ours 0.1
    and 0.05); given our times as `sigmas=` it walks our grid exactly (tests/test_samplers_vs_diffusers.py).
    """

    name = "flow"
    samplers = ("euler", "heun")

    def __init__(
        self,
        density: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        shift: float = 1.0,
        shift_base_size: int | None = None,
    ) -> None:
        """
        Args:
            density: how training times are drawn, "logit_normal" (SD3's best: more of them mid-path) or
                "uniform".
            logit_mean: mean m of the logit-normal times t = sigmoid(m + s n); above 0 trains more at high
                noise.
            logit_std: spread s of the logit-normal times; wider covers the ends of the path more.
            shift: SD3's timestep shift, in training and sampling; above 1 spends more time at high noise,
                which larger images need (SD3: 3).
            shift_base_size: when set, the shift grows with sqrt(H * W) / this, H and W the diffused height
                and width (latent positions in LatentDiffusion), so one config suits every size; None: shift
                as is.
        """
        if density not in DENSITIES:
            raise ValueError(f"unknown flow timestep density {density!r}; choose one of {', '.join(DENSITIES)}")
        if shift <= 0:
            raise ValueError(f"flow shift must be positive, got {shift}")
        self.density, self.logit_mean, self.logit_std = density, logit_mean, logit_std
        self.shift, self.shift_base_size = shift, shift_base_size

    def effective_shift(self, shape: tuple[int, ...]) -> float:
        """The shift for samples whose last two dimensions are `shape[-2:]`."""
        if self.shift_base_size is None:
            return self.shift
        return self.shift * math.sqrt(shape[-2] * shape[-1]) / self.shift_base_size

    def training_times(self, u: Tensor, shape: tuple[int, ...]) -> Tensor:
        """Times at quantiles u of the (shifted) training density."""
        u = u.double()
        t = u if self.density == "uniform" else torch.sigmoid(self.logit_mean + self.logit_std * normal_quantile(u))
        return shift_time(t, self.effective_shift(shape))

    def loss(self, net: Network, x0: Tensor, noise: Tensor, u: Tensor, weighted: bool = True) -> Tensor:
        t = self.training_times(u, tuple(x0.shape)).to(x0.device)
        tb = bcast(t, x0)
        out = net((1 - tb) * x0 + tb * noise, (TIME_SCALE * t).float())
        return F.mse_loss(out.float(), (noise - x0).float(), reduction="none").flatten(1).mean(1)

    def denoiser(self, net: Network) -> Denoiser:
        def denoise(x: Tensor, level: Level) -> Tensor:
            velocity = net(x, torch.full((x.shape[0],), TIME_SCALE * level.sigma, device=x.device))
            return x - level.sigma * velocity  # x = (1 - t) x0 + t eps and v = eps - x0 give x0 = x - t v

        return denoise

    def grid(self, sampler: str, steps: int, shape: tuple[int, ...]) -> NoiseGrid:
        self.check_sampler(sampler)
        self.check_steps(steps)
        times = shift_time(torch.linspace(1, 0, steps + 1, dtype=torch.float64), self.effective_shift(shape))
        return self.grid_at_times(times.tolist())

    def level(self, log_snr: float) -> Level:
        return self.grid_at_times([1 / (1 + math.exp(log_snr / 2)), 0.0])[0]  # (1 - t)^2 / t^2 = exp(log_snr)

    def log_snr(self, u: Tensor, shape: tuple[int, ...]) -> Tensor:
        t = self.training_times(u, shape)
        return 2 * (torch.log1p(-t) - t.log())

    def quantile(self, log_snr: Tensor, shape: tuple[int, ...]) -> Tensor:
        # the shift adds ln(shift) to logit(t), and logit(t) = -log_snr / 2
        logit = -log_snr.double() / 2 - math.log(self.effective_shift(shape))
        if self.density == "uniform":
            return torch.sigmoid(logit)
        return torch.special.ndtr((logit - self.logit_mean) / self.logit_std)

    def grid_at_times(self, times: list[float]) -> NoiseGrid:
        """Levels at these flow times (the last must be 0); Heun integrates in t itself (frame 1)."""
        return NoiseGrid(alpha=tuple(1 - t for t in times), sigma=tuple(times), time=tuple(TIME_SCALE * t for t in times),
                         frame=1.0)
