"""Real-data reference statistics for FID/KID: read the shards once, cache mean/cov/count, reuse them everywhere."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from datamodules.distributed import rank_world
from datamodules.shards import expand_urls, is_local

REAL_RESIZE = "shorter-side-bilinear-antialias+center-crop"
"""How the datamodule brings real images to the evaluated resolution (torchvision resize, then centre crop)."""
KID_REFERENCE_MAX = 10_000
"""Real features kept in the cache for KID (its subsets need features, not moments); bounds the file size."""


def default_cache_dir() -> Path:
    """$GENART_CACHE/fid_stats, else ~/.cache/genart/fid_stats."""
    return Path(os.environ.get("GENART_CACHE", Path.home() / ".cache" / "genart")).expanduser() / "fid_stats"


@dataclass
class ReferenceStats:
    """Moments of a real dataset's features (float64) plus a bounded feature sample for KID."""

    mean: Tensor  # [D] float64
    cov: Tensor  # [D, D] float64, unbiased (n - 1)
    count: int
    features: Tensor  # [<= KID_REFERENCE_MAX, D] float32
    key: dict  # what the statistics depend on: shards, extractor, resolution, resizing

    def save(self, path: Path) -> Path:
        """Write atomically: a concurrent reader never sees half a file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"mean": self.mean, "cov": self.cov, "count": self.count, "features": self.features, "key": self.key}, tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> ReferenceStats:
        """Read a cache file (tensors and plain data only)."""
        return cls(**torch.load(path, map_location="cpu", weights_only=True))

    @classmethod
    def from_sums(cls, total: Tensor, outer: Tensor, count: int, features: Tensor, key: dict) -> ReferenceStats:
        """Moments from the running sums torchmetrics' FID keeps (sum of f, sum of f f^T)."""
        mean = total / count
        cov = (outer - count * torch.outer(mean, mean)) / (count - 1)
        return cls(mean=mean, cov=cov, count=count, features=features, key=key)

    def sums(self) -> tuple[Tensor, Tensor]:
        """Inverse of from_sums: the (sum, sum of outer products) torchmetrics' FID state expects."""
        return self.mean * self.count, self.cov * (self.count - 1) + self.count * torch.outer(self.mean, self.mean)


def image_directory(urls: str | list[str]) -> Path | None:
    """The real data as one local image folder (`--data DIR`), or None for shards."""
    items = [urls] if isinstance(urls, str) else list(urls)
    return Path(items[0]) if len(items) == 1 and is_local(items[0]) and Path(items[0]).is_dir() else None


def real_loader(urls: str | list[str], resolution: int, batch_size: int, num_workers: int = 0):
    """This rank's batches of real images, resized as in training (shards, or one folder of image files)."""
    directory = image_directory(urls)
    if directory is not None:
        from genart_lightning.metrics.image_folder import ImageFolder

        rank, world = rank_world()
        return ({"image": images} for images, _ in ImageFolder(directory, resolution).batches(batch_size, rank, world))
    # The datamodule's validation split reads each sample once over all ranks, unpadded: a padded set biases FID.
    from datamodules.webdataset import TextImageDataModule

    data = TextImageDataModule(
        val_urls=urls, image_size=resolution, val_batch_size=batch_size, num_workers=num_workers, require_caption=False
    )
    return data.val_dataloader()


def reference_key(urls: str | list[str], feature_id: str, resize: str, resolution: int) -> dict:
    """Everything the statistics depend on; local shards add size and mtime so rewritten data is not served stale."""
    directory = image_directory(urls)
    if directory is not None:
        from genart_lightning.metrics.image_folder import ImageFolder

        return {"images": ImageFolder(directory, resolution).fingerprint(), "feature_extractor": feature_id,
                "extractor_resize": resize, "resolution": resolution, "real_resize": REAL_RESIZE}
    shards = []
    for shard in expand_urls(urls):
        if is_local(shard) and not Path(shard).is_file():
            raise FileNotFoundError(f"shard not found: {shard} (from --data {urls}); check the path and brace pattern")
        stat = Path(shard).stat() if is_local(shard) else None
        shards.append(f"{Path(shard).resolve()}:{stat.st_size}:{stat.st_mtime_ns}" if stat else shard)
    return {
        "shards": shards,
        "feature_extractor": feature_id,
        "extractor_resize": resize,
        "resolution": resolution,
        "real_resize": REAL_RESIZE,
    }


def cache_path(key: dict, cache_dir: str | Path | None = None) -> Path:
    """File named by a hash of the key, in the cache directory."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cache_dir or default_cache_dir()) / f"{key['feature_extractor']}-{key['resolution']}px-{digest}.pt"


def describe(stats: ReferenceStats) -> dict:
    """Plain-data summary for metrics.json."""
    sources = {k: len(stats.key[k]) for k in ("shards", "images") if k in stats.key}
    return {"count": stats.count, **{k: v for k, v in stats.key.items() if k not in sources},
            **{f"num_{k}": n for k, n in sources.items()}}
