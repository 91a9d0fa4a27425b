"""`genart fit` with the threads it picks by itself vs the best fixed choice (1 or 2 torch threads), on an idle machine
and next to one busy process: the default must not lose to what a user could have tuned by hand.

Each run is a real `genart fit` of experiments/ddpm_shapes.yaml (32px U-Net, batch 32, 2 loader workers) in a fresh
process with OMP_NUM_THREADS unset; a callback times the training steps after a warm-up, the default's tuning
trials (the slow counts it tries) included. Wall clock: steps per second
is what a user waits for, and contention is the point.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lightning.pytorch import Callback

from benchmarks.common import REPO, Comparison, alternate
from datamodules.synthetic import write_shapes_shards

WARMUP = 2  # before the tuner's first trial (step 4), so its trials are timed too
TIMES_FILE = "GENART_BENCH_STEP_TIMES"


class StepTimer(Callback):
    """Writes the wall seconds of the training steps after WARMUP to the file named by $GENART_BENCH_STEP_TIMES."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.steps = 0

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == WARMUP:
            self.start = time.perf_counter()
        elif self.start is not None:
            self.steps += 1

    def on_train_end(self, trainer, *args) -> None:
        Path(os.environ[TIMES_FILE]).write_text(json.dumps({"steps": self.steps, "seconds": time.perf_counter() - self.start}))


def _spin(stop) -> None:
    while not stop.is_set():
        sum(range(10_000))


def _fit_rate(data: dict, root: Path, steps: int, threads: int | None, busy: bool) -> float:
    """Training steps per wall second of one `genart fit` (threads None: its own choice)."""
    times = root / "times.json"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | {TIMES_FILE: str(times), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "genart_lightning.cli", "fit", "--config", str(REPO / "experiments/ddpm_shapes.yaml"),
           f"--data.init_args.train_urls={data['train_urls']}", f"--data.init_args.val_urls={data['val_urls']}",
           f"--trainer.max_steps={WARMUP + steps}", f"--trainer.default_root_dir={root}", "--trainer.logger=false",
           "--trainer.callbacks=[{class_path: benchmarks.bench_threads.StepTimer}]", "--trainer.limit_val_batches=0",
           "--trainer.enable_progress_bar=false", "--sample_grid.every_n_steps=0", "--checkpoint.every_n_train_steps=0",
           *(["--threads", str(threads)] if threads else [])]
    stop = multiprocessing.Event()
    competitor = multiprocessing.Process(target=_spin, args=(stop,)) if busy else None
    if competitor:
        competitor.start()
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
    finally:
        if competitor:
            stop.set()
            competitor.join()
    if result.returncode != 0:
        raise RuntimeError(f"genart fit exited {result.returncode}: {result.stderr[-1500:]}")
    measured = json.loads(times.read_text())
    return measured["steps"] / measured["seconds"]


def main(quick: bool = False, conditions: tuple[str, ...] = ("idle", "busy")) -> list[Comparison]:
    """Default threads vs 1 and 2 threads, idle and busy; the baseline of each row is the better fixed choice."""
    steps, rounds = (40, 1) if quick else (80, 3)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_shapes_shards(Path(tmp) / "shapes", 700, image_size=32, samples_per_shard=100)
        for busy in [condition == "busy" for condition in conditions]:
            runs = alternate({name: (lambda t=threads, n=name, b=busy: _fit_rate(data, _fresh(Path(tmp) / n), steps, t, b))
                              for name, threads in (("default", None), ("1", 1), ("2", 2))}, rounds)
            best = max(("1", "2"), key=lambda name: statistics.median(runs[name]))
            results.append(Comparison(
                f"threads: genart fit default vs best fixed, {'next to one busy process' if busy else 'idle'}", "steps/s",
                "default (cores - loader workers, then tuned on its own steps)", f"--threads {best} (the better of 1 and 2)", runs["default"],
                runs[best], higher_is_better=True, goal=0.95, goal_text="default >= 0.95x the best of 1 and 2 threads",
                setup=f"experiments/ddpm_shapes.yaml (32px, batch 32, 2 loader workers), {steps} timed steps after "
                      f"{WARMUP}, {os.cpu_count()} cores, wall clock, fresh process per run",
                extra={"all": ", ".join(f"{k}: {statistics.median(v):.2f} steps/s" for k, v in runs.items())},
            ))
    return results


def _fresh(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


if __name__ == "__main__":  # python -m benchmarks.bench_threads [--quick] [idle] [busy]
    chosen = tuple(arg for arg in sys.argv[1:] if arg in ("idle", "busy")) or ("idle", "busy")
    for result in main(quick="--quick" in sys.argv, conditions=chosen):
        print(result.line())
