"""FID and KID (torchmetrics) over features computed once per image, with the real side served from cached stats."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from torchmetrics.utilities import dim_zero_cat

from datamodules.distributed import rank_world
from genart_lightning.metrics.reference_stats import KID_REFERENCE_MAX, ReferenceStats


class Precomputed(nn.Module):
    """Identity 'extractor': the runner extracts features once and feeds the same tensor to FID and KID."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def all_sum(value: int, device: torch.device | str = "cpu") -> int:
    """Sum an int over ranks (identity outside DDP)."""
    if rank_world()[1] == 1:
        return value
    t = torch.tensor([value], device=device, dtype=torch.long)
    dist.all_reduce(t)
    return int(t.item())


class FeatureDistances(nn.Module):
    """FID and KID between real and generated feature sets; every rank must call `compute` (it is a collective)."""

    def __init__(self, num_features: int, kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0,
                 kid: bool = True) -> None:
        """`kid=False`: Frechet distance only (FD-DINOv2); the real features are still kept, for the reference cache."""
        super().__init__()
        self.fid = FrechetInceptionDistance(feature=Precomputed(num_features), reset_real_features=False)
        self.kid = KernelInceptionDistance(
            feature=Precomputed(num_features), subsets=kid_subsets, subset_size=kid_subset_size, reset_real_features=False
        )
        self.num_features = num_features
        self.kid_subset_size = kid_subset_size
        self.seed = seed
        self.with_kid = kid
        self.fid.orig_dtype = torch.float64  # a rank that got no images still returns a value

    def update(self, features: Tensor, real: bool) -> None:
        """Add one batch of features (of real or generated images) on this rank."""
        features = features.detach().flatten(1)
        self.fid.update(features.double(), real=real)  # FID returns its value in this dtype
        if real or self.with_kid:
            self.kid.update(features.float(), real=real)

    def _pack_kid(self) -> None:
        # KID's list states are gathered element by element: ranks holding different numbers of batches would
        # issue mismatched collectives, so each rank holds exactly one (possibly empty) tensor before a sync.
        for name in ("real_features", "fake_features"):
            parts = getattr(self.kid, name)
            empty = torch.zeros(0, self.num_features, device=self.fid.device)
            setattr(self.kid, name, [dim_zero_cat(parts) if parts else empty])

    def gather_reference(self, key: dict) -> ReferenceStats:
        """Reference statistics of the real features added on all ranks (collective)."""
        self._pack_kid()
        with self.fid.sync_context():
            count = int(self.fid.real_features_num_samples)
            if count < 2:
                raise ValueError(f"FID needs at least 2 real images, got {count} from {key['shards'][:3]}...; check --data")
            total, outer = self.fid.real_features_sum.cpu(), self.fid.real_features_cov_sum.cpu()
        with self.kid.sync_context():
            features = dim_zero_cat(self.kid.real_features).cpu()
        if features.shape[0] > KID_REFERENCE_MAX:
            keep = torch.randperm(features.shape[0], generator=torch.Generator().manual_seed(self.seed))[:KID_REFERENCE_MAX]
            features = features[keep]
        return ReferenceStats.from_sums(total, outer, count, features, key)

    def load_reference(self, stats: ReferenceStats) -> None:
        """Put cached real statistics into the metric states; only rank 0 holds them, so the sum over ranks is exact."""
        device = self.fid.device
        self.fid.reset()
        self.kid.reset()
        self.kid.real_features = []
        zero = torch.zeros_like
        total, outer = stats.sums()
        if rank_world()[0] == 0:
            self.fid.real_features_sum = total.to(device, torch.float64)
            self.fid.real_features_cov_sum = outer.to(device, torch.float64)
            self.fid.real_features_num_samples = torch.tensor(stats.count, device=device)
            self.kid.real_features = [stats.features.to(device, torch.float32)]
        else:
            self.fid.real_features_sum = zero(self.fid.real_features_sum)
            self.fid.real_features_cov_sum = zero(self.fid.real_features_cov_sum)
            self.fid.real_features_num_samples = zero(self.fid.real_features_num_samples)

    def reset_generated(self) -> None:
        """Forget generated features, keep the real side (before each periodic evaluation)."""
        self.fid.reset()
        self.kid.reset()

    def compute(self) -> dict[str, float]:
        """FID, and KID mean/std over subsets (unless kid=False); call on every rank.

        The subset size is capped at half the smaller set: subsets as large as a whole set are all the same
        set, and their std (float noise, ~1e-7) would claim a precision KID does not have.
        """
        out = {"fid": float(self.fid.compute())}
        if not self.with_kid:
            return out
        device = self.fid.device
        num_fake = all_sum(int(self.fid.fake_features_num_samples), device)
        num_real_kid = all_sum(sum(len(f) for f in self.kid.real_features), device)  # the cache keeps fewer than FID's count
        self.kid.subset_size = max(min(self.kid_subset_size, min(num_fake, num_real_kid) // 2), 2)
        self._pack_kid()
        # Same seed on every rank: the subsets, hence the reported KID, agree across ranks.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            kid_mean, kid_std = self.kid.compute()
        out.update(kid=float(kid_mean), kid_std=float(kid_std), kid_subset_size=self.kid.subset_size)
        return out
