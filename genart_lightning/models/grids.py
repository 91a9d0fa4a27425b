"""Image grids and sample files: PNGs on disk (enlarged copies of small grids for viewing) and every attached logger."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch.nn.functional as F
from torch import Tensor
from torchvision.utils import make_grid, save_image

VIEW_WIDTH = 512
"""Grids narrower than this are also written enlarged (nearest neighbour): a 138 px grid is unreadable on a screen."""


def images_to_grid(images: Tensor, nrow: int | None = None) -> Tensor:
    """Images in [-1, 1] -> one [3, H, W] grid in [0, 1]."""
    nrow = nrow or max(1, round(images.shape[0] ** 0.5))
    return make_grid(images.detach().float().cpu().clamp(-1, 1) * 0.5 + 0.5, nrow=nrow, padding=2, pad_value=1.0)


def enlarged_path(path: str | Path) -> Path:
    """Where the enlarged copy of the grid at `path` goes: `<stem>_large.png` beside it."""
    path = Path(path)
    return path.with_name(f"{path.stem}_large.png")


def write_png(grid: Tensor, path: str | Path) -> Path:
    """Write a [3, H, W] grid in [0, 1] as PNG, plus an integer-factor enlarged copy if it is narrower than VIEW_WIDTH."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    width = grid.shape[-1]
    if width < VIEW_WIDTH:
        factor = -(-VIEW_WIDTH // width)
        save_image(F.interpolate(grid[None], scale_factor=factor, mode="nearest")[0], enlarged_path(path))
    return path


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write images in [-1, 1] as one PNG grid (and its enlarged copy when small); returns the grid's path."""
    return write_png(images_to_grid(images, nrow), path)


def save_images(images: Tensor, directory: str | Path) -> list[Path]:
    """One PNG per image in [-1, 1], named by index (000000.png, ...), quantised exactly as the grid is."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images.detach().float().cpu().clamp(-1, 1) * 0.5 + 0.5):
        paths.append(directory / f"{index:06d}.png")
        save_image(image, paths[-1])
    return paths


def log_image(trainer: L.Trainer, key: str, grid: Tensor, step: int) -> None:
    """Log a [3, H, W] grid in [0, 1] to TensorBoard, W&B or any logger with `log_image`."""
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):  # WandbLogger and others with the generic API
            logger.log_image(key=key, images=[grid], step=step)
        elif hasattr(logger.experiment, "add_image"):  # TensorBoard's SummaryWriter
            logger.experiment.add_image(key, grid, global_step=step)


def publish_grid(trainer: L.Trainer, key: str, grid: Tensor, step: int, path: str | Path) -> Path:
    """Write a [3, H, W] grid in [0, 1] as PNG at `path` (see write_png) and send it to every logger; returns the path."""
    write_png(grid, path)
    log_image(trainer, key, grid, step)
    return Path(path)
