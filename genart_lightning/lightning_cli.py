"""LightningCLI with the callbacks every run needs always attached (configured, never forgotten)."""

from __future__ import annotations

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from genart_lightning.callbacks.run_summary import RunSummary
from genart_lightning.callbacks.sample_grid import SampleGrid
from genart_lightning.callbacks.throughput import Throughput


class GenartCLI(LightningCLI):
    """Adds `checkpoint` (ModelCheckpoint, keeps `last.ckpt`), `sample_grid`, `throughput`, `lr_monitor` and
    `run_summary` (final metrics.json) config sections to every run."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0, "checkpoint.every_n_train_steps": 500})
        parser.add_lightning_class_args(SampleGrid, "sample_grid")
        parser.add_lightning_class_args(Throughput, "throughput")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(RunSummary, "run_summary")

    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if not trainer.loggers:  # LearningRateMonitor refuses to start without a logger (--trainer.logger=false)
            trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, LearningRateMonitor)]
        return trainer
