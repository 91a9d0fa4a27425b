"""FSDP2 (`torch.distributed.fsdp.fully_shard`) over this project's networks: which blocks become sharding units.

Each unit's parameters are gathered just before it runs and freed after, so a rank holds one unit's full weights at
a time, plus its own 1/N shard of everything; the unit boundaries decide how much that is. The units are the items
of a network's outermost `nn.ModuleList`s (a U-Net's levels, a DiT's blocks, a diffusers U-Net's down and up
blocks); what lies outside them (embeddings, the output head) forms the root unit.
"""

from __future__ import annotations

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


def shard_network(net: nn.Module, mesh) -> None:
    """Shard `net` in place over the 1-D data-parallel `mesh`: each unit, then the root. Under `bf16-mixed` autocast
    casts the gathered fp32 weights per operation, as without sharding."""
    from torch.distributed.fsdp import fully_shard

    for unit in shard_units(net):
        fully_shard(unit, mesh=mesh)
    fully_shard(net, mesh=mesh)


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of a sharded (DTensor) parameter, or the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor
