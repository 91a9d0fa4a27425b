"""Where a run is on the cluster: its SLURM job, its checkpoint directory, per-rank messages, requeue."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L

PREEMPTED_CKPT = "preempted.ckpt"
"""File name of the checkpoint written on the signal, in the run's checkpoint directory."""


def checkpoint_dir(trainer: L.Trainer) -> Path:
    """Directory the run's ModelCheckpoint writes to (where a restarted run looks for checkpoints)."""
    callback = trainer.checkpoint_callback
    dirpath = getattr(callback, "dirpath", None)
    return Path(dirpath) if dirpath else Path(trainer.default_root_dir) / "checkpoints"


def rank_message(trainer: L.Trainer, text: str) -> None:
    """One line on stderr from every rank (job logs show what each rank did; rank_zero_info would hide it)."""
    print(f"[genart rank {trainer.global_rank}/{trainer.world_size}] {text}", file=sys.stderr, flush=True)


def cluster_environment_name(trainer: L.Trainer) -> str | None:
    """Which Lightning ClusterEnvironment set up the ranks (SLURMEnvironment under srun); None on one device."""
    env = getattr(trainer.strategy, "cluster_environment", None)
    return type(env).__name__ if env is not None else None


def launcher_ranks() -> tuple[int, int, int]:
    """(global rank, world size, local rank) that torchrun or srun gave this process, before any process group
    exists (tools that split work over ranks without communicating); (0, 1, 0) when launched alone."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    for environment in (TorchElasticEnvironment, SLURMEnvironment):
        # SLURM's detect() warns outside srun, so only ask it inside a job
        if (environment is TorchElasticEnvironment or "SLURM_NTASKS" in os.environ) and environment.detect():
            env = environment()
            return env.global_rank(), env.world_size(), env.local_rank()
    return 0, 1, 0


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` needs (array tasks as JOB_TASK), or None outside a SLURM job."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def requeue(job_id: str) -> None:
    """Put the job back in the queue; SLURM then ends this allocation and restarts the batch script."""
    if not re.fullmatch(r"[0-9]+(_[0-9]+)?", job_id):
        raise ValueError(f"unexpected SLURM job id {job_id!r} in the environment; cannot requeue")
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        print(
            f"[genart] scontrol requeue {job_id} failed ({result.stderr.strip()}); "
            "submit with --requeue and check JobRequeue in slurm.conf. Resubmit to resume from the checkpoint.",
            file=sys.stderr,
            flush=True,
        )
