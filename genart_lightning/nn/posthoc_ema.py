"""Power-function EMA and its post-hoc reconstruction (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", EDM2, section 3 and appendix C), written from the paper's equations.

A power-function EMA at step T averages the weights of steps t <= T with density (g + 1) t^g / T^(g + 1); its
relative width sigma_rel (the profile's standard deviation over its length) fixes the exponent g:
sigma_rel^2 = (g + 1) / ((g + 2)^2 (g + 3)). It is tracked step by step with beta_t = (1 - 1/t)^(g + 1). Snapshots
of two such EMAs, saved every K steps, span many profiles: any target (T*, g*) is approximated by the combination
of snapshot profiles closest to it in L2 over t, whose coefficients solve the normal equations A x = b with the
profiles' inner products in closed form:
    <p_a, p_b> = (g_a + 1)(g_b + 1) m^(g_a + g_b + 1) / ((g_a + g_b + 1) T_a^(g_a + 1) T_b^(g_b + 1)),  m = min(T_a, T_b).
The same coefficients combine the snapshots' weights into the target EMA's weights.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from genart_lightning.nn.ema import ema_update


def gamma_of(sigma_rel: float) -> float:
    """The power exponent g >= 0 of a profile of relative width `sigma_rel` (by bisection: for g >= 0, sigma_rel falls
    monotonically from 0.289 at g = 0, the plain running mean, towards 0)."""
    if not 0 < sigma_rel <= gamma_to_sigma(0.0):
        raise ValueError(f"sigma_rel {sigma_rel} is outside (0, {gamma_to_sigma(0.0):.3f}]; EDM2 uses 0.01 to 0.25")
    low, high = 0.0, 1e7
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if gamma_to_sigma(middle) > sigma_rel else (low, middle)
    return (low + high) / 2


def gamma_to_sigma(gamma: float) -> float:
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def power_beta(gamma: float, step: int) -> float:
    """The EMA decay at (1-based) step `step` that keeps the average a power function of exponent `gamma`."""
    return (1 - 1 / step) ** (gamma + 1)


def profile_inner(t_a: float, g_a: float, t_b: float, g_b: float) -> float:
    """<p_a, p_b> of two normalised power profiles ending at t_a and t_b (see the module docstring)."""
    m = min(t_a, t_b)
    log = (g_a + g_b + 1) * math.log(m) - (g_a + 1) * math.log(t_a) - (g_b + 1) * math.log(t_b)
    return (g_a + 1) * (g_b + 1) / (g_a + g_b + 1) * math.exp(log)


def coefficients(snapshots: list[tuple[int, float]], target: tuple[int, float]) -> np.ndarray:
    """Weights of the snapshots (step, sigma_rel) whose combination best approximates the target's profile, summing
    to one (a combination of averages stays an average)."""
    gammas = [gamma_of(s) for _, s in snapshots]
    steps = [float(t) for t, _ in snapshots]
    a = np.array([[profile_inner(ti, gi, tj, gj) for tj, gj in zip(steps, gammas, strict=True)]
                  for ti, gi in zip(steps, gammas, strict=True)])
    b = np.array([profile_inner(ti, gi, float(target[0]), gamma_of(target[1])) for ti, gi in zip(steps, gammas, strict=True)])
    x = np.linalg.lstsq(a, b, rcond=None)[0]  # A is often near-singular (neighbouring snapshots look alike)
    return x / x.sum()


class PowerEMA:
    """Power-function EMAs of `net`'s state, one per sigma_rel (floating tensors averaged, others copied)."""

    def __init__(self, net: nn.Module, sigma_rels: tuple[float, ...]) -> None:
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = [gamma_of(s) for s in self.sigma_rels]
        self.averages = [{k: v.detach().clone().float() for k, v in net.state_dict().items()} for _ in self.sigma_rels]

    @torch.no_grad()
    def update(self, net: nn.Module, step: int) -> None:
        """Fold in `net`'s weights after its `step`-th (1-based) optimizer step, with the EMA's own fused update
        (`nn/ema.py`) at this step's power-function decay; integer tensors are copied."""
        current = net.state_dict()
        for gamma, average in zip(self.gammas, self.averages, strict=True):
            for floating in (True, False):
                names = [k for k, v in average.items() if v.is_floating_point() == floating]
                if names:
                    ema_update([average[k] for k in names], [current[k].detach().to(average[k].dtype) for k in names],
                               None, power_beta(gamma, step))

    def state_dict(self) -> dict:
        return {"sigma_rels": list(self.sigma_rels), "averages": self.averages}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["sigma_rels"]) != self.sigma_rels:
            raise ValueError(f"the checkpoint tracks post-hoc EMA profiles {state['sigma_rels']}, the config "
                             f"{list(self.sigma_rels)}; resume with the profiles it was started with")
        self.averages = state["averages"]
