"""An efficiency panel: step time, the share of it spent waiting for data, model FLOPs utilisation, peak memory.

Every `every_n_steps` training steps it logs, over that window: `efficiency/step_time_median` and `_p90` (seconds of
an iteration on the shared `StepClock`: the wait for the batch and the step, not what other callbacks run between
batches), `efficiency/data_wait_share` (the part of those seconds spent waiting for the batch), `efficiency/mfu`
(FLOPs per step / median step time / the device's peak) and `efficiency/peak_memory_gb` (CUDA: the allocator's peak;
CPU: the process's peak resident set). FLOPs per step are counted once, on the first batch of global step 1, with
torch's `FlopCounterMode` (forward, backward and optimizer step of this rank); that step is left out of the timings.

The peak is a datasheet number for the GPUs people rent (dense, no sparsity: bf16 under a bf16 precision, fp32
otherwise), else a measured all-core fp32 matmul peak (CPU or an unknown device); which one is logged once. On CUDA the step
boundaries are host times: with asynchronous kernels they are exact only where the step synchronises (a logged loss
does), so read the panel over a window, not a single step.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from genart_lightning.callbacks.step_clock import StepClock

PEAK_TFLOPS = {  # (bf16 dense, fp32) from the vendors' datasheets, per GPU
    "H200": (989.0, 67.0), "H100": (989.0, 67.0), "A100": (312.0, 19.5), "L40S": (362.0, 91.6),
    "RTX 4090": (165.2, 82.6), "A10": (125.0, 31.2), "L4": (121.0, 30.3), "A6000": (154.8, 38.7),
}
"""Datasheet dense tensor-core bf16 and plain fp32 TFLOP/s (H100/H200: SXM)."""


def measured_matmul_peak(device: torch.device, size: int = 512, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` float32 `size` x `size` matmuls on `device`: the peak where no datasheet applies.
    On CPU with every core this process may use (the run's own thread count may change while it trains), the thread
    count restored after; its own generator, so the training's random stream is not touched."""
    generator = torch.Generator(device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=generator)
    b = torch.randn(size, size, device=device, generator=generator)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    best = float("inf")
    try:
        for _ in range(repeats + 1):  # the first one warms up
            start = time.perf_counter()
            torch.mm(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return 2 * size**3 / best


def device_peak(device: torch.device, precision: str) -> tuple[float, str]:
    """Peak FLOP/s of `device` at `precision` and where the number comes from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (bf16, fp32) in PEAK_TFLOPS.items():
            if key in name:
                bf16_run = "bf16" in precision
                return (bf16 if bf16_run else fp32) * 1e12, f"datasheet {key} {'bf16' if bf16_run else 'fp32'}"
    return measured_matmul_peak(device), f"measured fp32 matmul on {device.type}"


def peak_memory_gb(device: torch.device) -> float:
    """The CUDA allocator's peak on `device`, else this process's peak resident set (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Efficiency(L.Callback):
    """The panel above, every `every_n_steps` steps (0: off)."""

    COUNT_AT = 1
    """The global step whose (first) batch's FLOPs are counted: not the first step, which builds kernels and optimizer
    state. A global step, not this process's n-th batch, and the count rides in the checkpoint: counting runs the step
    under a dispatch mode, which may pick other kernels (bitwise, not in value), so a resumed run must count at the same
    step as the uninterrupted one, or not at all, to stay bit-identical to it."""

    def __init__(self, every_n_steps: int = 50) -> None:
        self.every_n_steps = every_n_steps
        self.steps: list[float] = []
        self.waits: list[float] = []
        self.flops_per_step: float | None = None
        self.peak: float | None = None
        self.peak_source = ""
        self.logged: dict[str, float] = {}
        self.clock = StepClock()
        self._counter: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.every_n_steps:
            self.clock = StepClock.of(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_steps:
            self.peak, self.peak_source = device_peak(pl_module.device, str(trainer.precision))
            rank_zero_info(f"efficiency panel: peak {self.peak / 1e12:.3g} TFLOP/s per device ({self.peak_source})")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.every_n_steps and trainer.global_step == self.COUNT_AT and self.flops_per_step is None and self._counter is None:
            from torch.utils.flop_counter import FlopCounterMode

            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.every_n_steps:
            return
        iteration = self.clock.iteration()
        if self._counter is not None:  # the counted step is not timed
            self._counter.__exit__(None, None, None)
            self.flops_per_step, self._counter = float(self._counter.get_total_flops()), None
        elif iteration is not None:
            self.waits.append(iteration[0])
            self.steps.append(iteration[1])
        if trainer.global_step % self.every_n_steps == 0 and self.steps:
            self._log(trainer, pl_module)

    def state_dict(self) -> dict:
        return {"flops_per_step": self.flops_per_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.flops_per_step = state_dict.get("flops_per_step")

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Straight to the loggers (rank 0's window), at the panel's own cadence: `self.log` would keep only the
        steps that fall on `log_every_n_steps`, and these timings do not belong in the run's final metrics."""
        steps = sorted(self.steps)
        median = statistics.median(steps)
        values = {"efficiency/step_time_median": median,
                  "efficiency/step_time_p90": steps[min(len(steps) - 1, round(0.9 * (len(steps) - 1)))],
                  "efficiency/data_wait_share": sum(self.waits) / sum(self.steps),
                  "efficiency/peak_memory_gb": peak_memory_gb(pl_module.device)}
        if self.flops_per_step and self.peak:
            values["efficiency/mfu"] = self.flops_per_step / median / self.peak
        self.logged = values
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=trainer.global_step)
        self.steps, self.waits = [], []
