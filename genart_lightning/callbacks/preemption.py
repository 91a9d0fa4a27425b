"""Stop cleanly on SLURM's warning signal: checkpoint at a step boundary on every rank, requeue, exit."""

from __future__ import annotations

import os
import signal
import socket
import threading
from types import FrameType
from typing import Any

import lightning as L

from genart_lightning.run.cluster import (
    PREEMPTED_CKPT,
    checkpoint_dir,
    cluster_environment_name,
    rank_message,
    requeue,
    slurm_job_id,
)


class Preemption(L.Callback):
    """On `signal` (SIGUSR1 from `#SBATCH --signal=USR1@90` or `scancel -s USR1`) save and requeue.

    The handler only sets a flag: saving inside a signal handler can hang (Lightning #21406). Every
    `check_every_n_steps` batches all ranks agree on the flag (any rank may be the one signalled), then
    all of them write `<checkpoint dir>/preempted.ckpt` (Trainer.save_checkpoint has a barrier), rank 0
    runs `scontrol requeue` when inside a SLURM job, and training stops. A batch boundary comes after a
    whole training_step, so a GAN iteration (D and G updates) is never split. Installing this handler
    before Lightning's signal connector runs keeps Lightning from installing its own saving handler.
    """

    def __init__(self, signal: str = "SIGUSR1", check_every_n_steps: int = 10, requeue: bool = True) -> None:
        """`check_every_n_steps` counts training batches: the agreement is an all-reduce, a GPU sync, so not every step."""
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1, got {check_every_n_steps} (--preemption.check_every_n_steps)")
        self.signum = _parse_signal(signal)
        self.check_every_n_steps = check_every_n_steps
        self.requeue = requeue
        self.requested = False
        self._batches = 0
        self._previous_handler: Any = None
        self._installed = False
        self.history: dict[str, list[int]] = {"preempted_at": [], "resumed_at": []}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return
        self._previous_handler = signal.signal(self.signum, self._on_signal)
        self._installed = True
        rank_message(
            trainer,
            f"{cluster_environment_name(trainer)} on {socket.gethostname()}, SLURM job {slurm_job_id()} "
            f"(restart {os.environ.get('SLURM_RESTART_COUNT', '0')}); {signal.Signals(self.signum).name} -> checkpoint"
            + (" and requeue" if self.requeue else ""),
        )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._installed:
            signal.signal(self.signum, self._previous_handler)
            self._installed = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path:
            self.history["resumed_at"].append(trainer.global_step)
            rank_message(trainer, f"resumed at global step {trainer.global_step} from {trainer.ckpt_path}")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._batches += 1
        if self._batches % self.check_every_n_steps:
            return
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        path = checkpoint_dir(trainer) / PREEMPTED_CKPT
        self.history["preempted_at"].append(trainer.global_step)
        trainer.save_checkpoint(path)
        rank_message(trainer, f"{signal.Signals(self.signum).name}: saved {path} at global step {trainer.global_step}")
        job_id = slurm_job_id()
        if self.requeue and job_id and trainer.is_global_zero:
            requeue(job_id)
        trainer.should_stop = True
        self.requested = False

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {key: list(value) for key, value in state_dict["history"].items()}


def stopped_by_preemption(trainer: L.Trainer) -> bool:
    """Did a Preemption callback stop this fit at its current step (checkpoint written, job requeued)?"""
    return any(
        trainer.global_step in cb.history["preempted_at"] for cb in trainer.callbacks if isinstance(cb, Preemption)
    )


def _parse_signal(name: str) -> int:
    """`SIGUSR1`, `USR1` or a number -> signal number, with a clear error for anything else."""
    try:
        return int(name) if name.isdigit() else signal.Signals["SIG" + name.upper().removeprefix("SIG")].value
    except KeyError:
        raise ValueError(f"unknown signal {name!r} for --preemption.signal; use e.g. SIGUSR1 or SIGTERM") from None
