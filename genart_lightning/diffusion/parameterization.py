"""What the network predicts (eps, v or x0) and the conversions between them, as pure tensor functions.

Notation: x_t = sqrt(a) x0 + sqrt(1 - a) eps with a = alphas_cumprod[t];
v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor


def _bcast(a: Tensor, like: Tensor) -> Tensor:
    """Per-sample scalars [B] (or one scalar) -> shape broadcastable against `like` [B, ...], in its dtype."""
    a = a.to(device=like.device, dtype=like.dtype)
    return a.reshape(-1, *([1] * (like.dim() - 1))) if a.dim() else a


def q_sample(x0: Tensor, alpha_bar: Tensor, noise: Tensor) -> Tensor:
    """Noise clean data to level alpha_bar: the forward process q(x_t | x0)."""
    a = _bcast(alpha_bar, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


@dataclass(frozen=True)
class Prediction:
    """One parameterization: the network's regression target and the clean data / noise read back from its output.

    `target(x0, eps, a)`; `x0(out, x_t, a)`; `eps(out, x_t, a)`, with `a` alpha_bar broadcast against the data.
    """

    target: Callable[[Tensor, Tensor, Tensor], Tensor]
    x0: Callable[[Tensor, Tensor, Tensor], Tensor]
    eps: Callable[[Tensor, Tensor, Tensor], Tensor]


PREDICTIONS: dict[str, Prediction] = {
    "eps": Prediction(
        target=lambda x0, eps, a: eps,
        x0=lambda out, x, a: (x - (1 - a).sqrt() * out) / a.sqrt(),
        eps=lambda out, x, a: out,
    ),
    "v": Prediction(
        target=lambda x0, eps, a: a.sqrt() * eps - (1 - a).sqrt() * x0,
        x0=lambda out, x, a: a.sqrt() * x - (1 - a).sqrt() * out,
        eps=lambda out, x, a: (1 - a).sqrt() * x + a.sqrt() * out,
    ),
    "x0": Prediction(
        target=lambda x0, eps, a: x0,
        x0=lambda out, x, a: out,
        eps=lambda out, x, a: (x - a.sqrt() * out) / (1 - a).sqrt(),
    ),
}
"""Parameterizations by name; a new one is one entry."""


def check_prediction(prediction: str) -> Prediction:
    """The parameterization called `prediction`, or one line listing the choices."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r} (prediction=); choose one of {', '.join(PREDICTIONS)}")
    return PREDICTIONS[prediction]


def training_target(x0: Tensor, noise: Tensor, alpha_bar: Tensor, prediction: str) -> Tensor:
    """The regression target of the network for one parameterization."""
    return check_prediction(prediction).target(x0, noise, _bcast(alpha_bar, x0))


def to_x0(output: Tensor, x_t: Tensor, alpha_bar: Tensor, prediction: str) -> Tensor:
    """Clean-data estimate from a network output."""
    return check_prediction(prediction).x0(output, x_t, _bcast(alpha_bar, x_t))


def to_eps(output: Tensor, x_t: Tensor, alpha_bar: Tensor, prediction: str) -> Tensor:
    """Noise estimate from a network output."""
    return check_prediction(prediction).eps(output, x_t, _bcast(alpha_bar, x_t))


def min_snr_weight(alpha_bar: Tensor, prediction: str, gamma: float | None) -> Tensor:
    """Per-sample loss weight of Min-SNR-gamma (Hang et al. 2023) for the MSE in `prediction` space.

    The weight min(SNR, gamma) is defined on the x0 loss; dividing by what each parameterization's
    MSE already carries (SNR for eps, SNR + 1 for v) gives the same effective weighting for all.
    `gamma=None` means plain unweighted MSE (weight 1).
    """
    if gamma is None:
        return alpha_bar.new_ones(alpha_bar.shape)
    snr = alpha_bar / (1 - alpha_bar)
    clipped = snr.clamp(max=gamma)
    if prediction == "x0":
        return clipped
    if prediction == "v":
        return clipped / (snr + 1)
    return clipped / snr
