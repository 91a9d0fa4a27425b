"""`compile` switch of every family: torch.compile its large networks in place."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def compile_networks(networks: Iterable[nn.Module], setting: bool | str) -> None:
    """`True` compiles with inductor, a string with that torch.compile backend (e.g. aot_eager: the captured graph
    without code generation, quick to build); in place, so parameter names and checkpoints stay the plain modules'."""
    if not setting:
        return
    backend = "inductor" if setting is True else setting
    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ValueError(f"compile={setting!r} is not a torch.compile backend; use true (inductor) or one of "
                         f"{', '.join(known)}")
    for net in networks:
        net.compile(backend=backend)
