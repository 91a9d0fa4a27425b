"""The contract every family keeps: one sampling entry and a self-describing checkpoint."""

from __future__ import annotations

import os
from collections.abc import Sequence

import lightning as L
import torch
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

    def fused_optimizer(self) -> bool:
        """Whether to ask Adam/AdamW for torch's fused kernel: one kernel over all parameters instead of a Python loop
        over tensors, 3-6x faster optimizer steps (measured in benchmarks/); it exists for CPU and CUDA tensors."""
        return self.device.type in ("cpu", "cuda")

    def on_fit_start(self) -> None:
        """Give every rank its own random stream: the same seed on all ranks would repeat noise and timesteps."""
        torch.manual_seed(rank_seed(int(os.environ.get("PL_GLOBAL_SEED", "0")), self.global_rank))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[FAMILY_KEY] = f"{type(self).__module__}.{type(self).__qualname__}"


def rank_seed(seed: int, rank: int) -> int:
    """Seed of one rank derived from the run's global seed (distinct per rank, stable across restarts)."""
    return (seed * 1_000_003 + rank * 7_919 + 1) % (2**63 - 1)
