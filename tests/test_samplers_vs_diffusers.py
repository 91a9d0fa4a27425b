"""Our samplers against diffusers' schedulers for the same model function, over a whole trajectory (to 1e-4).

diffusers is a test dependency here only; the framework's samplers do not import it.
"""

from __future__ import annotations

import pytest
import torch

from genart_lightning.diffusion.flow import Flow
from genart_lightning.diffusion.samplers import NoiseGrid, check_sampler
from genart_lightning.diffusion.vp import VP

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


def test_ddim_equals_diffusers_ddim_scheduler():
    scheduler = schedulers.DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    scheduler.set_timesteps(STEPS)
    vp = VP(schedule="scaled_linear", prediction="eps")
    grid = vp.grid_at_timesteps(scheduler.timesteps.tolist())
    torch.testing.assert_close(run_ours(vp, "ddim", grid, noise()), run_diffusers(scheduler, noise()), atol=1e-4, rtol=0)


def test_dpmpp_2m_equals_diffusers_multistep_solver():
    scheduler = schedulers.DPMSolverMultistepScheduler(**BETAS, algorithm_type="dpmsolver++", solver_order=2,
                                                       final_sigmas_type="zero")
    scheduler.set_timesteps(STEPS)
    vp = VP(schedule="scaled_linear", prediction="eps")
    grid = vp.grid_at_timesteps(scheduler.timesteps.tolist())
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


def test_flow_euler_equals_diffusers_flow_match_euler_with_the_same_shift():
    scheduler = schedulers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(STEPS)
    flow = Flow(shift=3.0)
    grid = flow.grid_at_times(scheduler.sigmas.double().tolist())
    torch.testing.assert_close(run_ours(flow, "euler", grid, noise()), run_diffusers(scheduler, noise()), atol=1e-4, rtol=0)
