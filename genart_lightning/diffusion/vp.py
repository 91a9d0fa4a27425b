"""The variance-preserving process of DDPM (Ho et al. 2020): discrete timesteps, eps / v / x0 prediction, Min-SNR."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from genart_lightning.diffusion.parameterization import check_prediction, min_snr_weight
from genart_lightning.diffusion.process import Network, Process, bcast
from genart_lightning.diffusion.samplers import Denoiser, Level, NoiseGrid, karras_sigmas
from genart_lightning.diffusion.schedules import make_schedule

KARRAS_SAMPLERS = ("euler", "heun")
"""Samplers that walk Karras sigmas over the schedule's range (as diffusers' `use_karras_sigmas=True`)."""
TIMESTEP_SPACINGS = ("trailing", "linspace", "leading")
"""How ddpm / ddim / dpmpp_2m pick their timesteps, by diffusers' names (`timestep_spacing` of its schedulers)."""


def spaced_timesteps(spacing: str, steps: int, timesteps: int, offset: int = 0) -> list[int]:
    """`steps` training timesteps from noisiest to cleanest, as diffusers' schedulers space them.

    trailing (Lin et al. 2024): T-1, ..., T/N - 1, so the walk starts at the last training step and every step
    denoises; linspace: round(linspace(T-1, 0, N)), whose last step goes from t=0 to clean data; leading:
    (N-1) T//N, ..., 0, each plus `offset` (SD 1.x's default, with offset 1: it never starts at the noisiest step).
    """
    if spacing == "trailing":
        return [round(timesteps - i * timesteps / steps) - 1 for i in range(steps)]
    if spacing == "linspace":
        return torch.linspace(0, timesteps - 1, steps, dtype=torch.float64).round().long().flip(0).tolist()
    if spacing == "leading":
        return [i * (timesteps // steps) + offset for i in reversed(range(steps))]
    raise ValueError(f"unknown timestep_spacing {spacing!r}; choose one of {', '.join(TIMESTEP_SPACINGS)}")


class VP(Process):
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps over `timesteps` discrete steps of a named schedule.

    ddpm / ddim / dpmpp_2m walk training timesteps spaced by `timestep_spacing` (diffusers' names; "trailing" by
    default, starting at the last one; `steps_offset` shifts "leading" as SD 1.x's scheduler config does); euler /
    heun walk Karras sigmas (rho 7) between the schedule's smallest and largest sigma, feeding the network the
    fractional timestep of each sigma, as diffusers' EulerDiscreteScheduler does. `beta_start` / `beta_end` replace
    the linear schedules' defaults.
    """

    name = "vp"

    def __init__(
        self,
        schedule: str = "cosine",
        timesteps: int = 1000,
        zero_terminal_snr: bool = False,
        prediction: str = "eps",
        min_snr_gamma: float | None = 5.0,
        rho: float = 7.0,
        timestep_spacing: str = "trailing",
        beta_start: float | None = None,
        beta_end: float | None = None,
        steps_offset: int = 0,
    ) -> None:
        """
        Args:
            schedule: the noise schedule, "cosine" (improved DDPM; pixels), "linear" (DDPM's) or
                "scaled_linear" (latent diffusion's, for unit-variance latents; what pretrained SD models
                use).
            timesteps: number of discrete training timesteps T (1000 is usual); ddpm, ddim and dpmpp_2m take
                at most this many sampling steps.
            zero_terminal_snr: rescale the schedule so the last timestep is pure noise (Lin et al. 2024),
                which lets samples get as dark or bright as the data; needs prediction "v" or "x0"; no euler /
                heun then.
            prediction: what the network predicts, "eps" (the noise), "v" (Salimans & Ho 2022) or "x0" (clean
                data); a pretrained backbone needs the one it was trained with.
            min_snr_gamma: Min-SNR-gamma (Hang et al. 2023): caps the loss weight of low-noise levels so they
                stop dominating training; None: plain MSE.
            rho: spacing of the Karras sigmas euler / heun walk; higher puts more steps at low noise.
            timestep_spacing: how ddpm / ddim / dpmpp_2m pick their timesteps, "trailing" (starts at the
                last), "linspace" or "leading" (SD 1.x); match a pretrained model's scheduler config.
            beta_start: first beta of the linear schedules (default: DDPM's 1e-4, scaled_linear's 0.00085);
                not for cosine. Set it as a pretrained model's scheduler config does.
            beta_end: last beta of the linear schedules (default: DDPM's 0.02, scaled_linear's 0.012); not for
                cosine.
            steps_offset: added to every "leading" timestep (SD 1.x's scheduler config uses 1).
        """
        check_prediction(prediction)
        spaced_timesteps(timestep_spacing, 1, timesteps)  # an unknown name fails here, when the config is read
        if zero_terminal_snr and prediction == "eps":
            raise ValueError("zero_terminal_snr=True cannot be used with prediction='eps' (x0 = (x - eps)/0 at the last "
                             "step); use prediction='v'")
        self.schedule, self.timesteps, self.zero_terminal_snr = schedule, timesteps, zero_terminal_snr
        self.prediction, self.min_snr_gamma, self.rho = prediction, min_snr_gamma, rho
        self.timestep_spacing, self.beta_start, self.beta_end, self.steps_offset = timestep_spacing, beta_start, beta_end, steps_offset
        self.alphas_cumprod = make_schedule(schedule, timesteps, zero_terminal_snr, beta_start, beta_end)
        self._schedule_on: dict[torch.device, Tensor] = {}  # copies per device: one transfer, not one per step
        # sigma is infinite at SNR 0, so Karras sigmas need a finite top level
        self._log_sigmas = self.sigmas().log()
        self.samplers = ("ddim", "ddpm", "dpmpp_2m") + (() if zero_terminal_snr else KARRAS_SAMPLERS)

    def training_timesteps(self, u: Tensor) -> Tensor:
        """The training timestep of each quantile u: timesteps are drawn uniformly."""
        return (u * self.timesteps).long().clamp(0, self.timesteps - 1)

    def loss(self, net: Network, x0: Tensor, noise: Tensor, u: Tensor, weighted: bool = True) -> Tensor:
        t = self.training_timesteps(u).to(x0.device)
        if x0.device not in self._schedule_on:
            self._schedule_on[x0.device] = self.alphas_cumprod.to(x0.device)
        alpha_bar = self._schedule_on[x0.device][t]
        a = bcast(alpha_bar, x0)
        out = net(a.sqrt() * x0 + (1 - a).sqrt() * noise, t.float())
        target = check_prediction(self.prediction).target(x0, noise, a)
        per_sample = F.mse_loss(out.float(), target.float(), reduction="none").flatten(1).mean(1)
        if weighted:
            per_sample = per_sample * min_snr_weight(alpha_bar, self.prediction, self.min_snr_gamma).to(per_sample)
        return per_sample

    def denoiser(self, net: Network) -> Denoiser:
        to_x0 = check_prediction(self.prediction).x0

        def denoise(x: Tensor, level) -> Tensor:
            time = torch.full((x.shape[0],), level.time, device=x.device)
            return to_x0(net(x, time), x, torch.as_tensor(level.alpha**2, dtype=x.dtype, device=x.device))

        return denoise

    def grid(self, sampler: str, steps: int, shape: tuple[int, ...]) -> NoiseGrid:
        self.check_sampler(sampler)
        self.check_steps(steps)
        if sampler in KARRAS_SAMPLERS:
            sigmas = self.sigmas()
            return self.grid_at_sigmas(karras_sigmas(float(sigmas[0]), float(sigmas[-1]), steps, self.rho))
        if steps > self.timesteps:
            raise ValueError(f"steps={steps} is out of range; use 1..{self.timesteps} (the training timesteps)")
        return self.grid_at_timesteps(spaced_timesteps(self.timestep_spacing, steps, self.timesteps, self.steps_offset))

    def level(self, log_snr: float) -> Level:
        return self.grid_at_sigmas([math.exp(-log_snr / 2)])[0]

    def log_snr(self, u: Tensor, shape: tuple[int, ...]) -> Tensor:
        return self.log_snrs()[self.training_timesteps(u.cpu())]

    def quantile(self, log_snr: Tensor, shape: tuple[int, ...]) -> Tensor:
        """Quantiles of the training timesteps nearest in log-SNR: VP trains at those only."""
        nearest = (self.log_snrs()[None, :] - log_snr.double().cpu()[:, None]).abs().argmin(1)
        return (nearest.double() + 0.5) / self.timesteps

    def log_snr_range(self, shape: tuple[int, ...]) -> tuple[float, float]:
        low, high = super().log_snr_range(shape)
        log_snrs = self.log_snrs()  # under zero_terminal_snr the last timestep's is -inf: stop at the last finite one
        return max(low, float(log_snrs[log_snrs.isfinite()].min())), high

    def log_snrs(self) -> Tensor:
        """log(alpha_bar / (1 - alpha_bar)) of every training timestep (decreasing; -inf at SNR 0)."""
        return (self.alphas_cumprod / (1 - self.alphas_cumprod)).log()

    def grid_at_timesteps(self, timesteps: list[int]) -> NoiseGrid:
        """Levels at these training timesteps, then clean data."""
        a = [float(self.alphas_cumprod[t]) for t in timesteps]
        return NoiseGrid(alpha=tuple(math.sqrt(v) for v in a) + (1.0,), sigma=tuple(math.sqrt(1 - v) for v in a) + (0.0,),
                         time=tuple(float(t) for t in timesteps) + (0.0,))

    def grid_at_sigmas(self, sigmas: list[float]) -> NoiseGrid:
        """Levels at these sigma = sqrt((1 - a) / a) (Karras' variance-exploding sigma), then clean data."""
        alpha = [1 / math.sqrt(1 + s * s) for s in sigmas]
        return NoiseGrid(alpha=tuple(alpha) + (1.0,), sigma=tuple(s * a for s, a in zip(sigmas, alpha, strict=True)) + (0.0,),
                         time=tuple(self.timestep_of_sigma(s) for s in sigmas) + (0.0,))

    def sigmas(self) -> Tensor:
        """Karras sigma of every training timestep (increasing)."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    def timestep_of_sigma(self, sigma: float) -> float:
        """The fractional training timestep whose sigma this is: linear in log sigma between neighbours."""
        log_sigmas = self._log_sigmas
        target = math.log(sigma)
        high = int(torch.searchsorted(log_sigmas, torch.tensor(target, dtype=log_sigmas.dtype)).clamp(1, len(log_sigmas) - 1))
        low = high - 1
        w = (target - float(log_sigmas[low])) / float(log_sigmas[high] - log_sigmas[low])
        return low + min(max(w, 0.0), 1.0)
