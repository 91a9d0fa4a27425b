"""Judges (small networks trained offline on a dataset's ground truth) are trained once and cached by key, for every
dataset plug-in alike: rank 0 trains and writes atomically, the other ranks wait and read."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from datamodules.distributed import rank_world


def judge_cache_dir() -> Path:
    """$GENART_CACHE/judge, else ~/.cache/genart/judge."""
    return Path(os.environ.get("GENART_CACHE", Path.home() / ".cache" / "genart")).expanduser() / "judge"


def load_or_train(key: str, train: Callable[[], nn.Module], build: Callable[[], nn.Module],
                  cache_dir: str | Path | None = None) -> nn.Module:
    """The network cached as `key`.pt, trained with `train()` once if missing; `build()` makes the empty one to load."""
    path = Path(cache_dir or judge_cache_dir()) / f"{key}.pt"
    rank, world = rank_world()
    if not path.is_file() and rank == 0:
        net = train()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(net.state_dict(), tmp)
        tmp.replace(path)  # atomic: a concurrent reader never sees half a file
    if world > 1:
        dist.barrier()
    if not path.is_file():  # a node-local cache on another node: training is deterministic, so train here too
        return train()
    net = build()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.eval().requires_grad_(False)
