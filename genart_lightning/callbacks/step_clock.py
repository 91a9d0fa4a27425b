"""The training loop's iterations as host times, one clock for every callback that times them (the thread tuner,
the efficiency panel).

An iteration runs from the end of the previous one to its own batch's end: the wait for the batch (fetch and
transfer), then the step. What callbacks run between two batches is not in it: a periodic evaluation's sampling,
a sample grid, a checkpoint, validation. A periodic evaluation once looked to the tuner like a 19 s iteration, and
to the efficiency panel like 19 s of waiting for data. So the clock reads the batch's end before every other
callback's batch-end hook and restarts after all of them, checkpoints included: Lightning moves `ModelCheckpoint`s
to the end of the list when a fit starts, so the clock installs itself from a `setup` hook, which runs after that.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from lightning.pytorch import Callback, Trainer


class StepClock:
    """Boundaries of the current iteration; `restart_hooks` run when the next one starts."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.batch_start: float | None = None
        self.batch_end: float | None = None
        self.restart_hooks: list[Callable[[], None]] = []

    @staticmethod
    def of(trainer: Trainer) -> StepClock:
        """The trainer's clock, installed first and last among its callbacks on first use. Call it from `setup`."""
        for callback in trainer.callbacks:
            if isinstance(callback, _IterationEnd):
                return callback.clock
        clock = StepClock()
        # a new list: Lightning is iterating over the old one to call the hook we are in
        trainer.callbacks = [_BatchEdges(clock), *trainer.callbacks, _IterationEnd(clock)]
        return clock

    def iteration(self) -> tuple[float, float] | None:
        """(seconds waiting for the batch, seconds of the whole iteration) of the batch that just ended; None for the
        first batch of a fit, whose start is set-up work."""
        if self.start is None or self.batch_start is None or self.batch_end is None:
            return None
        return self.batch_start - self.start, self.batch_end - self.start

    def restart(self) -> None:
        self.start = time.perf_counter()
        for hook in self.restart_hooks:
            hook()


class _BatchEdges(Callback):
    """First among the callbacks: the batch's start and end, before any other callback's work."""

    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_train_start(self, *args) -> None:
        self.clock.start = None

    def on_train_batch_start(self, *args) -> None:
        self.clock.batch_start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.clock.batch_end = time.perf_counter()


class _IterationEnd(Callback):
    """Last among the callbacks: the next iteration starts after every other callback's batch-end and validation-end
    work."""

    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_train_batch_end(self, *args) -> None:
        self.clock.restart()

    def on_validation_end(self, *args) -> None:
        self.clock.restart()
