"""Timing helpers shared by the benchmarks: alternate ours and the baseline in one process, report medians and ratios.

Why alternate: the build machines are shared, so their speed drifts by tens of percent within minutes. Timing
ours and the baseline in interleaved blocks (A, B, A, B, ...) exposes both to the same drift; the median of the
per-block numbers, and their ratio, are what we report.
"""

from __future__ import annotations

import inspect
import itertools
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

REPO = Path(__file__).resolve().parents[1]
"""The repository root: configs and the package live under it."""

THREADS = int(os.environ.get("GENART_BENCH_THREADS", "1"))
"""Intra-op threads for every CPU benchmark: fixed, so ours and the baseline get the same share of a busy machine."""

CLOCK = os.environ.get("GENART_BENCH_CLOCK", "cpu" if not torch.cuda.is_available() else "wall")
"""What the CPU benchmarks time: "cpu" = this process's CPU seconds, "wall" = elapsed seconds.

CPU time is the default on CPU-only runs because the build machines are shared by several jobs: elapsed time then
mostly measures how often the scheduler ran us, while CPU seconds of a fixed-thread process measure our work.
Benchmarks whose work runs in other processes (loader workers) or on a GPU time with the wall clock.
"""

PACKAGES = ("torch", "torchvision", "lightning", "torchmetrics", "webdataset", "open_clip_torch", "diffusers", "numpy")


def fix_threads() -> int:
    """Pin torch's intra-op thread count to THREADS (GENART_BENCH_THREADS) and return it."""
    torch.set_num_threads(THREADS)
    return THREADS


def clock() -> float:
    """Current reading of the benchmark clock (CLOCK)."""
    return time.process_time() if CLOCK == "cpu" else time.perf_counter()


def sync(device: torch.device | str = "cpu") -> None:
    """Wait for queued device work so wall time covers it (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeats: int, device: torch.device | str = "cpu") -> float:
    """Seconds per call of `fn`, over `repeats` calls (the device is synchronised before and after)."""
    sync(device)
    start = clock()
    for _ in range(repeats):
        fn()
    sync(device)
    return (clock() - start) / repeats


def alternate(blocks: dict[str, Callable[[], float]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run each block once per round, in turn (warmup rounds discarded); each block returns its own timing."""
    for _ in range(warmup):
        for block in blocks.values():
            block()
    times: dict[str, list[float]] = {name: [] for name in blocks}
    for r in range(rounds):
        # Flip the order every round, so neither side always runs right after the other's cache-warming.
        order = list(blocks.items()) if r % 2 == 0 else list(reversed(blocks.items()))
        for name, block in order:
            times[name].append(block())
    return times


@dataclass
class Comparison:
    """One ratio benchmark: medians of ours and the baseline, the goal and whether it was met."""

    section: str
    metric: str  # e.g. "s/iteration", "images/s"
    ours_label: str
    baseline_label: str
    ours: list[float]
    baseline: list[float]
    higher_is_better: bool
    goal: float | None = None  # on ours/baseline of the median values
    goal_text: str = ""
    setup: str = ""  # what exactly ran (sizes, threads, what was on)
    note: str = ""  # why a goal is missed, or what to read into the number
    extra: dict[str, str] = field(default_factory=dict)  # further measured values worth a line in RESULTS.md

    @property
    def ours_median(self) -> float:
        return statistics.median(self.ours)

    @property
    def baseline_median(self) -> float:
        return statistics.median(self.baseline)

    @property
    def ratio(self) -> float:
        """ours / baseline of the medians (for throughput > 1 is better, for time per step < 1 is better)."""
        return self.ours_median / self.baseline_median

    @property
    def spread(self) -> float:
        """Largest relative distance of a block from its side's median: how noisy the machine was."""
        rel = [abs(v / statistics.median(xs) - 1) for xs in (self.ours, self.baseline) for v in xs]
        return max(rel) if rel else 0.0

    @property
    def met(self) -> bool | None:
        if self.goal is None:
            return None
        return self.ratio >= self.goal if self.higher_is_better else self.ratio <= self.goal

    def line(self) -> str:
        """One printed line: medians, ratio and goal status."""
        status = {None: "no goal", True: "MET", False: "MISSED"}[self.met]
        return (
            f"[{self.section}] ours {self.ours_median:.4g} vs baseline {self.baseline_median:.4g} {self.metric}: "
            f"ratio {self.ratio:.3f} ({self.goal_text or 'no goal'}: {status}; {len(self.ours)} blocks each, spread {self.spread:.0%})"
        )


def parameter_count(module: torch.nn.Module) -> int:
    """Trainable parameters of a module."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (platform.processor() is empty on most Linux builds)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, str]:
    """What the numbers were measured on: CPU, cores, accelerator, load, threads and package versions."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "cpu": cpu_model(),
        "cores": f"{os.cpu_count()} logical, {usable} usable by this process",
        "torch threads": str(THREADS),
        "clock": "process CPU seconds (GENART_BENCH_CLOCK=cpu)" if CLOCK == "cpu" else "wall seconds",
        "load average at start": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "accelerator": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only; no GPU is lent to this run)",
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    for package in PACKAGES:
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = "not installed"
    return info


def matmul_peak_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, size: int = 1024) -> float:
    """Measured FLOP/s of a square matmul on `device`: the ceiling model FLOPs utilisation is reported against."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    repeats = 20 if torch.device(device).type == "cuda" else 3
    timed(lambda: a @ b, 1, device)  # warm up kernels / allocator
    best = min(timed(lambda: a @ b, repeats, device) for _ in range(3))
    return 2 * size**3 / best


def step_flops(fn: Callable[[], object]) -> float:
    """FLOPs of one call of `fn` (forward and backward matmuls/convs), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def optimizer_step_ms(optimizers: list[torch.optim.Optimizer], repeats: int = 10) -> dict[str, float]:
    """Median ms of one step of all `optimizers` as configured vs rebuilt with torch's default (non-fused) kernel.

    Gradients are random; the optimizers are copies over the same parameters, so the family's own state is untouched.
    """
    params = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
    saved = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p)

    def rebuild(opt: torch.optim.Optimizer, **changes) -> torch.optim.Optimizer:
        accepted = inspect.signature(type(opt)).parameters  # `defaults` may hold keys the constructor does not take
        settings = {k: v for k, v in {**opt.defaults, **changes}.items() if k in accepted}
        return type(opt)([p for g in opt.param_groups for p in g["params"]], **settings)

    variants = {"as configured": [rebuild(o) for o in optimizers], "torch default": [rebuild(o, fused=None) for o in optimizers]}
    out = {}
    for opts in variants.values():
        for opt in opts:
            opt.step()  # the first step allocates the moment buffers: not part of a step's cost
    for name, opts in variants.items():
        blocks = [timed(lambda opts=opts: [opt.step() for opt in opts], repeats) for _ in range(3)]
        out[name] = statistics.median(blocks) * 1000
    with torch.no_grad():
        for p, value in zip(params, saved, strict=True):
            p.copy_(value)
            p.grad = None
    return out


class FixedBatches(Dataset):
    """The same batch (project batch contract) `length` times: no decode cost on either side."""

    def __init__(self, batch: dict, length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return self.batch


def baseline_steps(loss: Callable[[dict], torch.Tensor], net: torch.nn.Module, batches: DataLoader,
                   device: torch.device) -> Callable[[int], float]:
    """A plain training loop over `batches` (AdamW lr 1e-4 on `net`, `loss(batch)` then backward and step), as the
    baselines of diffusers' examples run it; returns `run(n) -> seconds per step`, timed between device syncs."""
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    stream = iter(batches)

    def run(n: int) -> float:
        sync(device)
        start = clock()
        for batch in itertools.islice(stream, n):
            loss(batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync(device)
        return (clock() - start) / n

    return run


def loader(batch: dict, length: int) -> DataLoader:
    """A DataLoader yielding the ready batch (batch_size=None: no collation), in the main process."""
    return DataLoader(FixedBatches(batch, length), batch_size=None, num_workers=0)


class Interleave(L.Callback):
    """Every `block` training batches: close the timing of our block, run one baseline block, restart our clock."""

    def __init__(self, block: int, baseline: Callable[[int], float]) -> None:
        self.block, self.baseline = block, baseline
        self.ours: list[float] = []
        self.theirs: list[float] = []
        self._start: float | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int) -> None:
        if batch_idx % self.block:
            return
        sync(pl_module.device)
        if self._start is not None:
            self.ours.append((clock() - self._start) / self.block)
        self.theirs.append(self.baseline(self.block))
        self._start = clock()


def interleaved_fit(
    model: L.LightningModule,
    batch: dict,
    baseline: Callable[[int], float],
    block: int,
    rounds: int,
    warmup: int = 1,
    gpu: bool = False,
) -> tuple[list[float], list[float]]:
    """Fit `model` on `batch` repeated, as a user runs it, with baseline blocks interleaved; per-step times of each.

    On: the default TensorBoard logger at the default interval (50 steps), the per-step callbacks `genart fit`
    always attaches (Throughput, LearningRateMonitor), bf16 autocast on a GPU. Off: progress bar, checkpointing,
    model summary, sample grids. The first `warmup` blocks of each side are discarded.
    """
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import TensorBoardLogger

    from genart_lightning.callbacks.throughput import Throughput

    interleave = Interleave(block, baseline)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            accelerator="gpu" if gpu else "cpu",
            devices=1,
            precision="bf16-mixed" if gpu else "32-true",
            max_epochs=1,
            logger=TensorBoardLogger(tmp, name="bench"),
            callbacks=[Throughput(), LearningRateMonitor(), interleave],
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
        )
        # +1 batch: the last block of ours closes at the start of one more batch
        trainer.fit(model, loader(batch, block * (rounds + warmup) + 1))
    ours = interleave.ours[warmup:]
    return ours, interleave.theirs[warmup : warmup + len(ours)]



STEP_TIMES_FILE = "GENART_BENCH_STEP_TIMES"
"""Environment variable naming the file a `genart fit` under `fit_steps_per_second` writes its step timing to."""


class StepTimer(L.Callback):
    """Writes to the file $GENART_BENCH_STEP_TIMES the wall and main-process CPU seconds of the training steps after
    global step `warmup`, and the wall seconds of every step from batch start to batch end."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.cpu_start, self.steps = warmup, None, None, 0
        self.step_seconds: list[float] = []
        self.batch_start = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        self.batch_start = time.perf_counter()
        if trainer.global_step == self.warmup and self.start is None:
            self.start, self.cpu_start = self.batch_start, time.process_time()

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        self.step_seconds.append(time.perf_counter() - self.batch_start)
        if self.start is not None:
            self.steps += 1

    def on_train_end(self, trainer: L.Trainer, *args) -> None:
        Path(os.environ[STEP_TIMES_FILE]).write_text(json.dumps({
            "steps": self.steps, "seconds": time.perf_counter() - self.start,
            "cpu_seconds": time.process_time() - self.cpu_start, "step_seconds": self.step_seconds}))


def _spin(stop) -> None:
    while not stop.is_set():
        sum(range(10_000))


def fit_steps_per_second(config: str, data: dict, root: Path, steps: int, warmup: int, args: list[str],
                         busy: bool = False) -> float:
    """Training steps per wall second of one real `genart fit` (see `fit_step_times`). Wall clock: loader workers
    run in other processes, and contention is the point."""
    measured = fit_step_times(config, data, root, steps, warmup, args, busy)
    return measured["steps"] / measured["seconds"]


def fit_step_times(config: str, data: dict, root: Path, steps: int, warmup: int, args: list[str],
                   busy: bool = False) -> dict:
    """What `StepTimer` measured in one real `genart fit` of `config` (a fresh process, OMP_NUM_THREADS unset, no
    logger, validation, grids or checkpoints) over `steps` steps after `warmup`; `busy`: next to one process that
    keeps a core busy."""
    root.mkdir(parents=True, exist_ok=True)
    times = root / "times.json"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | {STEP_TIMES_FILE: str(times), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "genart_lightning.cli", "fit", "--config", str(REPO / config),
           f"--data.init_args.train_urls={data['train_urls']}", f"--data.init_args.val_urls={data['val_urls']}",
           f"--trainer.max_steps={warmup + steps}", f"--trainer.default_root_dir={root}", "--trainer.logger=false",
           f"--trainer.callbacks=[{{class_path: benchmarks.common.StepTimer, init_args: {{warmup: {warmup}}}}}]",
           "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false", "--sample_grid.every_n_steps=0",
           "--checkpoint.every_n_train_steps=0", *args]
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
    return json.loads(times.read_text())
