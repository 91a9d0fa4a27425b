"""What a diffusion process is: pure math with no Lightning, chosen in YAML (`class_path` / `init_args`).

A process owns how clean data is noised in training and what the network regresses (`loss`), how a network
output turns back into a clean-data estimate (`denoiser`), and the noise levels its samplers walk (`grid`).
The model around it owns the network, conditioning, guidance, EMA and the optimizer; a new process is one file
in this package subclassing `Process`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from genart_lightning.diffusion.samplers import Denoiser, Level, NoiseGrid, check_sampler

Network = Callable[[Tensor, Tensor], Tensor]
"""`net(x_in, time) -> raw output`: the backbone with its conditioning already bound; `time` is a float tensor [B]."""


def bcast(values: Tensor, like: Tensor) -> Tensor:
    """Per-sample scalars [B] -> shape [B, 1, ...] broadcastable against `like`, in its dtype and device."""
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def normal_quantile(u: Tensor) -> Tensor:
    """Phi^-1(u): maps uniform draws (or evenly spread quantiles) to standard-normal ones."""
    return math.sqrt(2.0) * torch.erfinv(2 * u.clamp(1e-6, 1 - 1e-6) - 1)


BULK_SD = 3.0
"""Validation's log-SNR bins span the central Phi(-3)..Phi(3) (99.73%) of a process's training levels: its bulk."""


class Process:
    """Base class of diffusion processes; configs may name its subclasses only.

    Subclasses keep their init arguments as same-named attributes (the model saves them to rebuild the process).
    """

    name: str = "process"
    samplers: tuple[str, ...] = ()
    """Names in `SAMPLERS` this process can drive, the first being its usual choice."""

    def loss(self, net: Network, x0: Tensor, noise: Tensor, u: Tensor, weighted: bool = True) -> Tensor:
        """Per-sample training loss [B] at the noise levels of quantiles `u` [B] in (0, 1) of the training density.

        Training passes uniform draws; validation passes evenly spread quantiles, so it always sees the same levels.
        `weighted=False` drops any per-level weight the process trains with (validation loss comparable over runs).
        """
        raise NotImplementedError

    def denoiser(self, net: Network) -> Denoiser:
        """`denoise(x, level) -> x0 estimate` from the raw network."""
        raise NotImplementedError

    def grid(self, sampler: str, steps: int, shape: tuple[int, ...]) -> NoiseGrid:
        """The `steps` levels `sampler` walks for samples of `shape` [C, H, W]."""
        raise NotImplementedError

    def level(self, log_snr: float) -> Level:
        """The level whose signal-to-noise ratio alpha^2 / sigma^2 is exp(log_snr): one axis to compare processes on."""
        raise NotImplementedError

    def log_snr(self, u: Tensor, shape: tuple[int, ...]) -> Tensor:
        """log(alpha^2 / sigma^2) of the levels `loss` trains at for quantiles `u` [B] and data of `shape`."""
        raise NotImplementedError

    def quantile(self, log_snr: Tensor, shape: tuple[int, ...]) -> Tensor:
        """Quantiles u [B] (float64) at which `loss` trains at these log-SNRs, the inverse of `log_snr`."""
        raise NotImplementedError

    def log_snr_range(self, shape: tuple[int, ...]) -> tuple[float, float]:
        """(lowest, highest) log-SNR of the central 99.73% of training levels (quantiles Phi(-3), Phi(3))."""
        u = torch.special.ndtr(torch.tensor([BULK_SD, -BULK_SD], dtype=torch.float64))  # log-SNR falls as u grows
        low, high = self.log_snr(u, shape).tolist()
        return low, high

    def log_snr_bins(self, bins: int, shape: tuple[int, ...]) -> list[float]:
        """Edges of `bins` equal-width log-SNR bins over `log_snr_range`, noisiest first (bins + 1 floats)."""
        low, high = self.log_snr_range(shape)
        return torch.linspace(low, high, bins + 1, dtype=torch.float64).tolist()

    def check_sampler(self, sampler: str) -> None:
        """One line naming this process's samplers when `sampler` is not one of them."""
        check_sampler(sampler, self.samplers, self.name)

    def check_steps(self, steps: int) -> None:
        if steps < 1:
            raise ValueError(f"steps={steps} is out of range; use at least 1 sampling step")

    def initial_noise_scale(self, grid: NoiseGrid) -> float:
        """Factor of the unit Gaussian noise sampling starts from (1 where the top level keeps unit variance)."""
        return 1.0
