"""ModelCheckpoint whose `last.ckpt` always holds the final weights."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from genart_lightning.callbacks.preemption import stopped_by_preemption


class RunCheckpoint(ModelCheckpoint):
    """Lightning 2.6 skips the end-of-fit `last.ckpt` once any `last` was written, so with `max_steps` not a
    multiple of `every_n_train_steps` the final steps were lost; this writes it whenever the step moved on.

    Not after a preemption: its checkpoint already holds this step, and the grace period is short."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step and not stopped_by_preemption(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
