"""LightningCLI with the callbacks every run needs always attached (configured, never forgotten)."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from genart_lightning.callbacks.sample_grid import SampleGrid


class GenartCLI(LightningCLI):
    """Adds `checkpoint` (ModelCheckpoint, keeps `last.ckpt`) and `sample_grid` config sections to every run."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0, "checkpoint.every_n_train_steps": 500})
        parser.add_lightning_class_args(SampleGrid, "sample_grid")
