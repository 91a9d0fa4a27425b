"""Every rank's random streams and data position saved in the checkpoint and given back to the same rank."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn

from datamodules.distributed import rank_world


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


class RankState(L.Callback):
    """Every rank's RNG streams and data-loader position go into the checkpoint; each rank gets its own back.

    Lightning writes the checkpoint from rank 0, so without this the other ranks would resume with rank 0's
    loader position (re-reading or skipping their shards) and restart their random streams. The RNG states
    are restored just before the first batch after resume: after the family's `on_fit_start` seeds each
    rank and after the epoch's DataLoader iterator draws its base seed from the global RNG, so the streams
    continue exactly where the checkpoint left them.
    """

    def __init__(self) -> None:
        self._rng: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if "callbacks" not in checkpoint:  # a weights-only save has no training state
            return
        fit_loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
        mine = {"rng": local_rng_state(), "loaders": fit_loop.get("combined_loader")}
        # Called on every rank inside Trainer.save_checkpoint, so a collective is safe here.
        ranks = [mine]
        world = rank_world()[1]
        if world > 1:
            ranks = [None] * world
            dist.all_gather_object(ranks, mine)
        checkpoint["callbacks"][self.state_key] = {"ranks": ranks}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        ranks = checkpoint.get("callbacks", {}).get(self.state_key, {}).get("ranks")
        if not ranks:
            return
        if len(ranks) != trainer.world_size:
            rank_zero_warn(
                f"checkpoint holds the state of {len(ranks)} ranks but this run has {trainer.world_size}; "
                "keeping fresh per-rank seeds and rank 0's data position (resume on as many ranks to continue exactly)"
            )
            return
        mine = ranks[trainer.global_rank]
        self._rng = mine["rng"]
        fit_loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict")
        if fit_loop is not None and mine["loaders"] is not None:
            fit_loop["combined_loader"] = mine["loaders"]  # read by the fit loop when it restores, after this hook

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._rng is not None:
            set_local_rng_state(self._rng)
            self._rng = None
