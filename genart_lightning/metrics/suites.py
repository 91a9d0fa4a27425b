"""The interface of a dataset plug-in for evaluation: prompts whose ground truth is known, and a metric that checks it.

The evaluator knows no dataset; a suite (the shapes plug-in in `genart_lightning.shapes`) brings prompts with
their attributes, an accuracy metric over generated images, and offline FID features under a name of its own
(`--fid-features judge`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from torchmetrics import Metric

from genart_lightning.metrics.features import FeatureExtractor


class PromptSuite(Protocol):
    """Prompts with ground truth + an accuracy metric (+ optional offline features) for one kind of data."""

    name: str
    """What `--prompts NAME` selects."""
    feature_name: str | None
    """What `--fid-features NAME` selects (None: the suite has no features)."""

    def recognises(self, captions: Sequence[str]) -> bool:
        """Whether captions read from a dataset are this suite's (for `--prompts auto`)."""
        ...

    def prompts(self, n: int, seed: int) -> tuple[list[str], list[dict]]:
        """`n` captions and the ground truth each one states, fixed by `seed`."""
        ...

    def accuracy(self, resolution: int) -> Metric:
        """A Metric whose `update(images, truths)` compares images with the truths and `compute()` gives a dict of rates."""
        ...

    def features(self, resolution: int) -> FeatureExtractor:
        """The suite's FID/KID features at this resolution."""
        ...
