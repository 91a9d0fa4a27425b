"""Which rank this process is: the one answer every layer uses (data splits shards by it, metrics reduce over it)."""

from __future__ import annotations

import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when no group runs."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
