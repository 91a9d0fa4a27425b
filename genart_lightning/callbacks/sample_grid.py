"""Fixed-seed, fixed-prompt sample grids during training: the picture a researcher watches."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from genart_lightning.models.base import GenerativeModel
from genart_lightning.models.grids import images_to_grid, publish_grid


class SampleGrid(L.Callback):
    """Every `every_n_steps` optimizer steps (and at the end of fit) draw a grid with the family's `sample`.

    The same seed and prompts at every call make grids comparable across steps; grids are written
    as PNG under `<log_dir>/samples/` and sent to every logger.
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        num_samples: int = 16,
        prompts: list[str] | None = None,
        seed: int = 0,
    ) -> None:
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.prompts = prompts
        self.seed = seed
        self._last_step = -1
        self.last_path: Path | None = None

    def _captions(self, pl_module: GenerativeModel) -> list[str] | None:
        if not pl_module.conditional or not self.prompts:
            return None
        return [self.prompts[i % len(self.prompts)] for i in range(self.num_samples)]

    @torch.no_grad()
    def draw(self, trainer: L.Trainer, pl_module: GenerativeModel, announce: bool = False) -> Path | None:
        """Sample, save and log one grid at the current step (on every rank the sampling runs; rank 0 writes);
        `announce` says so first (the end-of-fit grid: nothing else is printed while it samples)."""
        step = trainer.global_step
        if step == self._last_step:
            return None
        self._last_step = step
        if announce:
            rank_zero_info(f"[genart] drawing the final sample grid ({self.num_samples} samples) ...")
        was_training = pl_module.training
        pl_module.eval()
        started = time.perf_counter()
        captions = self._captions(pl_module)
        images = pl_module.sample(self.num_samples, captions=captions, seed=self.seed)
        pl_module.train(was_training)
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask, not rank 0 alone
        if not trainer.is_global_zero:
            return None
        path = Path(log_dir or trainer.default_root_dir) / "samples" / f"step{step:08d}.png"
        self.last_path = publish_grid(trainer, "samples", images_to_grid(images, captions=captions), step, path)
        rank_zero_info(f"[genart] sample grid at step {step}: {self.last_path} ({self.num_samples} samples in "
                       f"{time.perf_counter() - started:.0f} s)")
        return self.last_path

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: GenerativeModel, outputs, batch, batch_idx: int) -> None:
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0 and trainer.global_step > 0:
            self.draw(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: GenerativeModel) -> None:
        self.draw(trainer, pl_module, announce=True)
