"""Image grids and sample files: PNGs on disk (enlarged copies of small grids for viewing) and every attached logger."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import make_grid, save_image

VIEW_WIDTH = 512
"""Grids narrower than this are also written enlarged (nearest neighbour): a 138 px grid is unreadable on a screen."""

PADDING = 2
CAPTION_FONT_SIZE = 12
MIN_CAPTION_FONT_SIZE = 8
CAPTION_INSET = 6
"""Pixels of a column that caption text leaves free (4 before it, 2 after), so neighbouring captions never touch."""


def images_to_grid(images: Tensor, nrow: int | None = None, captions: list[str] | None = None) -> Tensor:
    """Images in [-1, 1] -> one [3, H, W] grid in [0, 1]. With `captions` (one per image) the grid is enlarged to
    VIEW_WIDTH and each caption is written under its image, once under the column where the whole column shares it
    (cycled prompts fill columns when `nrow`, default the number of prompts up to 8, matches their count)."""
    if captions is not None and nrow is None:
        cycle = len(dict.fromkeys(captions))
        nrow = cycle if cycle <= 8 and len(captions) % cycle == 0 else None
    nrow = nrow or max(1, round(images.shape[0] ** 0.5))
    grid = make_grid(images.detach().float().cpu().clamp(-1, 1) * 0.5 + 0.5, nrow=nrow, padding=PADDING, pad_value=1.0)
    return grid if captions is None else captioned(grid, images.shape[-2:], nrow, captions)


def captioned(grid: Tensor, cell: tuple[int, int], nrow: int, captions: list[str]) -> Tensor:
    """`grid` (make_grid's layout of `cell`-sized images, `nrow` per row) enlarged to VIEW_WIDTH with its captions:
    one strip under the last row when every column shares one caption, else a strip under every row."""
    image = to_pil_image(enlarged(grid).mul(255).add_(0.5).clamp_(0, 255).byte())  # rounded as save_image rounds
    factor = image.width // grid.shape[-1]
    rows = [captions[i:i + nrow] for i in range(0, len(captions), nrow)]
    per_column = all(row == rows[0] for row in rows[:-1]) and rows[-1] == rows[0][:len(rows[-1])]
    pitch_y, pitch_x = (cell[0] + PADDING) * factor, (cell[1] + PADDING) * factor
    font = caption_font(captions, pitch_x - CAPTION_INSET)
    pieces = []
    for index, row in enumerate(rows):
        last = index == len(rows) - 1
        pieces.append(image.crop((0, index * pitch_y, image.width, (index + 1) * pitch_y + (PADDING * factor if last else 0))))
        if last or not per_column:
            pieces.append(caption_strip(rows[0] if per_column else row, image.width, pitch_x, font))
    out = Image.new("RGB", (image.width, sum(p.height for p in pieces)), "white")
    top = 0
    for piece in pieces:
        out.paste(piece, (0, top))
        top += piece.height
    return pil_to_tensor(out).float() / 255


def caption_font(captions: list[str], width: int) -> ImageFont.ImageFont:
    """The default font at CAPTION_FONT_SIZE, or smaller (down to MIN_CAPTION_FONT_SIZE) until every word fits in
    `width` pixels: a word wider than its column ran into the next column's caption ("backgroundbackground")."""
    words = {word for caption in captions for word in caption.split()}
    for size in range(CAPTION_FONT_SIZE, MIN_CAPTION_FONT_SIZE - 1, -1):
        font = ImageFont.load_default(size=size)
        if all(font.getlength(word) <= width for word in words):
            break
    return font


def caption_strip(captions: list[str], width: int, pitch: int, font: ImageFont.ImageFont) -> Image.Image:
    """A white strip with each caption word-wrapped in its column (`pitch` pixels apart), black text."""
    wrapped = [wrap(caption, pitch - CAPTION_INSET, font) for caption in captions]
    line_height = round(font.size) + 3
    strip = Image.new("RGB", (width, max(len(lines) for lines in wrapped) * line_height + 6), "white")
    draw = ImageDraw.Draw(strip)
    for column, lines in enumerate(wrapped):
        for number, line in enumerate(lines):
            draw.text((column * pitch + 4, 2 + number * line_height), line, fill="black", font=font)
    return strip


def wrap(text: str, width: int, font: ImageFont.ImageFont) -> list[str]:
    """`text` in lines no wider than `width` pixels in `font`, broken at spaces (a longer word gets its own line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines or [""]


def enlarged_path(path: str | Path) -> Path:
    """Where the enlarged copy of the grid at `path` goes: `<stem>_large.png` beside it."""
    path = Path(path)
    return path.with_name(f"{path.stem}_large.png")


def write_png(grid: Tensor, path: str | Path) -> Path:
    """Write a [3, H, W] grid in [0, 1] as PNG, plus an integer-factor enlarged copy if it is narrower than VIEW_WIDTH."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    if grid.shape[-1] < VIEW_WIDTH:
        save_image(enlarged(grid), enlarged_path(path))
    return path


def enlarged(grid: Tensor) -> Tensor:
    """`grid` enlarged by the integer factor (nearest neighbour) that makes it at least VIEW_WIDTH wide."""
    factor = max(1, -(-VIEW_WIDTH // grid.shape[-1]))
    return F.interpolate(grid[None], scale_factor=factor, mode="nearest")[0]


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None, captions: list[str] | None = None) -> Path:
    """Write images in [-1, 1] as one PNG grid (captioned, see images_to_grid; else with an enlarged copy when
    small); returns the grid's path."""
    return write_png(images_to_grid(images, nrow, captions), path)


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
