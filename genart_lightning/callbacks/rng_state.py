"""Every rank's random streams saved in the checkpoint and given back to the same rank on resume."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn


def local_rng_state() -> dict[str, Any]:
    """This process's torch/CUDA/numpy/python RNG states as tensors and plain data (weights_only-loadable)."""
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_cached)],
        "python": [py_version, torch.tensor(py_internal, dtype=torch.int64), py_gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_local_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `local_rng_state`."""
    torch.set_rng_state(state["torch"])
    np_name, np_keys, np_pos, np_has_gauss, np_cached = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_cached))
    py_version, py_internal, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_internal.tolist()), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class RankRNGState(L.Callback):
    """Gathers all ranks' RNG states into the checkpoint; on resume each rank restores its own.

    Restored just before the first batch after resume: after the family's `on_fit_start` seeds each
    rank and after the epoch's DataLoader iterator draws its base seed from the global RNG, so the
    resumed run continues the interrupted streams exactly where the checkpoint left them.
    """

    def __init__(self) -> None:
        self._trainer: L.Trainer | None = None
        self._restored: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        # Called on every rank inside Trainer.save_checkpoint, so a collective is safe here.
        state = local_rng_state()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, state)
            return {"ranks": gathered}
        return {"ranks": [state]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._restored is None:
            return
        ranks = self._restored["ranks"]
        if len(ranks) != trainer.world_size:
            rank_zero_warn(
                f"checkpoint holds RNG states of {len(ranks)} ranks but this run has {trainer.world_size}; "
                "keeping the fresh per-rank seeds (resume on the same number of ranks to continue the streams)"
            )
        else:
            set_local_rng_state(ranks[trainer.global_rank])
        self._restored = None
