"""Shapes judge: a small CNN trained on the shapes ground truth that reads attributes back from images.

It scores text control offline (attribute accuracy, no downloaded weights) and its penultimate
features make `--fid-features judge`. Trained once per image size and dataset version, then cached.
"""

from __future__ import annotations

import hashlib
import inspect
import random
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchvision.transforms.functional import pil_to_tensor

from datamodules import synthetic
from genart_lightning.metrics.features import FeatureExtractor
from genart_lightning.metrics.judge_cache import load_or_train

ATTRIBUTES: dict[str, list[str]] = {
    "shape": list(synthetic.SHAPES),
    "colour": list(synthetic.COLOURS),
    "size": list(synthetic.SIZES),
    "position": list(synthetic.POSITIONS),
    "background": list(synthetic.COLOURS),
}
"""What the judge reads from an image, with the class names of each head."""

TRAIN_RECIPE = {"num_images": 4096, "steps": 500, "batch_size": 64, "lr": 3e-3, "width": 24, "feature_dim": 64, "seed": 0}
"""Part of the cache key: changing the recipe retrains."""


class JudgeNet(nn.Module):
    """Conv trunk -> `feature_dim` features -> one linear head per attribute; keeps a 4x4 map so position is readable."""

    def __init__(self, width: int = 16, feature_dim: int = 64) -> None:
        super().__init__()

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.trunk = nn.Sequential(
            *block(3, width, 2), *block(width, 2 * width, 2), *block(2 * width, 4 * width, 2),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(4 * width * 16, feature_dim), nn.ReLU(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, len(classes)) for name, classes in ATTRIBUTES.items()})
        self.feature_dim = feature_dim
        # 1 / RMS of the features over the training images, set after training. KID's cubic kernel
        # (x.y / d + 1)^3 assumes features of order 1, as Inception's are; unscaled, KID ran into the thousands.
        self.register_buffer("feature_scale", torch.ones(()))

    def features(self, images: Tensor) -> Tensor:
        """Penultimate features [B, feature_dim] of images in [-1, 1]."""
        return self.trunk(images)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        h = self.features(images)
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: Tensor) -> dict[str, list[str]]:
        """Attribute names read from each image."""
        logits = self(images)
        return {name: [ATTRIBUTES[name][i] for i in logits[name].argmax(1).tolist()] for name in ATTRIBUTES}


def render_batch(seeds: Sequence[str], image_size: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Shapes images in [-1, 1] and attribute class indices, each sample fixed by its seed string."""
    images, labels = [], {name: [] for name in ATTRIBUTES}
    for seed in seeds:
        image, attrs, _ = synthetic.render_sample(random.Random(seed), image_size)
        images.append(pil_to_tensor(image).float() / 127.5 - 1)
        for name, classes in ATTRIBUTES.items():
            labels[name].append(classes.index(attrs[name]))
    return torch.stack(images), {name: torch.tensor(v) for name, v in labels.items()}


def judge_key(image_size: int) -> str:
    """Cache key: image size, the shapes renderer's source (the dataset version) and the training recipe."""
    source = inspect.getsource(synthetic) + inspect.getsource(JudgeNet) + repr(sorted(TRAIN_RECIPE.items()))
    return f"judge-{image_size}px-{hashlib.sha256(source.encode()).hexdigest()[:16]}"


def train_judge(image_size: int = 32, recipe: dict | None = None) -> JudgeNet:
    """Train the judge on freshly rendered shapes (CPU, well under a minute at 32px); deterministic for a recipe."""
    r = {**TRAIN_RECIPE, **(recipe or {})}
    images, labels = render_batch([f"judge-train-{i}" for i in range(r["num_images"])], image_size)
    threads = torch.get_num_threads()
    # Convs this small gain nothing from threads on a shared machine (they slow down ~8x under contention),
    # and one thread makes the weights independent of the core count.
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():  # callers may be inside no_grad (evaluation)
            torch.manual_seed(r["seed"])
            net = JudgeNet(r["width"], r["feature_dim"])
            _fit(net, images, labels, r)
            net.eval()
            with torch.no_grad():
                net.feature_scale.copy_(net.features(images).square().mean().rsqrt())
    finally:
        torch.set_num_threads(threads)
    return net.requires_grad_(False)


def _fit(net: JudgeNet, images: Tensor, labels: dict[str, Tensor], r: dict) -> None:
    opt = torch.optim.AdamW(net.parameters(), lr=r["lr"], weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=r["steps"])
    net.train()
    for _ in range(r["steps"]):
        idx = torch.randint(0, len(images), (r["batch_size"],))
        # Generated images are noisy and blurred; seeing both keeps the judge's reading stable on them.
        x = images[idx] + torch.randn(len(idx), 1, 1, 1).abs() * 0.1 * torch.randn_like(images[idx])
        blur = torch.rand(len(idx), 1, 1, 1) < 0.3
        x = torch.where(blur, F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1), x)
        logits = net(x)
        loss = sum(F.cross_entropy(logits[name], labels[name][idx]) for name in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


def load_or_train_judge(image_size: int = 32, cache_dir: str | Path | None = None) -> JudgeNet:
    """The cached judge for this image size (trained once if missing; `metrics.judge_cache`)."""
    return load_or_train(judge_key(image_size), lambda: train_judge(image_size),
                         lambda: JudgeNet(TRAIN_RECIPE["width"], TRAIN_RECIPE["feature_dim"]), cache_dir)


class JudgeFeatures(FeatureExtractor):
    """The judge's penultimate features as an FID/KID extractor (`--fid-features judge`): offline FID on shapes."""

    resize = "none"

    def __init__(self, judge: JudgeNet, image_size: int) -> None:
        super().__init__()
        self.judge = judge
        self.image_size = image_size
        self.num_features = judge.feature_dim
        self.feature_id = f"{judge_key(image_size)}-features"

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise ValueError(f"judge features expect {self.image_size}px images, got {tuple(images.shape[-2:])}; train the judge at that size")
        return self.judge.features(images) * self.judge.feature_scale


class AttributeAccuracy(Metric):
    """Per attribute, the fraction of generated images whose judged attribute equals the prompt's."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, judge: JudgeNet, **kwargs) -> None:
        super().__init__(**kwargs)
        self.judge = judge
        self.add_state("correct", torch.zeros(len(ATTRIBUTES), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, images: Tensor, attributes: Sequence[dict]) -> None:
        """Judge images generated from prompts built out of `attributes` (one dict per image)."""
        self.judge.eval()
        predicted = self.judge.predict(images)
        for i, name in enumerate(ATTRIBUTES):
            self.correct[i] += sum(p == a[name] for p, a in zip(predicted[name], attributes, strict=True))
        self.total += len(attributes)

    def compute(self) -> dict[str, Tensor]:
        """`{attribute}_accuracy` for each attribute and their mean, `attribute_accuracy`."""
        acc = self.correct.double() / self.total.clamp(min=1)
        return {**{f"{name}_accuracy": acc[i] for i, name in enumerate(ATTRIBUTES)}, "attribute_accuracy": acc.mean()}
