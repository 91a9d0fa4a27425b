"""`--prompts digits` and `--fid-features digits`: prompts naming a digit, the judge's reading of the samples, and the
spread of each digit's samples against the real images of that digit (near-copies score far below 1)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from datamodules import digits
from genart_lightning.digits.judge import DigitsJudgeNet, judge_key, load_or_train_judge, real_digits
from genart_lightning.metrics.features import FeatureExtractor


@cache
def digit_captions() -> dict[str, int]:
    """Every caption the digits data can have -> its digit."""
    return {digits.caption(d, t): d for d in range(10) for t in range(len(digits.TEMPLATES))}


def feature_spread(features: Tensor) -> Tensor:
    """Root mean squared distance of features from their mean (0 for copies of one image)."""
    return (features - features.mean(0)).square().sum(1).mean().sqrt()


class DigitAccuracy(Metric):
    """Share of samples the judge reads as their prompt's digit, and `digit_spread`: per digit, the feature spread of
    its samples over that of the real training images of the digit, averaged over digits."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, judge: DigitsJudgeNet, real_spread: Tensor, **kwargs) -> None:
        super().__init__(**kwargs)
        self.judge = judge
        self.register_buffer("real_spread", real_spread)
        self.add_state("features", [], dist_reduce_fx="cat")
        self.add_state("digits", [], dist_reduce_fx="cat")
        self.add_state("correct", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, images: Tensor, truths: Sequence[dict]) -> None:
        wanted = torch.tensor([t["digit"] for t in truths], device=images.device)
        with torch.no_grad():
            self.correct += (self.judge(images).argmax(1) == wanted).sum()
            self.features.append(self.judge.features(images))
        self.digits.append(wanted)

    def compute(self) -> dict[str, Tensor]:
        features, wanted = dim_zero_cat(self.features), dim_zero_cat(self.digits)
        spreads = [feature_spread(features[wanted == d]) / self.real_spread[d] for d in range(10) if (wanted == d).sum() > 1]
        return {"digit_accuracy": self.correct.double() / max(len(wanted), 1),
                "digit_spread": torch.stack(spreads).mean() if spreads else torch.tensor(float("nan"))}


class DigitsFeatures(FeatureExtractor):
    """The digits judge's penultimate features as an FID/KID extractor (`--fid-features digits`)."""

    resize = "none"

    def __init__(self, judge: DigitsJudgeNet, image_size: int) -> None:
        super().__init__()
        self.judge, self.image_size = judge, image_size
        self.num_features = judge.feature_dim
        self.feature_id = f"{judge_key(image_size)}-features"

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"digits judge features expect {self.image_size}px images, got {tuple(images.shape[-2:])}")
        return self.judge.features(images)


class DigitsSuite:
    """Prompts cycle through the ten digits and the caption phrasings, so every digit gets the same share."""

    name = "digits"
    feature_name = "digits"

    def __init__(self) -> None:
        self._judges: dict[int, DigitsJudgeNet] = {}

    def judge(self, resolution: int) -> DigitsJudgeNet:
        if resolution not in self._judges:
            self._judges[resolution] = load_or_train_judge(resolution)
        return self._judges[resolution]

    def recognises(self, captions: Sequence[str]) -> bool:
        return bool(captions) and all(c in digit_captions() for c in captions)

    def prompts(self, n: int, seed: int) -> tuple[list[str], list[dict]]:
        truths = [{"digit": i % 10, "template": (i // 10 + seed) % len(digits.TEMPLATES)} for i in range(n)]
        return [digits.caption(t["digit"], t["template"]) for t in truths], truths

    def accuracy(self, resolution: int) -> Metric:
        judge = self.judge(resolution)
        images, labels = real_digits("train", resolution)
        with torch.no_grad():
            features = judge.features(images)
        return DigitAccuracy(judge, torch.stack([feature_spread(features[labels == d]) for d in range(10)]))

    def features(self, resolution: int) -> FeatureExtractor:
        return DigitsFeatures(self.judge(resolution), resolution)
