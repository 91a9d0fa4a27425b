"""The shapes dataset as an evaluation plug-in: attribute prompts, the judge's accuracy and its features."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from functools import cache

from torchmetrics import Metric

from datamodules import synthetic
from genart_lightning.metrics.features import FeatureExtractor
from genart_lightning.shapes.judge import AttributeAccuracy, JudgeFeatures, JudgeNet, load_or_train_judge


@cache
def shapes_captions() -> frozenset[str]:
    """Every caption the shapes dataset can have (a few thousand), to recognise shapes data by its captions."""
    out = set()
    for shape, colour, size, position, background in itertools.product(
        synthetic.SHAPES, synthetic.COLOURS, synthetic.SIZES, synthetic.POSITIONS, synthetic.COLOURS
    ):
        attrs = {"shape": shape, "colour": colour, "size": size, "position": position, "background": background}
        out.update(synthetic.caption_for(attrs, t) for t in range(len(synthetic.TEMPLATES)))
    return frozenset(out)


def shapes_prompts(n: int, seed: int) -> tuple[list[str], list[dict]]:
    """Attribute sets drawn for evaluation and their captions (built, not parsed, so the truth is exact)."""
    attrs = [synthetic.random_attributes(random.Random(f"eval-{seed}-{i}")) for i in range(n)]
    return [synthetic.caption_for(a, a["template"]) for a in attrs], attrs


class ShapesSuite:
    """`--prompts shapes` (per-attribute accuracy read by the judge) and `--fid-features judge`; one judge per size."""

    name = "shapes"
    feature_name = "judge"

    def __init__(self) -> None:
        self._judges: dict[int, JudgeNet] = {}

    def judge(self, resolution: int) -> JudgeNet:
        """The cached judge for this image size (trained once if missing)."""
        if resolution not in self._judges:
            self._judges[resolution] = load_or_train_judge(resolution)
        return self._judges[resolution]

    def recognises(self, captions: Sequence[str]) -> bool:
        return bool(captions) and all(c in shapes_captions() for c in captions)

    def prompts(self, n: int, seed: int) -> tuple[list[str], list[dict]]:
        return shapes_prompts(n, seed)

    def accuracy(self, resolution: int) -> Metric:
        return AttributeAccuracy(self.judge(resolution))

    def features(self, resolution: int) -> FeatureExtractor:
        return JudgeFeatures(self.judge(resolution), resolution)
