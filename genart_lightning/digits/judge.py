"""Digits judge: a small CNN trained on the real training digits (never on generated images) that reads the digit.

Trained once per image size and recipe, then cached beside the shapes judge. Its penultimate features (scaled to unit
RMS over the real images) give the offline FID and the spread of a prompt's samples.
"""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules import digits
from genart_lightning.metrics.judge_cache import load_or_train

TRAIN_RECIPE = {"steps": 800, "batch_size": 64, "lr": 2e-3, "width": 32, "feature_dim": 64, "seed": 0}
"""Part of the cache key: changing the recipe retrains."""


class DigitsJudgeNet(nn.Module):
    """Two conv stages -> `feature_dim` features -> 10 logits; images in [-1, 1], any side divisible by 4."""

    def __init__(self, width: int = 32, feature_dim: int = 64) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(2 * width * 16, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, 10)
        self.feature_dim = feature_dim
        self.register_buffer("feature_scale", torch.ones(()))  # 1 / RMS of real features (KID expects order 1)

    def features(self, images: Tensor) -> Tensor:
        return self.trunk(images) * self.feature_scale

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.trunk(images))


def real_digits(split: str, image_size: int) -> tuple[Tensor, Tensor]:
    """(images in [-1, 1] [N, 3, S, S], labels [N]) of one split of the held-out scheme of `datamodules.digits`."""
    images, labels = digits.load_digits_arrays()
    index = digits.split_indices(labels)[split]
    pixels = np.stack([digits.upscale(images[i], image_size) for i in index])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1, torch.from_numpy(labels[index])


def train_judge(image_size: int, recipe: dict | None = None) -> DigitsJudgeNet:
    """Train on the real training split with noise and blur (generated digits are both); deterministic, one thread."""
    r = {**TRAIN_RECIPE, **(recipe or {})}
    images, labels = real_digits("train", image_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.manual_seed(r["seed"])
            net = DigitsJudgeNet(r["width"], r["feature_dim"])
            opt = torch.optim.AdamW(net.parameters(), lr=r["lr"], weight_decay=1e-4)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=r["steps"])
            net.train()
            for _ in range(r["steps"]):
                idx = torch.randint(0, len(images), (r["batch_size"],))
                x = images[idx] + torch.rand(len(idx), 1, 1, 1) * 0.2 * torch.randn_like(images[idx])
                blur = torch.rand(len(idx), 1, 1, 1) < 0.3
                x = torch.where(blur, F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1), x)
                loss = F.cross_entropy(net(x), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            net.eval()
            with torch.no_grad():
                net.feature_scale.copy_(net.trunk(images).square().mean().rsqrt())
    finally:
        torch.set_num_threads(threads)
    return net.requires_grad_(False)


def judge_key(image_size: int) -> str:
    source = inspect.getsource(digits) + inspect.getsource(DigitsJudgeNet) + repr(sorted(TRAIN_RECIPE.items()))
    return f"digits-judge-{image_size}px-{hashlib.sha256(source.encode()).hexdigest()[:16]}"


def load_or_train_judge(image_size: int, cache_dir: str | Path | None = None) -> DigitsJudgeNet:
    """The cached judge for this image size (trained once if missing; `metrics.judge_cache`)."""
    return load_or_train(judge_key(image_size), lambda: train_judge(image_size),
                         lambda: DigitsJudgeNet(TRAIN_RECIPE["width"], TRAIN_RECIPE["feature_dim"]), cache_dir)
