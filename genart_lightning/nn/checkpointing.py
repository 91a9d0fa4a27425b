"""Activation (gradient) checkpointing of one block, for every network: its activations are recomputed in backward.

torch's checkpoint runs the block's forward twice, so whatever a forward changes besides its output would change
twice: BatchNorm's running statistics would take two momentum steps per batch (and count two batches), and
spectral norm would run its power iteration again and normalise the recomputed weight by another sigma than the
forward used, giving gradients of another weight. The recompute here leaves the statistics as they are and uses the
forward's spectral-norm vectors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def run_block(block: nn.Module, enabled: bool, *args: Tensor | None) -> Tensor:
    """`block(*args)`, recomputed in backward when gradient checkpointing is on and gradients flow (memory of one
    block instead of the whole net's activations)."""
    if enabled and block.training and torch.is_grad_enabled():
        replay = _AsBefore(block)
        return checkpoint(block, *args, use_reentrant=False, context_fn=lambda: (replay.forward(), replay))
    return block(*args)


class _AsBefore:
    """Recompute contexts for one checkpointed call: BatchNorm statistics keep their values and batch count, and
    spectral norm runs no power iteration and reuses the vectors this call's forward used (others may have moved
    them since: a discriminator called on fakes and again on reals for R1), so sigma and the weight come out the
    same. Re-entrant: a graph differentiated twice (R1's gradient of a gradient) recomputes twice."""

    def __init__(self, block: nn.Module) -> None:
        self.norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        self.spectral = [p for m in block.modules() for p in getattr(getattr(m, "parametrizations", None), "weight", [])
                         if hasattr(p, "n_power_iterations")]
        self.vectors: list[tuple[Tensor, Tensor]] = []
        self.saved: list[tuple] = []

    @contextmanager
    def forward(self) -> Iterator[None]:
        yield
        self.vectors = [(p._u.clone(), p._v.clone()) for p in self.spectral]  # what this forward's sigma used

    def __enter__(self) -> None:
        self.saved.append(([(m.momentum, m.num_batches_tracked.clone()) for m in self.norms],
                           [(p.n_power_iterations, p._u.clone(), p._v.clone()) for p in self.spectral]))
        for m in self.norms:
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
        for p, (u, v) in zip(self.spectral, self.vectors, strict=True):
            p.n_power_iterations = 0
            p._u.copy_(u)
            p._v.copy_(v)

    def __exit__(self, *exc: object) -> None:
        norms, spectral = self.saved.pop()
        for m, (momentum, count) in zip(self.norms, norms, strict=True):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)
        for p, (iterations, u, v) in zip(self.spectral, spectral, strict=True):
            p.n_power_iterations = iterations
            p._u.copy_(u)
            p._v.copy_(v)
