"""The final metrics of a completed fit in one JSON file: what sweep reports read, whatever the family or logger."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import lightning as L

from genart_lightning.callbacks.preemption import stopped_by_preemption


class RunSummary(L.Callback):
    """At the end of a completed fit, write the last value of every logged metric to `path`.

    `path` defaults to `<log_dir>/metrics.json`. The file is written only when fit completes: an
    exception or a kill never reaches `on_fit_end`, and a fit stopped by preemption (to be resumed
    by its requeued job) is skipped, so sweeps treat the file's presence as "finished".

    `hparams` (a sweep sets the run's swept values and seed) are written with the final metrics as a TensorBoard
    hparams summary in `<log_dir>/hparams`, one HParams session per run, so TensorBoard's HParams view compares the
    runs of a sweep (Lightning's own hparams summary at the start holds the whole config and no final metric).
    """

    def __init__(self, path: str | None = None, hparams: dict | None = None) -> None:
        self.path, self.hparams = path, hparams
        self.written: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = Path(self.path) if self.path else Path(trainer.log_dir or trainer.default_root_dir) / "metrics.json"
        if not trainer.is_global_zero or stopped_by_preemption(trainer):
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        summary = {
            "metrics": {k: v for k, v in metrics.items() if math.isfinite(v)},
            "nonfinite": sorted(k for k, v in metrics.items() if not math.isfinite(v)),
            "global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "seed": int(os.environ.get("PL_GLOBAL_SEED", "-1")),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        tmp.replace(path)  # atomic: a reader never sees half a file, and its presence means complete
        self.written = path
        if self.hparams:
            self._hparams_summary(trainer, summary["metrics"])

    def _hparams_summary(self, trainer: L.Trainer, metrics: dict[str, float]) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger
        from torch.utils.tensorboard import SummaryWriter

        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                with SummaryWriter(Path(logger.log_dir) / "hparams") as writer:
                    values = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in self.hparams.items()}
                    writer.add_hparams(values, {f"final/{k}": v for k, v in metrics.items()}, run_name=".")

