"""LightningCLI with the callbacks every run needs always attached (configured, never forgotten)."""

from __future__ import annotations

import os
from pathlib import Path

from jsonargparse import Namespace
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from genart_lightning.callbacks.efficiency import Efficiency
from genart_lightning.callbacks.failed_start import DiscardFailedStart
from genart_lightning.callbacks.fit_report import FitReport
from genart_lightning.callbacks.log_run_record import LogRunRecord
from genart_lightning.callbacks.posthoc_ema import PostHocEMA
from genart_lightning.callbacks.preemption import Preemption
from genart_lightning.callbacks.rank_state import RankState
from genart_lightning.callbacks.run_checkpoint import RunCheckpoint
from genart_lightning.callbacks.run_summary import RunSummary
from genart_lightning.callbacks.sample_grid import SampleGrid
from genart_lightning.callbacks.thread_tuner import ThreadTuner
from genart_lightning.callbacks.throughput import Throughput
from genart_lightning.run import fsdp  # noqa: F401  (registers --trainer.strategy fsdp2)
from genart_lightning.run.checkpoint_io import AtomicCheckpointIO
from genart_lightning.run.input_checks import check_inputs
from genart_lightning.run.provenance import RunRecord
from genart_lightning.run.quiet import quiet_lightning
from genart_lightning.run.resume import RESUME_MODES, apply_resume
from genart_lightning.run.threads import ThreadChoice, set_cpu_threads


def configure_threads(config: Namespace) -> ThreadChoice | None:
    """Set torch's threads for a CPU run from its cores, loader workers and devices; the choice (None on GPU)."""
    import torch

    accelerator = str(config.trainer.accelerator or "auto")
    if accelerator not in ("cpu", "auto") or (accelerator == "auto" and torch.cuda.is_available()):
        return None
    data = config.get("data") or {}
    workers = int((data.get("init_args") or {}).get("num_workers", 0) or 0) if isinstance(data, dict | Namespace) else 0
    devices = config.trainer.devices
    processes = int(os.environ.get("LOCAL_WORLD_SIZE") or (devices if isinstance(devices, int) and devices > 0 else 1))
    return set_cpu_threads(workers, processes, config.get("threads"))


def loggers_into_run_dir(config: Namespace) -> None:
    """A logger without `save_dir` writes into `trainer.default_root_dir`, so one option moves a whole run: checkpoints,
    logs, sample grids, config and provenance (the shipped configs leave `save_dir` unset for this)."""
    loggers = config.trainer.logger
    root = config.trainer.default_root_dir or os.getcwd()
    for entry in loggers if isinstance(loggers, list) else [loggers]:
        if isinstance(entry, Namespace) and "init_args" in entry and entry.init_args.get("save_dir", "unset") is None:
            entry.init_args.save_dir = str(root)


class GenartCLI(LightningCLI):
    """Adds `checkpoint` (RunCheckpoint: `last.ckpt` always holds the final weights), `sample_grid`, `throughput`,
    `efficiency` (step time, data wait, MFU, peak memory), `lr_monitor` and
    `run_summary` (final metrics.json) config sections to every run.

    Cluster side: `preemption` (SIGUSR1 -> checkpoint, requeue), per-rank RNG state in checkpoints,
    atomic checkpoint writes, provenance beside the checkpoints, and `--resume` (auto: a requeued SLURM
    job continues from `<default_root_dir>/checkpoints` with the same logger runs).
    """

    def __init__(self, *args, save_config_callback: type[RunRecord] | None = RunRecord, **kwargs) -> None:
        self.threads: ThreadChoice | None = None
        self.run_dir_existed = True
        quiet_lightning()
        super().__init__(*args, save_config_callback=save_config_callback, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0, "checkpoint.every_n_train_steps": 500})
        parser.add_lightning_class_args(SampleGrid, "sample_grid")
        parser.add_lightning_class_args(Throughput, "throughput")
        parser.add_lightning_class_args(Efficiency, "efficiency")
        parser.add_lightning_class_args(PostHocEMA, "posthoc_ema")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(RunSummary, "run_summary")
        parser.add_lightning_class_args(Preemption, "preemption")
        parser.add_argument(
            "--resume", choices=RESUME_MODES, default="auto",
            help="fit: continue from the newest checkpoint in the run's checkpoint dir (auto: inside SLURM jobs only)",
        )
        parser.add_argument(
            "--threads", type=int | None, default=None,
            help="torch intra-op threads on CPU (default: usable cores - loader workers, or OMP_NUM_THREADS when set)",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Lightning's parsing, then the inputs checked: before the seed is set and logged, so a mistake is one line."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        check_inputs(self.config[subcommand] if subcommand else self.config)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        loggers_into_run_dir(config)
        self.run_dir_existed = Path(config.trainer.default_root_dir or os.getcwd()).exists()
        self.threads = configure_threads(config)
        if self.threads and int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
            print(f"[genart] {self.threads.line()}", flush=True)  # stdout: stderr is for the one line of a mistake
        if self.subcommand == "fit":
            apply_resume(self.config.fit, self.config.fit.resume)

    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if not trainer.loggers:  # LearningRateMonitor refuses to start without a logger (--trainer.logger=false)
            trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, LearningRateMonitor)]
        trainer.callbacks.append(RankState())
        trainer.callbacks.append(LogRunRecord())
        if self.subcommand == "fit":
            trainer.callbacks.append(DiscardFailedStart(trainer.default_root_dir, self.run_dir_existed))
            trainer.callbacks.append(FitReport())
        bar = trainer.progress_bar_callback
        if type(bar) is RichProgressBar and (trainer.max_epochs or -1) < 0:  # step-bound: it would print "Epoch 19/-2"
            trainer.callbacks[trainer.callbacks.index(bar)] = TQDMProgressBar()
        candidates = self.threads.tuning_candidates() if self.threads else []
        if self.subcommand == "fit" and len(candidates) > 1 and trainer.world_size == 1:  # ranks would time each other
            trainer.callbacks.append(ThreadTuner(candidates, self.threads.threads))
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # keep a CheckpointIO the config chose
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer
