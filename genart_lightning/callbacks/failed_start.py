"""A fit that fails before its first step leaves no logger version behind: the next try is `version_0` again."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger


class DiscardFailedStart(L.Callback):
    """On an exception before the first optimizer step of a fresh fit, remove what this start wrote: the whole run
    folder when this start created it, else the logger versions it created (Lightning creates each logger's
    `version_N` before the data is set up, so a typo in the data settings used one up).

    Left alone: a resumed fit (its version and folder are the run's), W&B runs (not local), any failure after step 0.
    """

    def __init__(self, run_dir: str | Path, run_dir_existed: bool) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir_existed = run_dir_existed

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.global_step > 0 or trainer.ckpt_path or not trainer.is_global_zero:
            return
        if not self.run_dir_existed:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger | CSVLogger) and logger.log_dir and Path(logger.log_dir).is_dir():
                shutil.rmtree(logger.log_dir, ignore_errors=True)
