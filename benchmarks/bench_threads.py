"""`genart fit` with the threads it picks by itself vs the best fixed choice (1 or 2 torch threads), on an idle machine
and next to one busy process: the default must not lose to what a user could have tuned by hand.

Each run is a real `genart fit` of experiments/ddpm_shapes.yaml (32px U-Net, batch 32, 2 loader workers) in a fresh
process with OMP_NUM_THREADS unset; a callback times the training steps after a warm-up, the default's tuning
trials (the slow counts it tries) included. Wall clock: steps per second
is what a user waits for, and contention is the point.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.common import Comparison, alternate, fit_steps_per_second
from datamodules.synthetic import write_shapes_shards

CONFIG = "experiments/ddpm_shapes.yaml"
WARMUP = 2  # the first steps build kernels and optimizer state; the tuner's trials of other counts (step 4 on) are timed


def _fit_rate(data: dict, root: Path, steps: int, threads: int | None, busy: bool) -> float:
    """Training steps per wall second of one `genart fit` (threads None: its own choice)."""
    return fit_steps_per_second(CONFIG, data, root, steps, WARMUP, ["--threads", str(threads)] if threads else [], busy)


def main(quick: bool = False, conditions: tuple[str, ...] = ("idle", "busy")) -> list[Comparison]:
    """Default threads vs 1 and 2 threads, idle and busy; the baseline of each row is the better fixed choice."""
    steps, rounds = (40, 1) if quick else (80, 3)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_shapes_shards(Path(tmp) / "shapes", 700, image_size=32, samples_per_shard=100)
        for busy in [condition == "busy" for condition in conditions]:
            runs = alternate({name: (lambda t=threads, n=name, b=busy: _fit_rate(data, Path(tmp) / n, steps, t, b))
                              for name, threads in (("default", None), ("1", 1), ("2", 2))}, rounds)
            best = max(("1", "2"), key=lambda name: statistics.median(runs[name]))
            results.append(Comparison(
                f"threads: genart fit default vs best fixed, {'next to one busy process' if busy else 'idle'}", "steps/s",
                "default (cores - loader workers, then tuned on its own steps)", f"--threads {best} (the better of 1 and 2)", runs["default"],
                runs[best], higher_is_better=True, goal=0.95, goal_text="default >= 0.95x the best of 1 and 2 threads",
                setup=f"{CONFIG} (32px, batch 32, 2 loader workers), {steps} timed steps after "
                      f"{WARMUP}, {os.cpu_count()} cores, wall clock, fresh process per run",
                extra={"all": ", ".join(f"{k}: {statistics.median(v):.2f} steps/s" for k, v in runs.items())},
            ))
    return results


if __name__ == "__main__":  # python -m benchmarks.bench_threads [--quick] [idle] [busy]
    chosen = tuple(arg for arg in sys.argv[1:] if arg in ("idle", "busy")) or ("idle", "busy")
    for result in main(quick="--quick" in sys.argv, conditions=chosen):
        print(result.line())
