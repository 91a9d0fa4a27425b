"""Exponential moving average of a network's weights (the copy used for sampling)."""

from __future__ import annotations

import copy
from functools import partial

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from genart_lightning.nn.sharding import local


@torch.no_grad()
def ema_update(ema: list[Tensor], current: list[Tensor], num_averaged: Tensor | None, decay: float) -> None:
    """`ema = decay * ema + (1 - decay) * current` in one fused call per list (integer tensors copied), skipping tensors
    the two share; AveragedModel's update, and the post-hoc EMA's at its own per-step decay."""
    # Sharded (FSDP2) networks: both copies are sharded alike, so the average is taken shard by shard, locally.
    ema, current = [local(e) for e in ema], [local(c) for c in current]
    pairs = [(e, c) for e, c in zip(ema, current, strict=True) if e.data_ptr() != c.data_ptr()]  # frozen ones are shared
    if not pairs:
        return
    ema, current = [e for e, _ in pairs], [c for _, c in pairs]
    if ema[0].is_floating_point():
        torch._foreach_lerp_(ema, current, 1.0 - decay)
    else:  # integer buffers (BatchNorm's num_batches_tracked) follow the network
        torch._foreach_copy_(ema, current)


def make_ema(net: nn.Module, decay: float, average_buffers: bool = True) -> AveragedModel:
    """EMA copy of `net`; buffers are averaged too so norm statistics follow. Update with `.update_parameters(net)`.

    `average_buffers=False` keeps the copy's buffers as they were: for constant buffers such as a causal attention
    mask of -inf, which an average would turn into NaN (-inf + w * (-inf - -inf)).

    Frozen parameters (`requires_grad=False`, e.g. the base weights under LoRA) are not copied: the average of a
    constant is itself, so the copy shares them with `net` and only the trainable tensors cost memory and updates.

    The update is a module-level function (not torch's closure), so the model pickles: `ddp_spawn` works.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay {decay} is outside [0, 1]; use e.g. 0.999")
    ema = AveragedModel(nn.Module(), multi_avg_fn=partial(ema_update, decay=decay), use_buffers=average_buffers)
    ema.module = copy.deepcopy(net, memo={id(p): p for p in net.parameters() if not p.requires_grad})
    return ema.requires_grad_(False)
