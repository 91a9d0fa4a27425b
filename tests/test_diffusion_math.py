"""Schedules, parameterizations, samplers and guidance checked against closed forms, without any training."""

from __future__ import annotations

import pytest
import torch

from genart_lightning.diffusion.guidance import classifier_free_guidance
from genart_lightning.diffusion.parameterization import (
    PREDICTIONS,
    min_snr_weight,
    q_sample,
    to_eps,
    to_x0,
    training_target,
)
from genart_lightning.diffusion.samplers import SAMPLERS, run_sampler, sample_ddim, sample_ddpm, x0_denoiser
from genart_lightning.diffusion.schedules import make_schedule, snr

SCHEDULES = [("linear", False), ("cosine", False), ("cosine", True), ("scaled_linear", True)]


def _combos():
    for name, zts in SCHEDULES:
        for prediction in PREDICTIONS:
            if not (zts and prediction == "eps"):  # eps cannot express x0 at SNR 0; the family refuses it
                yield name, zts, prediction


def oracle(alphas_cumprod: torch.Tensor, prediction: str, x0_of):
    """Network that returns the exact eps / v / x0 given the true clean-data estimate x0_of(x_t, alpha_bar)."""

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = alphas_cumprod[t].view(-1, *[1] * (x.dim() - 1))
        x0 = x0_of(x, a)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return training_target(x0, eps, alphas_cumprod[t], prediction)

    return model


def test_schedules_are_decreasing_and_zero_terminal_snr_rescales():
    for name in ("linear", "scaled_linear", "cosine"):
        a = make_schedule(name, 1000)
        assert a.shape == (1000,) and (a.diff() < 0).all() and 0 < a[-1] < a[0] < 1
        z = make_schedule(name, 1000, zero_terminal_snr=True)
        assert z[-1] == 0 and torch.isclose(z[0], a[0]) and (z.diff() < 0).all()
        assert snr(z)[-1] == 0
    with pytest.raises(ValueError, match="unknown noise schedule 'quadratic'"):
        make_schedule("quadratic")


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_conversions_invert_the_forward_process(prediction):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    alpha_bar = make_schedule("cosine", 1000)[torch.tensor([0, 10, 200, 500, 900, 999])]
    x_t = q_sample(x0, alpha_bar, eps)
    out = training_target(x0, eps, alpha_bar, prediction)
    torch.testing.assert_close(to_x0(out, x_t, alpha_bar, prediction), x0)
    torch.testing.assert_close(to_eps(out, x_t, alpha_bar, prediction), eps)


def test_min_snr_weight_is_the_same_x0_space_weight_for_every_prediction():
    alpha_bar = make_schedule("linear", 1000)[::50]
    s = snr(alpha_bar)
    expected = s.clamp(max=5.0)
    torch.testing.assert_close(min_snr_weight(alpha_bar, "x0", 5.0), expected)
    torch.testing.assert_close(min_snr_weight(alpha_bar, "eps", 5.0) * s, expected)
    torch.testing.assert_close(min_snr_weight(alpha_bar, "v", 5.0) * (s + 1), expected)
    assert (min_snr_weight(alpha_bar, "v", None) == 1).all()


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize(("schedule", "zts", "prediction"), list(_combos()))
def test_every_sampler_recovers_a_single_point_dataset(sampler, schedule, zts, prediction):
    """With a one-point dataset the exact model predicts that point; any correct sampler must land on it."""
    ac = make_schedule(schedule, 1000, zts)
    point = torch.linspace(-0.9, 0.9, 2 * 3 * 4 * 4, dtype=torch.float64).reshape(2, 3, 4, 4)
    model = oracle(ac, prediction, lambda x, a: point.expand_as(x))
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(point.shape, generator=g, dtype=torch.float64)
    for steps in (1, 7, 50):
        out = run_sampler(sampler, x0_denoiser(model, ac, prediction), noise, ac, steps, eta=0.5, generator=g)
        torch.testing.assert_close(out, point, atol=1e-6, rtol=0)


def _gaussian_data(mu: float, s: float):
    """Exact E[x0 | x_t] for data ~ N(mu, s^2): the best possible denoiser, known in closed form."""
    return lambda x, a: mu + a.sqrt() * s**2 / (a * s**2 + 1 - a) * (x - a.sqrt() * mu)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ode_samplers_converge_to_the_exact_flow_at_their_order(prediction):
    """Gaussian data: the probability-flow ODE is an affine map; DDIM converges at order 1, DPM-Solver++(2M) at 2."""
    mu, s = 0.7, 0.3
    ac = make_schedule("cosine", 1000)
    denoise = x0_denoiser(oracle(ac, prediction, _gaussian_data(mu, s)), ac, prediction)
    noise = torch.randn(2000, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a_T = ac[-1]
    exact = mu + s * (noise - a_T.sqrt() * mu) / (a_T * s**2 + 1 - a_T).sqrt()
    errors = {
        name: [float((run_sampler(name, denoise, noise, ac, steps) - exact).abs().max()) for steps in (100, 200)]
        for name in ("ddim", "dpmpp_2m")
    }
    assert errors["ddim"][1] < 0.02 and 1.6 < errors["ddim"][0] / errors["ddim"][1] < 2.5, errors
    assert errors["dpmpp_2m"][1] < 0.005 and errors["dpmpp_2m"][0] / errors["dpmpp_2m"][1] > 3.0, errors


def test_ddpm_reaches_the_data_distribution_and_equals_ddim_eta_one():
    mu, s = -0.4, 0.5
    ac = make_schedule("linear", 1000)
    denoise = x0_denoiser(oracle(ac, "eps", _gaussian_data(mu, s)), ac, "eps")
    noise = torch.randn(5000, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = sample_ddpm(denoise, noise, ac, 250, generator=torch.Generator().manual_seed(1))
    # sampling error ~0.007; ancestral sampling with 250 of 1000 steps shrinks the std by ~0.015
    assert abs(float(x.mean()) - mu) < 0.02 and abs(float(x.std()) - s) < 0.03
    y = sample_ddim(denoise, noise, ac, 250, eta=1.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(x, y)  # DDIM's eta=1 noise is DDPM's posterior noise (Song et al. 2021)


def test_ddim_eta_zero_is_deterministic_and_eta_adds_seeded_noise():
    ac = make_schedule("cosine", 1000)
    denoise = x0_denoiser(oracle(ac, "v", _gaussian_data(0.0, 0.5)), ac, "v")
    noise = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    first = sample_ddim(denoise, noise, ac, 20, eta=0.0, generator=torch.Generator().manual_seed(1))
    second = sample_ddim(denoise, noise, ac, 20, eta=0.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, second)
    noisy = [sample_ddim(denoise, noise, ac, 20, eta=1.0, generator=torch.Generator().manual_seed(k)) for k in (1, 1, 2)]
    assert torch.equal(noisy[0], noisy[1]) and not torch.allclose(noisy[0], noisy[2])


def test_sampler_rejects_bad_step_counts_and_names():
    ac = make_schedule("linear", 100)
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="steps=101 is out of range; use 1..100"):
        run_sampler("ddim", lambda x, t: x, x, ac, 101)
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        run_sampler("euler", lambda x, t: x, x, ac, 10)


class CountingNet(torch.nn.Module):
    """Tiny conditional 'network': output depends on x, t and the conditioning; counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []
        self.w = torch.nn.Linear(4, 4)

    def forward(self, x, t, cond):
        self.calls.append(x.shape[0])
        return x * self.w(cond["pooled"])[:, :, None, None] + t[:, None, None, None] * 1e-3


def test_guidance_is_one_batched_forward_and_scale_one_is_the_conditional_prediction():
    torch.manual_seed(0)
    net = CountingNet()
    x, t = torch.randn(3, 4, 2, 2), torch.tensor([5, 50, 500])
    cond, uncond = {"pooled": torch.randn(3, 4)}, {"pooled": torch.randn(3, 4)}
    with torch.no_grad():
        conditional, unconditional = net(x, t, cond), net(x, t, uncond)
        net.calls.clear()
        torch.testing.assert_close(classifier_free_guidance(net, cond, uncond, 1.0)(x, t), conditional)
        assert net.calls == [6]  # both halves in one forward of twice the batch
        torch.testing.assert_close(classifier_free_guidance(net, cond, uncond, 0.0)(x, t), unconditional)
        guided = classifier_free_guidance(net, cond, uncond, 4.0)(x, t)
        torch.testing.assert_close(guided, unconditional + 4.0 * (conditional - unconditional))
