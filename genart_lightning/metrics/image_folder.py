"""A folder of image files as evaluation input: another model's samples (`genart eval --fake DIR`) or real images.

Images are resized as real shards are for training (shorter side to the resolution, centre crop), so folder and
shard statistics compare like with like; captions come from a `samples.jsonl` beside them (`genart sample --out-dir`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import functional as TF

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CAPTIONS_FILE = "samples.jsonl"


class ImageFolder:
    """The images of a directory (sorted by path, searched recursively), their captions if any, one rank's batches."""

    def __init__(self, directory: str | Path, resolution: int | None = None) -> None:
        """`resolution`: side the images are resized and cropped to (default: the first image's shorter side)."""
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.directory}; pass a directory of PNG/JPEG/WebP files")
        self.files = sorted(p for p in self.directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(self.files) < 2:
            raise ValueError(f"{self.directory} holds {len(self.files)} images; FID needs at least 2 (PNG/JPEG/WebP)")
        with Image.open(self.files[0]) as first:
            self.channels = 1 if first.mode in ("L", "I", "F") else 3
            self.resolution = resolution or min(first.size)
        self.captions = self._captions()

    def _captions(self) -> list[str] | None:
        path = self.directory / CAPTIONS_FILE
        if not path.is_file():
            return None
        by_file = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                by_file[record["file"]] = record.get("caption", "")
        return [by_file.get(str(p.relative_to(self.directory)), "") for p in self.files]

    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.resolution, self.resolution)

    def load(self, path: Path) -> Tensor:
        """One image as [C, side, side] in [-1, 1]: shorter side resized (bilinear, antialiased), centre-cropped."""
        with Image.open(path) as image:
            image = image.convert("L" if self.channels == 1 else "RGB")
            tensor = TF.pil_to_tensor(image)
        if min(tensor.shape[-2:]) != self.resolution:
            tensor = TF.resize(tensor, self.resolution, antialias=True)
        tensor = TF.center_crop(tensor, [self.resolution, self.resolution])
        return tensor.float() / 127.5 - 1

    def batches(self, batch_size: int, rank: int = 0, world: int = 1) -> Iterator[tuple[Tensor, list[str] | None]]:
        """This rank's batches (chunk c goes to rank c % world), each with its captions; every file exactly once."""
        for chunk, start in enumerate(range(0, len(self.files), batch_size)):
            if chunk % world != rank:
                continue
            files = self.files[start : start + batch_size]
            captions = self.captions[start : start + len(files)] if self.captions else None
            yield torch.stack([self.load(p) for p in files]), captions

    def fingerprint(self) -> list[str]:
        """Each file with its size and mtime, for cache keys (rewritten images are not served stale)."""
        return [f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in self.files]
