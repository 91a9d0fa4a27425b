"""Stop cleanly on SLURM's time-limit warning (SIGUSR1) or preemption / requeue (SIGTERM): checkpoint at an
optimizer-step boundary on every rank, requeue where SLURM will not, exit."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from types import FrameType
from typing import Any

import lightning as L
import torch

from genart_lightning.run.cluster import (
    PREEMPTED_CKPT,
    checkpoint_dir,
    cluster_environment_name,
    rank_message,
    requeue,
    slurm_job_id,
)


class Preemption(L.Callback):
    """On any of `signals` save a checkpoint at an optimizer-step boundary on every rank and stop; requeue on the
    time-limit signal.

    - SIGUSR1 comes from `#SBATCH --signal=USR1@90` (the time limit is near) or `scancel -s USR1`: after saving,
      rank 0 runs `scontrol requeue`.
    - SIGTERM comes from `scontrol requeue`, from preemption on a `PreemptMode=REQUEUE` partition and from
      `scancel`, each followed by SIGKILL after KillWait / GraceTime. SLURM requeues (or cancels) the job itself, so
      the callback only saves and exits. Lightning's own SIGTERM handler would exit without saving; this one
      replaces it when training starts.

    The handler only sets a flag: saving inside a signal handler can hang (Lightning #21406). All ranks agree on the
    flag (any rank may be the one signalled) with one all-reduce at an optimizer-step boundary, never inside a
    gradient-accumulation group nor between a GAN's D and G updates. Then every rank writes
    `<checkpoint dir>/preempted.ckpt` (Trainer.save_checkpoint has a barrier) and training stops.

    The all-reduce is a GPU sync, so it does not run every step. It runs every n optimizer steps, where n is chosen
    from the slowest rank's measured step time so that n steps take at most `agree_within_s`. It is at most
    `check_every_n_steps`, and at least 1. The save therefore starts within max(`agree_within_s`, one step) of the
    signal. With the default 5 s, SLURM's default KillWait of 30 s leaves the save 25 s.
    """

    def __init__(self, signals: list[str] | str = ("SIGUSR1", "SIGTERM"), check_every_n_steps: int = 10,
                 agree_within_s: float = 5.0, requeue: bool = True) -> None:
        """`requeue`: run `scontrol requeue` after a SIGUSR1 save (SLURM requeues by itself after SIGTERM)."""
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1, got {check_every_n_steps} (--preemption.check_every_n_steps)")
        if agree_within_s <= 0:
            raise ValueError(f"agree_within_s must be > 0, got {agree_within_s} (--preemption.agree_within_s)")
        self.signums = [_parse_signal(name) for name in ([signals] if isinstance(signals, str) else signals)]
        self.check_every_n_steps, self.agree_within_s, self.requeue = check_every_n_steps, agree_within_s, requeue
        self.received: int | None = None
        self._received_at: float | None = None
        self.interval = 1  # optimizer steps between agreements; the first one measures the step time
        self._steps = self._steps_at_check = 0
        self._timed_from_check = False
        self._last_global_step = -1
        self._last_check = 0.0
        self._previous_handlers: dict[int, Any] = {}
        self.history: dict[str, list[int]] = {"preempted_at": [], "resumed_at": []}

    @property
    def requested(self) -> bool:
        return self.received is not None

    @requested.setter
    def requested(self, value: bool) -> None:
        self.received, self._received_at = (self.signums[0] if value else None), None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received, self._received_at = signum, time.monotonic()

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.signums:
            previous = signal.signal(signum, self._on_signal)
            self._previous_handlers.setdefault(signum, previous)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._install()  # before Lightning's signal connector: it then leaves SIGUSR1 to this handler
        if slurm_job_id() is None and trainer.world_size == 1:
            return  # a local single-process run: no cluster, job or rank to report
        names = "/".join(signal.Signals(s).name for s in self.signums)
        rank_message(
            trainer,
            f"{cluster_environment_name(trainer)} on {socket.gethostname()}, SLURM job {slurm_job_id()} "
            f"(restart {os.environ.get('SLURM_RESTART_COUNT', '0')}); {names} -> checkpoint"
            + (" (and requeue on SIGUSR1)" if self.requeue else ""),
        )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()  # again: Lightning's connector has since put its own (exit without saving) on SIGTERM
        self._last_check, self._last_global_step, self._steps_at_check = time.monotonic(), trainer.global_step, self._steps
        self._timed_from_check = False
        if trainer.ckpt_path:
            self.history["resumed_at"].append(trainer.global_step)
            rank_message(trainer, f"resumed at global step {trainer.global_step} from {trainer.ckpt_path}")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self._last_global_step:
            return  # inside a gradient-accumulation group (or a skipped step): nothing to save from here
        self._last_global_step = trainer.global_step
        self._steps += 1
        if self._steps % self.interval:
            return
        now = time.monotonic()
        step_s = (now - self._last_check) / (self._steps - self._steps_at_check)
        mine = torch.tensor([float(self.received or 0), step_s], device=pl_module.device)
        signum, slowest_step_s = trainer.strategy.reduce(mine, reduce_op="max").tolist()
        if self._timed_from_check:  # the time from train start to the first check misses hooks that run after this one
            self.interval = max(1, min(self.check_every_n_steps, int(self.agree_within_s / max(slowest_step_s, 1e-9))))
        self._last_check, self._steps_at_check, self._timed_from_check = now, self._steps, True
        if signum:
            self._save_and_stop(trainer, int(signum))

    def _save_and_stop(self, trainer: L.Trainer, signum: int) -> None:
        path = checkpoint_dir(trainer) / PREEMPTED_CKPT
        self.history["preempted_at"].append(trainer.global_step)
        trainer.save_checkpoint(path)
        delay = f", {time.monotonic() - self._received_at:.1f} s after this rank got it" if self._received_at else ""
        rank_message(trainer, f"{signal.Signals(signum).name}: saved {path} at global step {trainer.global_step}{delay}")
        job_id = slurm_job_id()
        if self.requeue and signum != signal.SIGTERM and job_id and trainer.is_global_zero:
            requeue(job_id)  # after SIGTERM SLURM requeues by itself (requeue, preemption), or the user cancelled
        trainer.should_stop = True
        self.received = self._received_at = None

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "steps": self._steps, "interval": self.interval}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {key: list(value) for key, value in state_dict["history"].items()}
        self._steps = state_dict.get("steps", 0)
        self.interval = state_dict.get("interval", 1)


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
        raise ValueError(f"unknown signal {name!r} for --preemption.signals; use e.g. SIGUSR1 or SIGTERM") from None
