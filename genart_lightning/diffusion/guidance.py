"""Classifier-free guidance (Ho & Salimans 2022): conditional and unconditional in one batched call."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

ConditionalModel = Callable[[Tensor, Tensor, dict[str, Tensor]], Tensor]
"""`model(x_t, t, cond) -> raw output`; `cond` maps names to batch-first tensors."""


def classifier_free_guidance(
    model: ConditionalModel, cond: dict[str, Tensor], uncond: dict[str, Tensor], scale: float
) -> Callable[[Tensor, Tensor], Tensor]:
    """`(x_t, t) -> uncond + scale * (cond - uncond)`, with both halves computed in ONE forward of a doubled batch.

    One call of twice the batch keeps the GPU busier than two calls; scale 1 is the conditional output.
    """
    both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}

    def guided(x: Tensor, t: Tensor) -> Tensor:
        out_cond, out_uncond = model(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return out_uncond + scale * (out_cond - out_uncond)

    return guided
