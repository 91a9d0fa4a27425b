"""FSDP2 (`torch.distributed.fsdp.fully_shard`) over this project's networks: which blocks become sharding units.

Each unit's parameters are gathered just before it runs and freed after, so a rank holds one unit's full weights at
a time, plus its own 1/N shard of everything; the unit boundaries decide how much that is. The units are the items
of a network's outermost `nn.ModuleList`s (a U-Net's levels, a DiT's blocks, a diffusers U-Net's down and up
blocks); what lies outside them (embeddings, the output head) forms the root unit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def shard_units(net: nn.Module) -> list[nn.Module]:
    """The items of `net`'s outermost ModuleLists, in module order."""
    units: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.ModuleList):
                units.extend(item for item in child if any(True for _ in item.parameters()))
            else:
                visit(child)

    visit(net)
    return units


def bf16_policy() -> Any:
    """FSDP2's mixed precision for `bf16-mixed`: parameters gathered and computed in bf16 (half the all-gather bytes
    and activation memory), gradients reduced in fp32, the sharded master weights and optimizer state kept in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard_network(net: nn.Module, mesh, mp_policy: Any = None) -> None:
    """Shard `net` in place over `mesh`: each unit, then the root. A 1-D mesh shards over all its ranks (FSDP); a 2-D
    (replicate, shard) mesh shards within a row and replicates across rows (HSDP). With `mp_policy` the gathered
    weights take its dtype; without one they stay fp32 and autocast casts them per operation."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = mp_policy or MixedPrecisionPolicy()
    for unit in shard_units(net):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(net, mesh=mesh, mp_policy=policy)


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of a sharded (DTensor) parameter, or the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor
