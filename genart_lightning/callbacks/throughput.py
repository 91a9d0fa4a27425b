"""Training speed in images/s (per device and global) and gradient norms per optimizer, for every family."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.optim import Optimizer


def batch_size(batch: Any) -> int:
    """Images in one batch of the project's batch contract (dict with `image` or `latent`), or the first tensor's length."""
    for field in ("image", "latent"):
        if isinstance(batch, dict) and isinstance(batch.get(field), Tensor):
            return batch[field].shape[0]
    if isinstance(batch, Tensor):
        return batch.shape[0]
    if isinstance(batch, (list, tuple)) and batch:
        return batch_size(batch[0])
    raise TypeError(f"cannot count images in a batch of type {type(batch).__name__}; yield dicts with an 'image' tensor")


class Throughput(L.Callback):
    """Logs `throughput/images_per_sec` (per device and global), `throughput/images_seen` and `grad_norm/...`.

    Speed is wall time between logging steps (`trainer.log_every_n_steps`), excluding validation, so
    nothing waits for the device per step: the one sync is the logger's own. The global rate assumes
    every rank runs the same batches (the datamodules guarantee equal batch counts per rank).
    Gradient norms are the total 2-norm of each optimizer's gradients, taken in `on_before_optimizer_step`,
    which Lightning calls in automatic and manual optimization alike, after AMP unscaling and before
    clipping and the step; optimizers are numbered in `configure_optimizers` order.
    """

    def __init__(self, grad_norms: bool = True, norm_type: float = 2.0) -> None:
        self.grad_norms = grad_norms
        self.norm_type = norm_type
        self._images = 0  # images on this rank since the last log
        self._seen = 0  # images on this rank since fit start
        self._start: float | None = None
        self._paused: float | None = None

    def _logging_now(self, trainer: L.Trainer) -> bool:
        return trainer._logger_connector.should_update_logs

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._paused = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._paused is not None and self._start is not None:
            self._start += time.perf_counter() - self._paused  # validation time is not training time
        self._paused = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        n = batch_size(batch)
        self._images += n
        self._seen += n
        if not self._logging_now(trainer) or self._start is None:
            return
        now = time.perf_counter()
        per_device = self._images / max(now - self._start, 1e-9)
        self._images, self._start = 0, now
        log = {
            "throughput/images_per_sec_per_device": per_device,
            "throughput/images_per_sec": per_device * trainer.world_size,
            "throughput/images_seen": float(self._seen * trainer.world_size),
        }
        pl_module.log_dict(log, on_step=True, on_epoch=False, batch_size=n)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer) -> None:
        if not self.grad_norms or not self._logging_now(trainer):
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        index = next(i for i, opt in enumerate(trainer.optimizers) if opt is optimizer)
        key = "grad_norm" if len(trainer.optimizers) == 1 else f"grad_norm/optimizer{index}"
        norm = torch.nn.utils.get_total_norm(grads, norm_type=self.norm_type)
        pl_module.log(key, norm, on_step=True, on_epoch=False, batch_size=1)
