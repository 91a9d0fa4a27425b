"""Differentiable augmentation of every image a GAN discriminator sees, real and generated alike.

On small datasets D memorises the real images, its feedback to G stops generalising and G collapses onto a few
outputs. Augmenting D's inputs, with ops that G's gradients pass through so the generated distribution is not
itself pushed towards augmented images, removes most of that: DiffAugment (Zhao et al. 2020) always applies colour,
translation and cutout; ADA (Karras et al. 2020) applies its ops with a probability p that it raises while D is
overconfident on real images (the mean sign of its real logits above a target, 0.6) and lowers otherwise.

This module has DiffAugment's three ops and ADA's controller over them (not ADA's 18-op pipeline). Written here
because neither paper's code is a maintained package; kornia's augmentations are differentiable but a large
dependency for three tensor ops, and none of them carries ADA's feedback loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

OPS = ("color", "translation", "cutout")


def check_policy(policy: Sequence[str]) -> tuple[str, ...]:
    unknown = [op for op in policy if op not in OPS]
    if unknown:
        raise ValueError(f"unknown augmentation {unknown[0]!r} (from --model.init_args.augment); use some of {', '.join(OPS)}")
    return tuple(policy)


def color(x: Tensor) -> Tensor:
    """Random brightness (+-0.5), saturation (x0-2) and contrast (x0.5-1.5) per image, on images in [-1, 1]."""
    n = x.shape[0]
    rand = lambda: torch.rand(n, 1, 1, 1, device=x.device, dtype=x.dtype)  # noqa: E731
    x = x + (rand() - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (rand() * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (rand() + 0.5) + mean


def translation(x: Tensor, ratio: float = 0.125) -> Tensor:
    """Shift each image by up to `ratio` of its size in whole pixels, filling with zeros (mid-grey in [-1, 1])."""
    n, _, h, w = x.shape
    shift = torch.stack([torch.randint(-int(s * ratio), int(s * ratio) + 1, (n,), device=x.device) for s in (w, h)], dim=1).to(x.dtype)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = -2 * shift / torch.tensor([w, h], device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def cutout(x: Tensor, ratio: float = 0.5) -> Tensor:
    """Zero one square of `ratio` of the image side per image, at a random place (it may hang over the edge)."""
    n, _, h, w = x.shape
    size = torch.tensor([int(h * ratio + 0.5), int(w * ratio + 0.5)], device=x.device)
    corner = torch.stack([torch.randint(0, s + 1, (n,), device=x.device) for s in (h, w)], dim=1)
    corner = corner - size // 2
    rows = torch.arange(h, device=x.device)[None, :, None]
    cols = torch.arange(w, device=x.device)[None, None, :]
    inside = ((rows >= corner[:, 0, None, None]) & (rows < corner[:, 0, None, None] + size[0])
              & (cols >= corner[:, 1, None, None]) & (cols < corner[:, 1, None, None] + size[1]))
    return x * (~inside)[:, None].to(x.dtype)


APPLY = {"color": color, "translation": translation, "cutout": cutout}


class DiscriminatorAugment(nn.Module):
    """Applies each op of `policy` to each image with probability p: fixed at `p` (1: DiffAugment), or adapted as
    in ADA when `target` is set: every `interval` updates p moves by sign(E[sign(D(real))] - target) times the
    images seen over `speed_images` (ADA's 500k; small CPU runs want a few thousand). p is saved in checkpoints."""

    def __init__(self, policy: Sequence[str] = OPS, p: float = 1.0, target: float | None = None,
                 interval: int = 4, speed_images: int = 20_000) -> None:
        super().__init__()
        self.policy = check_policy(policy)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"augment_p {p} is out of range; use a probability in [0, 1]")
        self.target, self.interval, self.speed_images = target, interval, speed_images
        self.register_buffer("p", torch.tensor(0.0 if target is not None else p))
        self.register_buffer("sign_sum", torch.zeros(2))  # sum of sign(real logits), their count since the last update

    def forward(self, x: Tensor) -> Tensor:
        """Each op on a random share p of the images; p stays a tensor, so a D call never waits for the device."""
        for op in self.policy:
            applied = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < self.p
            x = torch.where(applied, APPLY[op](x), x)
        return x

    @torch.no_grad()
    def observe(self, real_logits: Tensor) -> None:
        """Accumulate D's verdicts on real images (ranks average these buffers with D's at each D step)."""
        if self.target is not None:
            self.sign_sum += torch.stack([real_logits.sign().sum().float(), real_logits.new_tensor(real_logits.numel()).float()])

    @torch.no_grad()
    def update(self, d_steps: int) -> None:
        """Every `interval` D steps, move p towards the target by the images seen since the last move."""
        if self.target is not None and d_steps % self.interval == 0:  # tensor ops only: no wait for the device
            overfit = self.sign_sum[0] / self.sign_sum[1].clamp(min=1)
            step = self.sign_sum[1] / self.speed_images
            self.p.copy_((self.p + torch.sign(overfit - self.target) * step).clamp(0.0, 1.0))
            self.sign_sum.zero_()
