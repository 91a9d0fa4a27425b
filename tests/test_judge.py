"""Shapes judge: reads attributes of held-out real images, is at chance on noise, scores a text-faithful model high."""

from __future__ import annotations

import random

import pytest
import torch
from torchvision.transforms.functional import pil_to_tensor

from datamodules.synthetic import caption_for, draw
from genart_lightning.metrics.evaluator import Evaluator
from genart_lightning.models.base import GenerativeModel
from genart_lightning.shapes.judge import (
    ATTRIBUTES,
    AttributeAccuracy,
    JudgeFeatures,
    load_or_train_judge,
    render_batch,
)
from genart_lightning.shapes.suite import ShapesSuite, shapes_prompts


@pytest.fixture(scope="module")
def judge(genart_cache):
    return load_or_train_judge(32, genart_cache / "judge")


def test_judge_reads_held_out_shapes(judge):
    # Held-out: seeds the training set never uses; mild noise as generated images have.
    images, labels = render_batch([f"held-out-{i}" for i in range(400)], 32)
    noisy = images + 0.05 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = judge(noisy)
    accuracy = {name: (logits[name].argmax(1) == labels[name]).float().mean().item() for name in ATTRIBUTES}
    assert all(acc >= 0.95 for acc in accuracy.values()), accuracy  # measured: >= 0.985 on every attribute


def test_judge_features_are_of_order_one_for_kid(judge):
    """KID's kernel (x.y / d + 1)^3 is built for features of order 1; unscaled ReLU features put KID in the thousands."""
    images, _ = render_batch([f"held-out-{i}" for i in range(400)], 32)
    with torch.no_grad():
        features = JudgeFeatures(judge, 32)(images)
    rms = features.square().mean().sqrt().item()
    assert 0.8 < rms < 1.25, rms  # scale set from the training images; held-out ones come from the same renderer


def test_judge_scores_noise_at_chance(judge):
    g = torch.Generator().manual_seed(1)
    noise = torch.rand(600, 3, 32, 32, generator=g) * 2 - 1
    metric = AttributeAccuracy(judge)
    _, attributes = shapes_prompts(600, seed=5)
    metric.update(noise, attributes)
    result = metric.compute()
    for name, classes in ATTRIBUTES.items():
        chance = 1 / len(classes)
        # binomial std at n=600 is <= 0.02: 0.08 is 4+ sigma
        assert abs(float(result[f"{name}_accuracy"]) - chance) < 0.08, (name, float(result[f"{name}_accuracy"]))


class CaptionFollower(GenerativeModel):
    """Test family that draws exactly what the caption says (or ignores it): attribute accuracy's two ends."""

    conditional = True

    def __init__(self, image_size: int = 32, channels: int = 3, follow: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        _, attrs = shapes_prompts(64, seed=0)
        self.lookup = {caption_for(a, a["template"]): a for a in attrs}  # the captions evaluation will ask for

    def image_shape(self) -> tuple[int, int, int]:
        return (self.hparams.channels, self.hparams.image_size, self.hparams.image_size)

    def sample(self, n, captions=None, seed=0):
        rng = random.Random(seed)
        picks = [self.lookup[c] if self.hparams.follow else rng.choice(list(self.lookup.values())) for c in captions]
        return torch.stack([pil_to_tensor(draw(a, 32)) for a in picks]).float() / 127.5 - 1


def test_attribute_accuracy_through_the_runner(judge, shapes_shards, genart_cache, monkeypatch):
    monkeypatch.setenv("GENART_CACHE", str(genart_cache))  # `--fid-features judge` finds the judge trained above
    evaluator = Evaluator(shapes_shards["val_urls"], 64, "judge", batch_size=32, cache_dir=genart_cache / "fid", suites=[ShapesSuite()])
    follows, ignores = evaluator(CaptionFollower(follow=True)), evaluator(CaptionFollower(follow=False))
    assert follows["prompts"] == "shapes"  # recognised from the data's captions
    assert follows["attribute_accuracy"] > 0.95
    assert ignores["attribute_accuracy"] < 0.6
    assert follows["feature_extractor"]["id"].startswith("judge-32px")  # offline FID on shapes
    assert follows["reference"]["count"] == shapes_shards["num_val"]
