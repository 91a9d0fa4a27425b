"""Post-hoc EMA snapshots during training (EDM2): the EMA length is chosen after training, not before.

Two power-function EMAs of the backbone (`sigma_rels`, EDM2's 0.05 and 0.10 by default) are tracked after every
optimizer step and saved every `every_n_steps` steps as `<run>/phema/phema-<step>-<sigma_rel>.pt` (the backbone's
averaged state only, written atomically), out of the resume checkpoint's way; the tracking state itself rides in
the checkpoint (callback state), so a resumed run keeps averaging where it stopped. `genart ema reconstruct RUN
--sigma-rel X` then builds the EMA of any length from the snapshots (`nn/posthoc_ema.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from genart_lightning.nn.posthoc_ema import PowerEMA
from genart_lightning.run.checkpoint_io import atomic_torch_save

SNAPSHOT_DIR = "phema"


def snapshot_name(step: int, sigma_rel: float) -> str:
    return f"phema-{step:09d}-{sigma_rel:.4f}.pt"


def run_folder(trainer: L.Trainer) -> Path:
    return Path(trainer.default_root_dir)


class PostHocEMA(L.Callback):
    """Tracks power-function EMAs of the model's `backbone` and saves snapshots (off unless `every_n_steps` > 0)."""

    def __init__(self, every_n_steps: int = 0, sigma_rels: tuple[float, ...] = (0.05, 0.10)) -> None:
        self.every_n_steps, self.sigma_rels = every_n_steps, tuple(sigma_rels)
        self.tracker: PowerEMA | None = None
        self._restored: dict | None = None
        self._last_step = -1

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.every_n_steps:
            return
        if not hasattr(pl_module, "backbone"):
            raise ValueError(f"post-hoc EMA averages a diffusion model's backbone; {type(pl_module).__name__} has none: "
                             "set --posthoc_ema.every_n_steps 0")
        self.tracker = PowerEMA(pl_module.backbone, self.sigma_rels)
        if self._restored is not None:
            self.tracker.load_state_dict(self._restored)
            self._restored = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.tracker is None:
            return
        step = trainer.global_step  # optimizer steps so far: this one's 1-based index
        if step == self._last_step:  # an accumulation batch without an optimizer step
            return
        self._last_step = step
        self.tracker.update(pl_module.backbone, step)
        if step % self.every_n_steps == 0 and trainer.is_global_zero:
            folder = run_folder(trainer) / SNAPSHOT_DIR
            folder.mkdir(parents=True, exist_ok=True)
            for sigma_rel, average in zip(self.tracker.sigma_rels, self.tracker.averages, strict=True):
                atomic_torch_save({"step": step, "sigma_rel": sigma_rel, "state_dict": average},
                                  folder / snapshot_name(step, sigma_rel))

    def state_dict(self) -> dict:
        return self.tracker.state_dict() if self.tracker is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restored before or after `on_fit_start` builds the tracker, depending on Lightning's order: either works."""
        if self.tracker is not None and state_dict:
            self.tracker.load_state_dict(state_dict)
        else:
            self._restored = state_dict or None
