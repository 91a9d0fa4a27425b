"""Improved precision and recall (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for Assessing
Generative Models"): each feature set spans a manifold, the union of balls reaching each point's k-th nearest neighbour;
precision is the share of generated features inside the real manifold, recall the share of real features inside the
generated one. The paper uses VGG16 features and k = 3; here any feature extractor's (FID's by default)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from datamodules.distributed import rank_world

CHUNK = 4096
"""Rows and columns of one block of pairwise distances: 64 MiB in float32, whatever the set sizes."""


def _distances(rows: Tensor, cols: Tensor) -> Tensor:
    return torch.cdist(rows.float(), cols.float())


def knn_radii(points: Tensor, k: int, chunk: int = CHUNK) -> Tensor:
    """Distance from each point to its k-th nearest other point, over blocks of `chunk` x `chunk` distances.

    A point's distance to itself (0) is the smallest of its row, so the k-th neighbour is the (k + 1)-th smallest, as
    in the paper's reference code and StyleGAN2-ADA's `kthvalue(nhood_size + 1)`."""
    radii = []
    for rows in points.split(chunk):
        nearest = rows.new_empty(rows.shape[0], 0)
        for cols in points.split(chunk):
            block = torch.cat([nearest, _distances(rows, cols)], dim=1)
            nearest = block.topk(min(k + 1, block.shape[1]), dim=1, largest=False).values
        radii.append(nearest[:, k])
    return torch.cat(radii)


def inside(probes: Tensor, manifold: Tensor, radii: Tensor, chunk: int = CHUNK) -> Tensor:
    """Whether each probe lies in at least one ball of the manifold (distance <= that point's radius, as the paper's
    Eq. 1 and StyleGAN2-ADA count it)."""
    hits = []
    for rows in probes.split(chunk):
        hit = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
        for cols, r in zip(manifold.split(chunk), radii.split(chunk), strict=True):
            hit |= (_distances(rows, cols) <= r[None, :]).any(dim=1)
        hits.append(hit)
    return torch.cat(hits)


def precision_recall(real: Tensor, fake: Tensor, k: int = 3, chunk: int = CHUNK) -> tuple[float, float]:
    """(precision, recall) of generated features `fake` [N, D] against real features `real` [M, D]."""
    for name, features in (("real", real), ("generated", fake)):
        if features.shape[0] <= k:
            raise ValueError(f"precision/recall with k={k} needs more than {k} {name} images, got {features.shape[0]}; "
                             f"give more images (--num-samples, real images in --data) or a smaller --precision-recall-k")
    matmul_precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # TF32 distances (~1e-3 off) would move points across ball edges
    try:
        precision = int(inside(fake, real, knn_radii(real, k, chunk), chunk).sum()) / fake.shape[0]
        recall = int(inside(real, fake, knn_radii(fake, k, chunk), chunk).sum()) / real.shape[0]
    finally:
        torch.set_float32_matmul_precision(matmul_precision)
    return precision, recall


class PrecisionRecall(Metric):
    """Improved precision and recall (Kynkaanniemi et al. 2019) over features gathered from every rank.

    Both feature sets are `cat` states, so `compute` (a collective: call it on every rank) sees all of them; every rank
    then computes the same numbers. The real side survives `reset()` (as FID's does with reset_real_features=False):
    it is loaded once from the reference statistics, and only generated features are forgotten.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_features: int, k: int = 3, chunk: int = CHUNK, **kwargs) -> None:
        super().__init__(**kwargs)
        if k < 1:
            raise ValueError(f"precision/recall needs k >= 1 nearest neighbours, got {k} (--precision-recall-k)")
        self.num_features, self.k, self.chunk = num_features, k, chunk
        self.add_state("real_features", [], dist_reduce_fx="cat")
        self.add_state("fake_features", [], dist_reduce_fx="cat")

    def update(self, features: Tensor, real: bool) -> None:
        """Add one batch of features [B, D] (of real or generated images) on this rank."""
        target = self.real_features if real else self.fake_features
        target.append(features.detach().flatten(1).float())

    def load_real(self, features: Tensor) -> None:
        """Use `features` as the real set: rank 0 holds them, the others none, so the gathered set is exactly them."""
        self.real_features = [features.to(self.device, torch.float32)] if rank_world()[0] == 0 else []

    def reset(self) -> None:
        """Forget the generated features; keep the real ones."""
        real = list(self.real_features) if isinstance(self.real_features, list) else [self.real_features]
        super().reset()  # clears list states in place
        self.real_features = real

    def _pack(self) -> None:
        # List states are gathered element by element, and an empty one as a 1-d tensor: each rank holds exactly one
        # [n, D] tensor before a sync, so every rank issues the same collectives with tensors of the same rank.
        for name in ("real_features", "fake_features"):
            parts = getattr(self, name)
            if isinstance(parts, list):
                empty = torch.zeros(0, self.num_features, device=self.device)
                setattr(self, name, [dim_zero_cat(parts) if parts else empty])

    def sync(self, *args, **kwargs) -> None:
        self._pack()
        super().sync(*args, **kwargs)

    def compute(self) -> dict:
        """precision, recall, and the set sizes and k they were computed with."""
        self._pack()  # outside DDP no sync ran
        real, fake = dim_zero_cat(self.real_features), dim_zero_cat(self.fake_features)
        precision, recall = precision_recall(real, fake, self.k, self.chunk)
        return {"precision": precision, "recall": recall, "k": self.k, "num_real": real.shape[0], "num_fake": fake.shape[0]}
