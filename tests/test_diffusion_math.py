"""Processes, parameterizations, samplers and guidance checked against closed forms, without any training."""

from __future__ import annotations

import math

import pytest
import torch

from genart_lightning.diffusion.edm import EDM
from genart_lightning.diffusion.flow import Flow, shift_time
from genart_lightning.diffusion.guidance import classifier_free_guidance
from genart_lightning.diffusion.parameterization import (
    PREDICTIONS,
    min_snr_weight,
    q_sample,
    to_eps,
    to_x0,
    training_target,
)
from genart_lightning.diffusion.process import Process
from genart_lightning.diffusion.samplers import SAMPLERS, NoiseGrid, check_sampler, sample_ddim, sample_ddpm
from genart_lightning.diffusion.schedules import make_schedule, snr
from genart_lightning.diffusion.vp import VP

SCHEDULES = [("linear", False), ("cosine", False), ("cosine", True), ("scaled_linear", True)]


def _vp_processes():
    for name, zts in SCHEDULES:
        for prediction in PREDICTIONS:
            if not (zts and prediction == "eps"):  # eps cannot express x0 at SNR 0; the process refuses it
                yield VP(schedule=name, zero_terminal_snr=zts, prediction=prediction)


PROCESSES = [*_vp_processes(), EDM(), Flow(shift=3.0), Flow(density="uniform")]


def _id(p: Process) -> str:
    return f"{p.name}-" + "-".join(f"{v}" for v in vars(p).values() if isinstance(v, str | bool | float | int))


def ideal_net(process: Process, grid: NoiseGrid, x0_of):
    """The network a process wants, given the true clean-data estimate `x0_of(x, level)`: it reads its level back
    from the time input (looked up in the grid) and returns the process's own training target there."""
    levels = [grid[i] for i in range(grid.steps)]

    def net(x_in: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        level = min(levels, key=lambda lv: abs(lv.time - float(time[0])))  # the network gets time in float32
        if isinstance(process, EDM):
            c_skip, c_out, c_in, _ = (float(c) for c in process.preconditioning(torch.tensor(level.sigma, dtype=torch.float64)))
            x = x_in / c_in
            return (x0_of(x, level) - c_skip * x) / c_out
        x0 = x0_of(x_in, level)
        eps = (x_in - level.alpha * x0) / level.sigma
        if isinstance(process, Flow):
            return eps - x0
        return training_target(x0, eps, torch.tensor(level.alpha**2, dtype=x_in.dtype), process.prediction)

    return net


def run(process: Process, sampler: str, steps: int, noise: torch.Tensor, x0_of, eta: float = 0.0, generator=None):
    """Sample with the process's own grid and denoiser over the ideal network."""
    grid = process.grid(sampler, steps, tuple(noise.shape[1:]))
    denoise = process.denoiser(ideal_net(process, grid, x0_of))
    return check_sampler(sampler)(denoise, noise * process.initial_noise_scale(grid), grid, eta=eta, generator=generator)


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


def test_min_snr_weight_caps_the_x0_space_weight_at_gamma_and_never_removes_high_noise():
    alpha_bar = make_schedule("linear", 1000)[::50]
    s = snr(alpha_bar)
    # x0-space weight = loss weight x what each parameterization's MSE carries: capped at gamma, else unchanged
    torch.testing.assert_close(min_snr_weight(alpha_bar, "eps", 5.0) * s, s.clamp(max=5.0))
    torch.testing.assert_close(min_snr_weight(alpha_bar, "v", 5.0) * (s + 1), (s + 1).clamp(max=5.0))
    torch.testing.assert_close(min_snr_weight(alpha_bar, "x0", 5.0), torch.ones_like(s))
    high_noise = s < 0.01
    assert high_noise.any() and (min_snr_weight(alpha_bar, "v", 5.0)[high_noise] == 1).all()  # v-loss kept in full
    assert (min_snr_weight(alpha_bar, "v", None) == 1).all()


@pytest.mark.parametrize("process", PROCESSES, ids=_id)
def test_every_sampler_of_every_process_recovers_a_single_point_dataset(process):
    """With a one-point dataset the ideal network predicts that point; any correct sampler must land on it."""
    point = torch.linspace(-0.9, 0.9, 2 * 3 * 4 * 4, dtype=torch.float64).reshape(2, 3, 4, 4)
    noise = torch.randn(point.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for sampler in process.samplers:
        for steps in (1, 7, 30):
            out = run(process, sampler, steps, noise, lambda x, level: point.expand_as(x), eta=0.5,
                      generator=torch.Generator().manual_seed(2))
            torch.testing.assert_close(out, point, atol=1e-6, rtol=0, msg=f"{sampler}, {steps} steps")


def _gaussian(mu: float, s: float):
    """Exact E[x0 | x] for data ~ N(mu, s^2) at x = alpha x0 + sigma eps: the best possible denoiser."""
    return lambda x, lv: mu + lv.alpha * s**2 / (lv.alpha**2 * s**2 + lv.sigma**2) * (x - lv.alpha * mu)


# linspace for the timestep samplers: its last step starts at t=0, so the one jump to clean data (first order in every
# multistep solver, diffusers' too) does not hide the solver's order over the rest of the path
ORDERS = [(VP(prediction="v", timestep_spacing="linspace"), "ddim", 1), (VP(prediction="eps"), "euler", 1),
          (VP(prediction="v", timestep_spacing="linspace"), "dpmpp_2m", 2),
          (VP(prediction="eps"), "heun", 2), (EDM(), "euler", 1), (EDM(), "heun", 2), (EDM(), "dpmpp_2m", 2),
          (Flow(shift=3.0), "euler", 1), (Flow(shift=3.0), "heun", 2)]


@pytest.mark.parametrize(("process", "sampler", "order"), ORDERS, ids=lambda v: v if isinstance(v, str) else None)
def test_ode_samplers_converge_to_the_exact_flow_at_their_order(process, sampler, order):
    """Gaussian data: the probability-flow ODE keeps (x - alpha mu) / sqrt(alpha^2 s^2 + sigma^2) constant, so the
    exact end point is known; doubling the steps must cut the error by 2 (first order) or 4 (second order)."""
    mu, s = 0.7, 0.3
    noise = torch.randn(2000, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = process.grid(sampler, 10, (1, 1, 1))
    a0, s0 = grid.alpha[0], grid.sigma[0]
    start = noise * process.initial_noise_scale(grid)
    exact = mu + s * (start - a0 * mu) / math.sqrt(a0**2 * s**2 + s0**2)
    errors = [float((run(process, sampler, n, noise, _gaussian(mu, s)) - exact).abs().max()) for n in (100, 200)]
    ratio = errors[0] / errors[1]
    if order == 1:
        assert 1.6 < ratio < 2.6 and errors[1] < 0.05, errors
    else:
        assert ratio > 3.0 and errors[1] < 0.005, errors


def test_ddpm_reaches_the_data_distribution_and_equals_ddim_eta_one():
    mu, s = -0.4, 0.5
    process = VP(schedule="linear")
    noise = torch.randn(5000, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = process.grid("ddpm", 250, (1, 1, 1))
    denoise = process.denoiser(ideal_net(process, grid, _gaussian(mu, s)))
    x = sample_ddpm(denoise, noise, grid, generator=torch.Generator().manual_seed(1))
    # sampling error ~0.007; ancestral sampling with 250 of 1000 steps shrinks the std by ~0.015
    assert abs(float(x.mean()) - mu) < 0.02 and abs(float(x.std()) - s) < 0.03
    y = sample_ddim(denoise, noise, grid, eta=1.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(x, y)  # DDIM's eta=1 noise is DDPM's posterior noise (Song et al. 2021)


def test_ddim_eta_zero_is_deterministic_and_eta_adds_seeded_noise():
    process = VP(prediction="v")
    grid = process.grid("ddim", 20, (3, 4, 4))
    denoise = process.denoiser(ideal_net(process, grid, _gaussian(0.0, 0.5)))
    noise = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    first = sample_ddim(denoise, noise, grid, eta=0.0, generator=torch.Generator().manual_seed(1))
    second = sample_ddim(denoise, noise, grid, eta=0.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, second)
    noisy = [sample_ddim(denoise, noise, grid, eta=1.0, generator=torch.Generator().manual_seed(k)) for k in (1, 1, 2)]
    assert torch.equal(noisy[0], noisy[1]) and not torch.allclose(noisy[0], noisy[2])


def test_edm_preconditioning_and_loss_are_the_papers_formulas():
    edm = EDM(sigma_data=0.5, p_mean=-1.2, p_std=1.2)  # the paper's CIFAR-10 density
    sigma = torch.tensor([0.002, 0.1, 0.5, 2.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm.preconditioning(sigma)
    torch.testing.assert_close(c_skip, 0.25 / (sigma**2 + 0.25))
    torch.testing.assert_close(c_out, sigma * 0.5 / (sigma**2 + 0.25).sqrt())
    torch.testing.assert_close(c_in, 1 / (sigma**2 + 0.25).sqrt())
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    # ln sigma ~ N(P_mean, P_std^2): the median quantile is exp(P_mean), one std up is exp(P_mean + P_std)
    torch.testing.assert_close(edm.training_sigmas(torch.tensor([0.5, 0.841344746])),
                               torch.tensor([math.exp(-1.2), math.exp(0.0)], dtype=torch.float64), atol=1e-6, rtol=1e-6)
    # the loss is lambda(sigma) |D - x0|^2 with lambda = (sigma^2 + sd^2) / (sigma sd)^2, for any network
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64), torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    u = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    w = torch.randn(2, 3, 3, generator=g, dtype=torch.float64)
    net = lambda x_in, t: torch.tanh(x_in * w + t.view(-1, 1, 1, 1))  # noqa: E731
    s = edm.training_sigmas(u).view(-1, 1, 1, 1)
    x = x0 + s * noise
    skip, out, cin, cnoise = edm.preconditioning(s)
    denoised = skip * x + out * net(cin * x, cnoise.flatten())
    expected = ((s**2 + 0.25) / (s * 0.5) ** 2 * (denoised - x0) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(edm.loss(net, x0, noise, u), expected.float())  # losses are float32


def test_flow_target_times_and_shift_are_rectified_flows():
    flow = Flow(density="logit_normal", logit_mean=0.0, logit_std=1.0, shift=3.0)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(shift_time(t, 3.0), 3 * t / (1 + 2 * t))
    torch.testing.assert_close(flow.training_times(torch.tensor([0.5]), (4, 8, 8)), shift_time(torch.tensor([0.5], dtype=torch.float64), 3.0))
    assert float(Flow(density="uniform").training_times(torch.tensor([0.3]), (4, 8, 8))) == pytest.approx(0.3)
    # SD3's resolution-dependent shift: sqrt(HW) / base times the configured shift
    assert Flow(shift=1.0, shift_base_size=32).effective_shift((4, 64, 64)) == 2.0
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    u = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    seen = {}

    def net(x_t, time):
        seen["x_t"], seen["time"] = x_t, time
        return torch.zeros_like(x_t)

    loss = flow.loss(net, x0, noise, u)
    tt = flow.training_times(u, (2, 4, 4)).float().view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["x_t"], (1 - tt) * x0 + tt * noise)  # linear interpolant
    torch.testing.assert_close(seen["time"], 1000 * tt.flatten())
    torch.testing.assert_close(loss, ((noise - x0) ** 2).flatten(1).mean(1))  # velocity target eps - x0


def test_wrong_sampler_names_list_the_choices_of_the_table_and_of_the_process():
    with pytest.raises(ValueError, match="unknown sampler 'lms' .* the samplers are ddpm, ddim, dpmpp_2m, euler, heun"):
        check_sampler("lms")
    with pytest.raises(ValueError, match="unknown sampler 'ddim' .* the samplers of the flow process are euler, heun"):
        Flow().grid("ddim", 10, (3, 8, 8))
    with pytest.raises(ValueError, match="samplers of the vp process are ddim, ddpm, dpmpp_2m$"):
        VP(zero_terminal_snr=True, prediction="v").check_sampler("heun")  # SNR 0 has no finite Karras sigma
    with pytest.raises(ValueError, match="steps=1001 is out of range; use 1..1000"):
        VP().grid("ddim", 1001, (1, 2, 2))
    assert set(SAMPLERS) == {"ddpm", "ddim", "dpmpp_2m", "euler", "heun"}


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
