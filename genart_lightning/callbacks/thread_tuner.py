"""Tunes torch's CPU threads on the run's own training steps, and again when the machine's load changes.

The rule in `run/threads.py` (cores less loader workers) is safe, not best: light loader workers leave cores idle
(32px shapes on an idle 2-core machine ran 0.62x as fast at the rule's 1 thread as at 2), and a process that starts
beside ours turns 2 threads into a 10x slowdown. No static rule knows either, so the run times itself: a few
iterations at each candidate count, the fastest kept, and a re-tune when the kept count's iterations slow down or
speed up, or when a count below the most leaves a core idle (the process beside ours ended).
An iteration is timed by the shared `StepClock`: loader waits included (those are what the workers cost), but not the
sampling, checkpoints or validation other callbacks run between batches.
More threads than the start are tried only when the start's own iterations left a core idle (Linux's /proc/stat,
over the cores this process may use): next to a busy process one 2-thread iteration of a 32px U-Net took several
times a 1-thread one, and that single trial cost the default 9% of an 80-step run.

Thread counts change float summation order, so a tuned CPU run is not bit-reproducible across runs; `--threads` or
OMP_NUM_THREADS fixes the count (and turns this off), as the test suite does.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from genart_lightning.callbacks.step_clock import StepClock


class ThreadTuner(Callback):
    """Try each of `candidates` threads (`start`, the count in use, among them) for `trial_steps` iterations after `warmup`, keep the fastest; re-tune when
    the median of the last `window` iterations is `slowdown` times the tuned time or faster by that factor, or when
    fewer threads than the most leave `min_idle_cores` idle over those iterations (at most every `min_gap` steps): a
    process beside ours started, or ended. Without the last two, a run tuned down while a test suite ran beside it
    kept 1 thread after the suite ended (32px shapes: 1.0 s per iteration, 0.74 s at 2); the idle cores are what
    tells, as a 1-thread iteration hardly slows beside a busy process and so hardly speeds up when it ends (flow at
    32px: 0.95 s at 1 thread under load and after it, 0.64 s at 2 idle).

    One warm-up iteration: the first (kernel set-up, optimizer state) is never timed, and every further one spent at a
    losing count costs the run: on an idle 2-core machine the rule's 1 thread ran 0.4 s slower per step than 2, and
    3 warm-up steps made the default 0.91x the best fixed count over 80 steps (benchmarks/bench_threads.py)."""

    def __init__(self, candidates: list[int], start: int, warmup: int = 1, trial_steps: int = 2, window: int = 10,
                 slowdown: float = 1.5, min_gap: int = 100, min_idle_cores: float = 0.5) -> None:
        self.candidates = sorted(set(candidates))
        self.current = start
        self.warmup, self.trial_steps, self.window, self.slowdown, self.min_gap = warmup, trial_steps, window, slowdown, min_gap
        self.times: dict[int, list[float]] = {}
        self.queue: list[int] = []
        self.tuned: float | None = None
        self.tuned_at = 0
        self.recent: list[float] = []
        self.recent_idle: list[float] = []
        self.steps = 0
        self.min_idle_cores = min_idle_cores
        self.idle: dict[int, list[float]] = {}
        self.last_jiffies: tuple[int, int] | None = None
        self.clock = StepClock()

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.clock = StepClock.of(trainer)
        if self._iteration_starts not in self.clock.restart_hooks:
            self.clock.restart_hooks.append(self._iteration_starts)

    def _iteration_starts(self) -> None:
        self.last_jiffies = cpu_jiffies() if self._reads_idle() else None

    def _reads_idle(self) -> bool:
        """Whether the coming iteration reads /proc/stat: a trial's, or one at fewer threads than the most."""
        return bool(self.queue) or self.steps == self.warmup or (self.tuned is not None and self.current < self.candidates[-1])

    def on_train_batch_end(self, trainer: Trainer, *args) -> None:
        iteration = self.clock.iteration()
        idle = idle_cores(self.last_jiffies, cpu_jiffies() if self.last_jiffies is not None else None)
        self.steps += 1
        if iteration is not None and self.steps > self.warmup:
            if self.steps == self.warmup + 1:
                self._start_trials()
            if self.queue:
                self._trial(iteration[1], idle, trainer)
            else:
                self._watch(iteration[1], idle)

    def _start_trials(self) -> None:
        """Trials begin at the current count, so a run whose rule was right loses nothing until the others are tried."""
        self.times, self.idle = {}, {}
        self.queue = [self.current] + [c for c in self.candidates if c != self.current]
        self.recent, self.recent_idle = [], []

    def _trial(self, elapsed: float, idle: float | None, trainer: Trainer) -> None:
        threads = self.queue[0]
        self.times.setdefault(threads, []).append(elapsed)
        if idle is not None:
            self.idle.setdefault(threads, []).append(idle)
        best = min((statistics.median(v) for c, v in self.times.items() if c != threads), default=None)
        hopeless = best is not None and elapsed > 1.5 * best  # one iteration far slower than the best: stop trying it
        if len(self.times[threads]) >= self.trial_steps or hopeless:
            self.queue.pop(0)
            if threads in self.idle and statistics.median(self.idle[threads]) < self.min_idle_cores:
                self.queue = [c for c in self.queue if c < threads]  # no core to spare: more threads would wait
        if self.queue:
            self._use(self.queue[0])
            return
        medians = {c: statistics.median(v) for c, v in self.times.items()}
        self._use(min(medians, key=medians.get))
        self.tuned, self.tuned_at = medians[self.current], self.steps
        if trainer.is_global_zero:
            tried = ", ".join(f"{c}: {t:.3f} s" for c, t in sorted(medians.items()))
            idle = {c: statistics.median(v) for c, v in self.idle.items()}
            untried = [c for c in self.candidates if c not in medians]
            skipped = f"; {', '.join(map(str, untried))} not tried: {min(idle.values()):.2f} cores idle" if untried else ""
            print(f"[genart] CPU threads: {self.current} for torch (tuned at step {trainer.global_step}, "
                  f"median s/iteration {tried}{skipped})", flush=True)

    def _watch(self, elapsed: float, idle: float | None) -> None:
        self.recent = (self.recent + [elapsed])[-self.window:]
        self.recent_idle = (self.recent_idle + [idle] if idle is not None else [])[-self.window:]
        if len(self.recent) < self.window or self.steps - self.tuned_at < self.min_gap:
            return
        spare_core = len(self.recent_idle) == self.window and statistics.median(self.recent_idle) >= self.min_idle_cores
        if spare_core or not self.tuned / self.slowdown <= statistics.median(self.recent) <= self.slowdown * self.tuned:
            self._start_trials()

    def _use(self, threads: int) -> None:
        self.current = threads
        torch.set_num_threads(threads)


def cpu_jiffies() -> tuple[int, int] | None:
    """(idle, total) jiffies summed over the cores this process may use, from /proc/stat; None where unreadable."""
    try:
        cores = {f"cpu{c}" for c in os.sched_getaffinity(0)}
        idle = total = 0
        for line in Path("/proc/stat").read_text().splitlines():
            fields = line.split()
            if fields and fields[0] in cores:
                values = [int(v) for v in fields[1:]]
                idle, total = idle + values[3] + values[4], total + sum(values[:8])  # idle + iowait; up to steal
        return (idle, total) if total else None
    except (OSError, AttributeError, ValueError, IndexError):
        return None


def idle_cores(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """Cores that sat idle on average between two `cpu_jiffies` readings (this process's cores)."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    cores = len(os.sched_getaffinity(0))
    return cores * (after[0] - before[0]) / (after[1] - before[1])
