"""The contract every family keeps: one sampling entry and a self-describing checkpoint."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
from torch import Tensor

FAMILY_KEY = "genart_family"
"""Checkpoint entry naming the family class, so `genart sample` can rebuild any checkpoint."""


class GenerativeModel(L.LightningModule):
    """Base class of all families; configs may only name its subclasses (LightningCLI subclass mode)."""

    conditional: bool = False
    """True when `sample` uses captions."""

    def sample(self, n: int, captions: Sequence[str] | None = None, seed: int = 0) -> Tensor:
        """Draw `n` images in [-1, 1], shape [n, C, H, W]; the same seed gives the same images."""
        raise NotImplementedError(f"{type(self).__name__} does not implement sample()")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[FAMILY_KEY] = f"{type(self).__module__}.{type(self).__qualname__}"
