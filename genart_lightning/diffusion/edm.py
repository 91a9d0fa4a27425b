"""EDM (Karras et al. 2022): log-normal noise levels, preconditioned network, Karras sigmas with Heun."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from genart_lightning.diffusion.process import Network, Process, bcast, normal_quantile
from genart_lightning.diffusion.samplers import Denoiser, Level, NoiseGrid, karras_sigmas


class EDM(Process):
    """x = x0 + sigma * eps with ln sigma ~ N(p_mean, p_std^2) in training.

    The defaults (0, 1) are not the paper's CIFAR-10 values (-1.2, 1.2): those put 3% of the training draws at
    log-SNR below -2 (sigma > e), where the prompt decides what the picture shows, and a text-conditional model on
    scikit-learn digits (16px U-Net, 1500 steps) then ignored its prompt (accuracy 0.10, chance; x0 error at log-SNR -6
    equal to the data's variance). N(0, 1) gives log-SNR = -2 ln sigma ~ N(0, 2^2), the coverage of SD3's logit-normal
    flow times (Esser et al. 2024), 16% of draws below -2; the same model then drew the prompted digit in 0.95 of
    samples unguided. Pass p_mean=-1.2, p_std=1.2 for the paper's unconditional CIFAR-10 setting.

    The network F sees c_in * x and c_noise = ln(sigma) / 4; the denoiser is D = c_skip x + c_out F (Table 1 of the
    paper). Training regresses F on (x0 - c_skip x) / c_out, which is the paper's loss lambda(sigma) |D - x0|^2 with
    lambda = 1 / c_out^2. Samplers walk Karras sigmas from sigma_max to sigma_min, then clean data.
    """

    name = "edm"
    samplers = ("heun", "euler", "dpmpp_2m")

    def __init__(
        self,
        sigma_data: float = 0.5,
        p_mean: float = 0.0,
        p_std: float = 1.0,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
    ) -> None:
        """
        Args:
            sigma_data: standard deviation of the clean data (0.5 for images in [-1, 1]); sets the
                preconditioning, so it should match what is diffused.
            p_mean: mean of ln(sigma) in training; lower trains more at low noise (the paper's CIFAR-10:
                -1.2).
            p_std: standard deviation of ln(sigma) in training; wider covers more noise levels (the paper's:
                1.2).
            sigma_min: lowest noise level sampling walks to before clean data.
            sigma_max: highest noise level, where sampling starts (its noise is sigma_max times unit noise).
            rho: spacing of the Karras sigmas samplers walk; higher puts more steps near sigma_min.
        """
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"EDM needs 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.sigma_data, self.p_mean, self.p_std = sigma_data, p_mean, p_std
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho

    def preconditioning(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) at noise level sigma."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4

    def training_sigmas(self, u: Tensor) -> Tensor:
        """Log-normal sigmas at quantiles u."""
        return (self.p_mean + self.p_std * normal_quantile(u.double())).exp()

    def loss(self, net: Network, x0: Tensor, noise: Tensor, u: Tensor, weighted: bool = True) -> Tensor:
        sigma = self.training_sigmas(u).to(x0.device)
        c_skip, c_out, c_in, c_noise = (bcast(c, x0) for c in self.preconditioning(sigma))
        x = x0 + bcast(sigma, x0) * noise
        out = net(c_in * x, c_noise.flatten().float())
        target = (x0 - c_skip * x) / c_out
        return F.mse_loss(out.float(), target.float(), reduction="none").flatten(1).mean(1)

    def denoiser(self, net: Network) -> Denoiser:
        def denoise(x: Tensor, level: Level) -> Tensor:
            sigma = torch.tensor(level.sigma, dtype=torch.float64)
            c_skip, c_out, c_in, c_noise = (float(c) for c in self.preconditioning(sigma))
            out = net(c_in * x, torch.full((x.shape[0],), c_noise, device=x.device))
            return c_skip * x + c_out * out

        return denoise

    def grid(self, sampler: str, steps: int, shape: tuple[int, ...]) -> NoiseGrid:
        self.check_sampler(sampler)
        self.check_steps(steps)
        return self.grid_at_sigmas(karras_sigmas(self.sigma_min, self.sigma_max, steps, self.rho))

    def level(self, log_snr: float) -> Level:
        return self.grid_at_sigmas([math.exp(-log_snr / 2)])[0]

    def log_snr(self, u: Tensor, shape: tuple[int, ...]) -> Tensor:
        return -2 * self.training_sigmas(u).log()

    def quantile(self, log_snr: Tensor, shape: tuple[int, ...]) -> Tensor:
        return torch.special.ndtr((-log_snr.double() / 2 - self.p_mean) / self.p_std)  # ln sigma = -log_snr / 2

    def grid_at_sigmas(self, sigmas: list[float]) -> NoiseGrid:
        """Levels at these sigmas, then clean data; `time` is c_noise (what the network sees)."""
        return NoiseGrid(alpha=(1.0,) * (len(sigmas) + 1), sigma=tuple(sigmas) + (0.0,),
                         time=tuple(math.log(s) / 4 for s in sigmas) + (0.0,))

    def initial_noise_scale(self, grid: NoiseGrid) -> float:
        return grid.sigma[0]  # x = x0 + sigma eps: the top level is sigma_max times unit noise
