"""Send one picture to every attached logger, whatever its kind."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from torch import Tensor
from torchvision.utils import make_grid, save_image


def images_to_grid(images: Tensor, nrow: int | None = None) -> Tensor:
    """Images in [-1, 1] -> one [3, H, W] grid in [0, 1]."""
    nrow = nrow or max(1, round(images.shape[0] ** 0.5))
    return make_grid(images.detach().float().cpu().clamp(-1, 1) * 0.5 + 0.5, nrow=nrow, padding=2, pad_value=1.0)


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write images in [-1, 1] as one PNG grid; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images_to_grid(images, nrow), path)
    return path


def log_image(trainer: L.Trainer, key: str, grid: Tensor, step: int) -> None:
    """Log a [3, H, W] grid in [0, 1] to TensorBoard, W&B or any logger with `log_image`."""
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):  # WandbLogger and others with the generic API
            logger.log_image(key=key, images=[grid], step=step)
        elif hasattr(logger.experiment, "add_image"):  # TensorBoard's SummaryWriter
            logger.experiment.add_image(key, grid, global_step=step)


def publish_grid(trainer: L.Trainer, key: str, grid: Tensor, step: int, path: str | Path) -> Path:
    """Write a [3, H, W] grid in [0, 1] as PNG at `path` and send it to every logger; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    log_image(trainer, key, grid, step)
    return path
