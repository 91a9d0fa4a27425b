"""One feature network and the metrics computed on its features, with the real side from cached reference statistics:
Frechet distance (+ KID) and optionally precision/recall. The evaluator holds one per network (FID's, DINOv2's)."""

from __future__ import annotations

import torch
from torch import Tensor

from genart_lightning.metrics.features import FeatureExtractor
from genart_lightning.metrics.fid import FeatureDistances
from genart_lightning.metrics.precision_recall import PrecisionRecall
from genart_lightning.metrics.reference_stats import ReferenceStats


class FeatureSpace:
    """`extractor`'s features of real and generated images, scored by FD (+ KID) and, when `precision_recall_k` is set,
    by precision/recall (real side: the reference's cached feature sample, so first and later evaluations agree)."""

    def __init__(self, extractor: FeatureExtractor, device: torch.device, kid: bool = True,
                 precision_recall_k: int | None = None, seed: int = 0) -> None:
        self.extractor = extractor.to(device).eval()
        self.distances = FeatureDistances(extractor.num_features, seed=seed, kid=kid).to(device)
        self.precision_recall = (PrecisionRecall(extractor.num_features, k=precision_recall_k).to(device)
                                 if precision_recall_k else None)
        self.reference: dict = {}

    def update(self, images: Tensor, real: bool = False) -> None:
        """Add a batch of images on this rank; real images only while the reference is being computed."""
        features = self.extractor(images)
        self.distances.update(features, real=real)
        if self.precision_recall is not None and not real:
            self.precision_recall.update(features, real=False)

    def use_reference(self, stats: ReferenceStats, summary: dict) -> None:
        """Take the real side from `stats`, whether just computed or read from the cache."""
        self.distances.load_reference(stats)
        if self.precision_recall is not None:
            self.precision_recall.load_real(stats.features)
        self.reference = summary

    def reset_generated(self) -> None:
        self.distances.reset_generated()
        if self.precision_recall is not None:
            self.precision_recall.reset()

    def compute(self) -> dict:
        """FD (as `fid`) and KID unless disabled, `precision_recall` settings and values when enabled (collective)."""
        out: dict = self.distances.compute()
        if self.precision_recall is not None:
            out["precision_recall"] = self.precision_recall.compute()
        return out

