"""Our grids and samplers against diffusers' schedulers for the same model function, over a whole trajectory (to
1e-4): every grid here is built by our process, never copied from the scheduler.

diffusers is a test dependency here only; the framework's samplers do not import it.
"""

from __future__ import annotations

import pytest
import torch

from genart_lightning.diffusion.flow import Flow
from genart_lightning.diffusion.samplers import NoiseGrid, check_sampler
from genart_lightning.diffusion.vp import TIMESTEP_SPACINGS, VP

schedulers = pytest.importorskip("diffusers.schedulers")
STEPS = 20
BETAS = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def model(x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """A fixed non-linear function of input and timestep, standing in for a trained network."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *([1] * (x.dim() - 1))) if torch.is_tensor(t) and t.dim() else float(t)
    return 0.8 * torch.tanh(0.5 * x + 0.001 * t) + 0.1 * x


def noise() -> torch.Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def run_diffusers(scheduler, x: torch.Tensor) -> torch.Tensor:
    """The scheduler's loop from `x`, given in the scheduler's own frame."""
    scale = getattr(scheduler, "scale_model_input", lambda x, t: x)  # the flow scheduler has none
    for t in scheduler.timesteps:
        out = model(scale(x, t), t)
        x = scheduler.step(out, t, x).prev_sample
    return x


def run_ours(process, sampler: str, grid: NoiseGrid, x: torch.Tensor) -> torch.Tensor:
    return check_sampler(sampler)(process.denoiser(lambda x_in, time: model(x_in, time[0])), x, grid)


@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
@pytest.mark.parametrize("steps", [1, 7, 20, 50])
def test_our_timesteps_are_diffusers_ddim_timesteps_of_the_same_spacing(spacing, steps):
    scheduler = schedulers.DDIMScheduler(**BETAS, timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    grid = VP(schedule="scaled_linear", timestep_spacing=spacing).grid("ddim", steps, (3, 8, 8))
    assert list(grid.time[:-1]) == scheduler.timesteps.tolist()


@pytest.mark.parametrize("spacing", ["trailing", "leading"])  # diffusers' DDIM steps to t - T//N, not the next of
def test_ddim_equals_diffusers_ddim_scheduler(spacing):          # its linspace timesteps: no reference for that one
    scheduler = schedulers.DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=True, timestep_spacing=spacing)
    scheduler.set_timesteps(STEPS)
    vp = VP(schedule="scaled_linear", prediction="eps", timestep_spacing=spacing)
    grid = vp.grid("ddim", STEPS, (3, 8, 8))
    torch.testing.assert_close(run_ours(vp, "ddim", grid, noise()), run_diffusers(scheduler, noise()), atol=1e-4, rtol=0)


def test_default_spacing_is_trailing_and_starts_at_the_last_training_step():
    assert VP().grid("ddim", 20, (3, 8, 8)).time[:3] == (999.0, 949.0, 899.0)
    assert VP().grid("ddim", 20, (3, 8, 8)).time[-2:] == (49.0, 0.0)  # the last step denoises from t=49 to clean


def test_dpmpp_2m_equals_diffusers_multistep_solver():  # its "linspace" differs from DDIM's: trailing only
    scheduler = schedulers.DPMSolverMultistepScheduler(**BETAS, algorithm_type="dpmsolver++", solver_order=2,
                                                       final_sigmas_type="zero", timestep_spacing="trailing")
    scheduler.set_timesteps(STEPS)
    vp = VP(schedule="scaled_linear", prediction="eps")
    grid = vp.grid("dpmpp_2m", STEPS, (3, 8, 8))
    assert list(grid.time[:-1]) == scheduler.timesteps.tolist()
    torch.testing.assert_close(run_ours(vp, "dpmpp_2m", grid, noise()), run_diffusers(scheduler, noise()), atol=1e-4, rtol=0)


def test_karras_euler_equals_diffusers_euler_with_karras_sigmas():
    scheduler = schedulers.EulerDiscreteScheduler(**BETAS, use_karras_sigmas=True)
    scheduler.set_timesteps(STEPS)
    vp = VP(schedule="scaled_linear", prediction="eps")
    grid = vp.grid("euler", STEPS, (3, 8, 8))  # our own Karras grid, not diffusers' copied in
    vp_sigmas = [s / a for s, a in zip(grid.sigma, grid.alpha, strict=True)]
    torch.testing.assert_close(torch.tensor(vp_sigmas, dtype=torch.float64), scheduler.sigmas.double(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(grid.time[:-1], dtype=torch.float64), scheduler.timesteps.double(), atol=1e-3, rtol=1e-5)  # theirs: float32
    # diffusers' Euler runs on x / alpha: the same start is our unit noise over alpha (its init_noise_sigma is
    # sigma_max, not sqrt(sigma_max^2 + 1), so its default start is 0.2% quieter than the VP noise the model saw)
    ours, theirs = run_ours(vp, "euler", grid, noise()), run_diffusers(scheduler, noise() / grid.alpha[0])
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_flow_euler_equals_diffusers_flow_match_euler_given_our_times():
    # diffusers' own spacing ends at 1/1000 before its step to 0 (last times 0.0089, 0: the Flow docstring); handed
    # our unshifted times as `sigmas`, it shifts them as we do and walks the same grid.
    flow = Flow(shift=3.0)
    grid = flow.grid("euler", STEPS, (3, 8, 8))
    scheduler = schedulers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(sigmas=[1 - i / STEPS for i in range(STEPS)])
    torch.testing.assert_close(torch.tensor(grid.sigma, dtype=torch.float64), scheduler.sigmas.double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(run_ours(flow, "euler", grid, noise()), run_diffusers(scheduler, noise()), atol=1e-4, rtol=0)
    default = schedulers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    default.set_timesteps(STEPS)
    assert abs(float(default.sigmas[-2]) - 0.0089) < 1e-3 and abs(grid.sigma[-2] - 0.1364) < 1e-3
