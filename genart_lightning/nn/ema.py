"""Exponential moving average of a network's weights (the copy used for sampling)."""

from __future__ import annotations

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def make_ema(net: nn.Module, decay: float) -> AveragedModel:
    """EMA copy of `net`; buffers are averaged too so norm statistics follow. Update with `.update_parameters(net)`."""
    return AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True).requires_grad_(False)
