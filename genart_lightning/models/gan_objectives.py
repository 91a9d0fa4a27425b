"""GAN losses and regularisers as pure functions of logits and tensors (shared by every adversarial family)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Loss = Literal["nonsaturating", "hinge"]
LOSSES: tuple[str, ...] = ("nonsaturating", "hinge")


def check_loss(kind: str) -> None:
    """Fail early on an unknown loss name (one line naming the choices)."""
    if kind not in LOSSES:
        raise ValueError(f"unknown GAN loss {kind!r} (from --model.init_args.loss); use one of {', '.join(LOSSES)}")


def discriminator_loss(kind: Loss, real_logits: Tensor, fake_logits: Sequence[Tensor]) -> Tensor:
    """D loss: real pairs pushed up, each kind of fake pushed down; the fake kinds share weight 1 (GAN-CLS, Reed et al. 2016).

    With one fake kind this is the plain GAN loss; a matching-aware discriminator adds real images with wrong captions.
    """
    real_logits = real_logits.float()  # losses in fp32 even under bf16 autocast: softplus of large logits saturates
    if kind == "hinge":
        real_term = F.relu(1.0 - real_logits).mean()
        fake_terms = [F.relu(1.0 + f.float()).mean() for f in fake_logits]
    else:
        real_term = F.softplus(-real_logits).mean()
        fake_terms = [F.softplus(f.float()).mean() for f in fake_logits]
    return real_term + torch.stack(fake_terms).mean()


def generator_loss(kind: Loss, fake_logits: Tensor) -> Tensor:
    """G loss: non-saturating -log D(G(z)) (Goodfellow et al. 2014), or -D(G(z)) for hinge (Lim & Ye 2017)."""
    fake_logits = fake_logits.float()
    return -fake_logits.mean() if kind == "hinge" else F.softplus(-fake_logits).mean()


def r1_penalty(score: Callable[[Tensor], Tensor], real: Tensor) -> Tensor:
    """R1 (Mescheder et al. 2018): mean squared norm of dD/dx on real data, in fp32 with autocast off."""
    device_type = real.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        x = real.detach().float().requires_grad_(True)
        (grad,) = torch.autograd.grad(score(x).float().sum(), x, create_graph=True)
    return grad.square().flatten(1).sum(1).mean()
