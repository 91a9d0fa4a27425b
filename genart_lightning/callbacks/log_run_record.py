"""Send the run's resolved config and provenance to loggers that keep them nowhere else (W&B, MLflow, ...)."""

from __future__ import annotations

import json

import lightning as L
import yaml
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from genart_lightning.run.cluster import checkpoint_dir


class LogRunRecord(L.Callback):
    """At fit start, log `config.yaml` and `provenance.json` (written at setup by `provenance.RunRecord`) as hyperparameters.

    TensorBoard and CSV logs sit in a directory that already holds config.yaml, so they are left out;
    on W&B the config and the git commit / package versions become the run's config, searchable and
    comparable across runs.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        targets = [lg for lg in trainer.loggers if not isinstance(lg, (TensorBoardLogger, CSVLogger))]
        if not trainer.is_global_zero or not targets:
            return
        directory = checkpoint_dir(trainer)
        record = {}
        if (directory / "config.yaml").is_file():
            record["config"] = yaml.safe_load((directory / "config.yaml").read_text())
        if (directory / "provenance.json").is_file():
            record["provenance"] = json.loads((directory / "provenance.json").read_text())
        if record:
            for logger in targets:
                logger.log_hyperparams(record)
