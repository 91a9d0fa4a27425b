"""What the network predicts (eps, v or x0) and the conversions between them, as pure tensor functions.

Notation: x_t = sqrt(a) x0 + sqrt(1 - a) eps with a = alphas_cumprod[t];
v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022).
"""

from __future__ import annotations

from torch import Tensor

PREDICTIONS = ("eps", "v", "x0")


def check_prediction(prediction: str) -> str:
    """Return `prediction` if known, else fail with the choices."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r} (prediction=); choose one of {', '.join(PREDICTIONS)}")
    return prediction


def _bcast(a: Tensor, like: Tensor) -> Tensor:
    """Per-sample scalars [B] (or one scalar) -> shape broadcastable against `like` [B, ...], in its dtype."""
    a = a.to(device=like.device, dtype=like.dtype)
    return a.reshape(-1, *([1] * (like.dim() - 1))) if a.dim() else a


def q_sample(x0: Tensor, alpha_bar: Tensor, noise: Tensor) -> Tensor:
    """Noise clean data to level alpha_bar: the forward process q(x_t | x0)."""
    a = _bcast(alpha_bar, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def training_target(x0: Tensor, noise: Tensor, alpha_bar: Tensor, prediction: str) -> Tensor:
    """The regression target of the network for one parameterization."""
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    a = _bcast(alpha_bar, x0)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def to_x0(output: Tensor, x_t: Tensor, alpha_bar: Tensor, prediction: str) -> Tensor:
    """Clean-data estimate from a network output."""
    if prediction == "x0":
        return output
    a = _bcast(alpha_bar, x_t)
    if prediction == "v":
        return a.sqrt() * x_t - (1 - a).sqrt() * output
    return (x_t - (1 - a).sqrt() * output) / a.sqrt()


def to_eps(output: Tensor, x_t: Tensor, alpha_bar: Tensor, prediction: str) -> Tensor:
    """Noise estimate from a network output."""
    if prediction == "eps":
        return output
    a = _bcast(alpha_bar, x_t)
    if prediction == "v":
        return (1 - a).sqrt() * x_t + a.sqrt() * output
    return (x_t - a.sqrt() * output) / (1 - a).sqrt()


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
