"""slurm/train.sbatch on a real SLURM cluster (slurm/local-cluster.sh up): DDP over srun, SIGUSR1, requeue, resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from cluster_helpers import (
    CHECKPOINT_EVERY,
    dcgan_config,
    diffusion_config,
    load_checkpoint,
    write_config,
)
from helpers import REPO

from genart_lightning.cli import main
from genart_lightning.run.cluster import PREEMPTED_CKPT

MAX_STEPS = 60  # 30 DCGAN iterations per rank: past the end of epoch 0 (25 batches per rank) of the 16px shards
PACE_S = 0.5  # per DCGAN iteration: the 20 iterations after the first checkpoint take >= 10 s, time to signal
TASKS = 2
JOB_TIMEOUT_S = 240
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL"}


def cluster_problem() -> str | None:
    """Why jobs cannot run here, or None when a controller answers and the node takes jobs."""
    if shutil.which("sbatch") is None:
        return "Slurm clients not installed; run `slurm/local-cluster.sh install` then `slurm/local-cluster.sh up`"
    try:
        result = subprocess.run(["sinfo", "-h", "-o", "%T %c"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo got no answer in 20 s; start the cluster with `slurm/local-cluster.sh up`"
    if result.returncode != 0:
        return f"no SLURM controller answers ({result.stderr.strip()}); start one with `slurm/local-cluster.sh up`"
    usable = [line for line in result.stdout.split() if line]
    states = result.stdout.split()[0::2]
    cpus = [int(c) for c in result.stdout.split()[1::2] if c.isdigit()]
    if not usable or not any(s.rstrip("*~#") in ("idle", "mixed", "allocated") for s in states):
        return f"no SLURM node takes jobs (states: {states}); see `slurm/local-cluster.sh status`"
    if max(cpus, default=0) < TASKS:
        return f"the SLURM node has {max(cpus, default=0)} CPUs; these tests run {TASKS}-task jobs"
    return None


@pytest.fixture(scope="module")
def cluster() -> None:
    problem = cluster_problem()
    if problem:
        pytest.skip(problem)


def submit(config: Path, run_dir: Path, log: Path) -> str:
    """`sbatch slurm/train.sbatch CONFIG` from the repo root as a user would, 2 tasks on one node."""
    result = subprocess.run(
        ["sbatch", "--parsable", f"--ntasks-per-node={TASKS}", "--cpus-per-task=1", "--job-name=genart-test",
         f"--output={log}", "slurm/train.sbatch", str(config)],
        cwd=REPO, env={**os.environ, "GENART_RUN_DIR": str(run_dir), "PYTHONPATH": str(REPO / "tests")},
        capture_output=True, text=True,
    )
    assert result.returncode == 0, f"sbatch failed: {result.stderr}"
    return result.stdout.strip().split(";")[0]


def job(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, ...)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def wait_until(condition: Callable[[], bool], what: str, job_id: str, log: Path) -> None:
    """Poll `condition` (the job runs in other processes) until true; fail with the job log after the timeout."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline or job(job_id).get("JobState") in FINISHED - {"COMPLETED"}:
            subprocess.run(["scancel", job_id])
            tail = log.read_text()[-4000:] if log.exists() else "(no log)"
            pytest.fail(f"job {job_id}: {what} did not happen ({job(job_id).get('JobState')}); log:\n{tail}")
        time.sleep(0.5)


def finished(job_id: str) -> bool:
    return job(job_id).get("JobState") in FINISHED


@pytest.fixture(scope="module")
def reference_job(cluster: None, shapes_shards_16px: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One uninterrupted 2-task job of slurm/train.sbatch (DDP over gloo on CPU), unpaced; `paced_config` is the same
    run slowed down for the job that gets interrupted (pacing sleeps change no number)."""
    tmp = tmp_path_factory.mktemp("slurm_reference")
    config = dcgan_config(shapes_shards_16px, tmp / "unused", MAX_STEPS)
    reference = write_config(config, tmp / "dcgan.yaml")
    config["trainer"]["callbacks"] = [{"class_path": "cluster_helpers.PaceSteps", "init_args": {"seconds": PACE_S}}]
    paced = write_config(config, tmp / "dcgan_paced.yaml")
    run_dir, log = tmp / "run", tmp / "job.out"
    job_id = submit(reference, run_dir, log)  # runs beside the tests' own jobs; `completed` waits for it
    return {"job_id": job_id, "run_dir": run_dir, "log": log, "paced_config": paced}


def completed(reference: dict) -> dict:
    """The reference job's `scontrol show job` once it has finished."""
    wait_until(lambda: finished(reference["job_id"]), "completion", reference["job_id"], reference["log"])
    return job(reference["job_id"])


@pytest.mark.slurm
@pytest.mark.slow
def test_sigusr1_requeues_and_the_job_resumes_to_the_uninterrupted_result(reference_job: dict, tmp_path: Path) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job_id = submit(reference_job["paced_config"], run_dir, log)
    first_checkpoint = run_dir / "checkpoints" / "last.ckpt"
    wait_until(first_checkpoint.exists, f"a checkpoint at step {CHECKPOINT_EVERY}", job_id, log)
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)  # what --signal=USR1@90 sends before the limit
    wait_until(lambda: int(job(job_id).get("Restarts", 0)) >= 1, "the requeue", job_id, log)
    wait_until(lambda: finished(job_id), "completion after the requeue", job_id, log)
    info, text = job(job_id), log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-3000:]

    preempted = load_checkpoint(run_dir / "checkpoints" / PREEMPTED_CKPT)
    step = preempted["global_step"]
    assert CHECKPOINT_EVERY <= step < MAX_STEPS and step % 2 == 0  # at a GAN iteration boundary
    final = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert completed(reference_job)["JobState"] == "COMPLETED"
    reference = load_checkpoint(reference_job["run_dir"] / "checkpoints" / "last.ckpt")
    assert final["global_step"] == reference["global_step"] == MAX_STEPS
    assert final["callbacks"]["Preemption"]["history"] == {"preempted_at": [step], "resumed_at": [step]}
    for rank in range(TASKS):
        assert f"[genart rank {rank}/{TASKS}] resumed at global step {step}" in text, text[-3000:]
    # Both ranks got back their weights, optimizers, EMA, data position and RNG streams: same result as the
    # job that was never interrupted.
    different = [k for k, v in reference["state_dict"].items() if not torch.equal(v, final["state_dict"][k])]
    assert not different, f"differ from the uninterrupted job after a save at step {step}: {different[:5]}; log:\n{text[-3000:]}"


@pytest.mark.slurm
@pytest.mark.slow
def test_two_task_job_trains_ddp_under_slurm_environment(reference_job: dict) -> None:
    info = completed(reference_job)
    log, ckpt_dir = reference_job["log"].read_text(), reference_job["run_dir"] / "checkpoints"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    for rank in range(TASKS):  # each srun task is one rank, set up by Lightning's SLURMEnvironment
        assert f"[genart rank {rank}/{TASKS}] SLURMEnvironment" in log, log[-3000:]
    provenance = json.loads((ckpt_dir / "provenance.json").read_text())
    assert provenance["cluster_environment"] == "SLURMEnvironment" and provenance["world_size"] == TASKS
    assert provenance["slurm_job_id"] == reference_job["job_id"]
    final = load_checkpoint(ckpt_dir / "last.ckpt")
    assert final["global_step"] == MAX_STEPS
    ranks = final["callbacks"]["RankState"]["ranks"]  # each rank's own random stream and data position
    assert len(ranks) == TASKS and not torch.equal(ranks[0]["rng"]["torch"], ranks[1]["rng"]["torch"])
    assert ranks[0]["loaders"] != ranks[1]["loaders"]


DIFFUSION_STEPS = 70  # 2 ranks x 14 batches per epoch: the job crosses 5 epoch ends and validates every 7 steps
DIFFUSION_PACE_S = 0.4


@pytest.fixture(scope="module")
def diffusion_job_config(cluster: None, shapes_shards_16px: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The configuration of the report in the reliability issue, scaled down: text-conditional pixel diffusion with
    its text tower trained along, 1 loader worker, deterministic, and its uninterrupted 2-task job."""
    tmp = tmp_path_factory.mktemp("slurm_diffusion")
    config = diffusion_config(shapes_shards_16px, tmp / "unused", DIFFUSION_STEPS, val_every=7)
    config["data"]["init_args"]["num_workers"] = 1
    reference = write_config(config, tmp / "ddpm.yaml")
    config["trainer"]["callbacks"] = [{"class_path": "cluster_helpers.PaceSteps", "init_args": {"seconds": DIFFUSION_PACE_S}}]
    paced = write_config(config, tmp / "ddpm_paced.yaml")
    run_dir, log = tmp / "reference", tmp / "reference.out"
    job_id = submit(reference, run_dir, log)  # runs beside the interrupted job; `completed` waits for it
    return {"paced_config": paced, "job_id": job_id, "log": log, "run_dir": run_dir}


def step_of(checkpoint: Path) -> int:
    """Global step of a checkpoint the job may be rewriting (atomically), -1 while there is none."""
    try:
        return load_checkpoint(checkpoint)["global_step"]
    except (FileNotFoundError, RuntimeError, EOFError):
        return -1


@pytest.mark.slurm
@pytest.mark.slow
def test_diffusion_job_interrupted_by_usr1_requeue_and_usr1_ends_as_the_uninterrupted_job(diffusion_job_config: dict,
                                                                                           tmp_path: Path) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    last, preempted = run_dir / "checkpoints" / "last.ckpt", run_dir / "checkpoints" / PREEMPTED_CKPT
    job_id = submit(diffusion_job_config["paced_config"], run_dir, log)
    interruptions = {"USR1": ["scancel", "--signal=USR1", job_id],  # the time-limit warning: the callback requeues
                     "requeue": ["scontrol", "requeue", job_id]}  # SIGTERM, then SIGKILL after KillWait; SLURM requeues
    for restarts, kind in enumerate(("USR1", "requeue", "USR1"), start=1):
        def trained_on(restarts: int = restarts) -> bool:  # this restart resumed on both ranks and saved once since
            resumed = log.exists() and log.read_text().count("] resumed at global step") >= (restarts - 1) * TASKS
            return resumed and step_of(last) > max(step_of(preempted), 0)

        wait_until(trained_on, f"a checkpoint of restart {restarts - 1}", job_id, log)
        subprocess.run(interruptions[kind], check=True)
        wait_until(lambda restarts=restarts: int(job(job_id).get("Restarts", 0)) >= restarts, f"restart {restarts}",
                   job_id, log)
    wait_until(lambda: finished(job_id), "completion after three interruptions", job_id, log)
    text = log.read_text()
    assert job(job_id)["JobState"] == "COMPLETED" and job(job_id)["Restarts"] == "3", text[-3000:]
    assert text.count("SIGTERM: saved") == TASKS, text[-3000:]  # both ranks saved within KillWait on the requeue
    final = load_checkpoint(last)
    history = final["callbacks"]["Preemption"]["history"]
    assert len(history["preempted_at"]) == 3 and history["resumed_at"] == history["preempted_at"], history
    # every restart began at the step its save was made: no optimizer step was done twice, none was lost
    assert completed(diffusion_job_config)["JobState"] == "COMPLETED", diffusion_job_config["log"].read_text()[-3000:]
    reference = load_checkpoint(diffusion_job_config["run_dir"] / "checkpoints" / "last.ckpt")
    assert final["global_step"] == reference["global_step"] == DIFFUSION_STEPS
    different = [k for k, v in reference["state_dict"].items() if not torch.equal(v, final["state_dict"][k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted job: {different[:3]}; log:\n{text[-3000:]}"


def test_submit_helper_builds_the_sbatch_line(capsys: pytest.CaptureFixture) -> None:
    config = "tests/cluster_helpers.py"  # any existing file stands in for an experiment YAML here
    main(["slurm", "submit", "--nodes", "2", "--gpus-per-node", "4", "--time", "24:00:00", "--dry-run",
          config, "--trainer.max_steps=100"])
    line = capsys.readouterr().out.split()
    assert line[:5] == ["sbatch", "--job-name=cluster_helpers", "--nodes=2", "--ntasks-per-node=4",
                        f"--output={REPO}/slurm/logs/%x-%j.out"]
    assert "--gpus-per-node=4" in line and "--time=24:00:00" in line
    assert line[-3:] == [str(REPO / "slurm" / "train.sbatch"), config, "--trainer.max_steps=100"]
    with pytest.raises(SystemExit, match="config not found: missing.yaml"):
        main(["slurm", "submit", "--dry-run", "missing.yaml"])
