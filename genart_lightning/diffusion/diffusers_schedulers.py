"""A diffusers scheduler config <-> our process and sampler.

Reading: a pretrained pipeline's `scheduler_config.json` names the noise schedule and parameterisation its model was
trained with; a fine-tune must continue in them, so they become the VP process (beta schedule and range, prediction
type, zero-terminal-SNR rescaling, timestep spacing and offset) and the sampler of ours that walks like the
pipeline's scheduler. Writing: an exported pipeline gets the scheduler whose steps are ours (the pairs that
tests/test_samplers_vs_diffusers.py checks step for step), so it samples what `genart sample` samples.
Plain dicts in and out: this module does not import diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from genart_lightning.diffusion.process import Process
from genart_lightning.diffusion.schedules import DEFAULT_BETAS
from genart_lightning.diffusion.vp import VP

PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
"""diffusers' prediction_type -> ours."""
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
"""diffusers' beta_schedule -> ours (the cosine one is Nichol & Dhariwal's, offset 0.008 and betas capped at 0.999 in both)."""
SAMPLER_OF_SCHEDULER = {"DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "DPMSolverMultistepScheduler": "dpmpp_2m",
                        "EulerDiscreteScheduler": "euler", "HeunDiscreteScheduler": "heun"}
"""The sampler of ours each diffusers VP scheduler corresponds to; others (PNDM, LMS, ...) sample with ddim."""
SCHEDULER_OF_SAMPLER = {sampler: name for name, sampler in SAMPLER_OF_SCHEDULER.items()}


@dataclass(frozen=True)
class SchedulerReading:
    """What a scheduler config means here: the process, the sampler, and a note where the match is not exact."""

    process: VP
    sampler: str
    note: str | None = None


def process_from_scheduler(config: dict[str, Any], where: str = "the scheduler config") -> SchedulerReading:
    """The VP process and sampler of a diffusers discrete-time scheduler config; one line for what we cannot follow."""
    name = config.get("_class_name", "")
    if "FlowMatch" in name:
        raise ValueError(f"{where} is a flow-matching scheduler ({name}); pipelines of flow models (SD3, Flux) are not "
                         "read yet: build the parts one by one (first_stage, backbone) with process: flow")
    prediction = config.get("prediction_type", "epsilon")
    beta_schedule = config.get("beta_schedule", "linear")
    if prediction not in PREDICTIONS:
        raise ValueError(f"{where} has prediction_type {prediction!r}; supported: {', '.join(PREDICTIONS)}")
    if beta_schedule not in BETA_SCHEDULES or config.get("trained_betas") is not None:
        raise ValueError(f"{where} has beta_schedule {beta_schedule!r}{' with trained_betas' if config.get('trained_betas') is not None else ''}; "
                         f"supported: {', '.join(BETA_SCHEDULES)}")
    schedule = BETA_SCHEDULES[beta_schedule]
    betas = {} if schedule == "cosine" else {"beta_start": config.get("beta_start", 0.0001),
                                             "beta_end": config.get("beta_end", 0.02)}
    zero_snr = bool(config.get("rescale_betas_zero_snr", False))
    process = VP(schedule=schedule, timesteps=int(config.get("num_train_timesteps", 1000)), zero_terminal_snr=zero_snr,
                 prediction=PREDICTIONS[prediction], timestep_spacing=config.get("timestep_spacing", "leading"),
                 steps_offset=int(config.get("steps_offset", 0)), **betas)
    sampler = SAMPLER_OF_SCHEDULER.get(name, "ddim")
    note = None
    if name not in SAMPLER_OF_SCHEDULER:
        note = f"{where} names {name or 'no scheduler class'}, which genart has no sampler for; sampling uses ddim"
    elif sampler in ("euler", "heun") and not config.get("use_karras_sigmas"):
        note = f"{where} spaces {name}'s sigmas evenly in time; genart's {sampler} walks Karras sigmas"
    if sampler in ("euler", "heun") and zero_snr:
        sampler = "ddim"  # Karras sigmas need a finite largest sigma
    return SchedulerReading(process, sampler, note)


def scheduler_for(process: Process, sampler: str) -> tuple[str, dict[str, Any]]:
    """The diffusers scheduler class name and config that walk `sampler` over `process` as we do.

    DDIM ends on clean data (`set_alpha_to_one`), never clips, and spaces timesteps as the process does; DPM-Solver++
    is the 2nd-order multistep one ending at sigma 0; euler / heun use Karras sigmas. Only VP processes have such a
    scheduler here; one line otherwise.
    """
    if not isinstance(process, VP):
        raise ValueError(f"a {process.name} process has no diffusers scheduler written by genart yet; export the weights "
                         "(genart export without --diffusers) or train with process: vp")
    if sampler not in SCHEDULER_OF_SAMPLER:
        raise ValueError(f"sampler {sampler!r} has no diffusers scheduler; choose one of {', '.join(SCHEDULER_OF_SAMPLER)}")
    if process.timestep_spacing == "leading" and process.steps_offset != 1:
        raise ValueError(f"'leading' timesteps with steps_offset {process.steps_offset} have no Stable Diffusion "
                         "pipeline: its constructor rewrites steps_offset to 1; train with steps_offset 1 or "
                         "timestep_spacing trailing")
    inverse = {ours: theirs for theirs, ours in PREDICTIONS.items()}
    # steps_offset moves "leading" timesteps only; elsewhere 1, the value SD pipelines would rewrite it to
    config: dict[str, Any] = {"num_train_timesteps": process.timesteps, "prediction_type": inverse[process.prediction],
                              "rescale_betas_zero_snr": process.zero_terminal_snr,
                              "timestep_spacing": process.timestep_spacing, "steps_offset": 1}
    config["beta_schedule"] = {ours: theirs for theirs, ours in BETA_SCHEDULES.items()}[process.schedule]
    if process.schedule in DEFAULT_BETAS:
        default_start, default_end = DEFAULT_BETAS[process.schedule]
        config["beta_start"] = process.beta_start if process.beta_start is not None else default_start
        config["beta_end"] = process.beta_end if process.beta_end is not None else default_end
    if sampler == "ddim":
        config |= {"clip_sample": False, "set_alpha_to_one": True}
    elif sampler == "ddpm":
        config |= {"clip_sample": False}
    elif sampler == "dpmpp_2m":
        config |= {"algorithm_type": "dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero"}
    else:
        config |= {"use_karras_sigmas": True}
    return SCHEDULER_OF_SAMPLER[sampler], config
