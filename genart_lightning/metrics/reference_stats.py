"""Real-data reference statistics for FID/KID: read the shards once, cache mean/cov/count, reuse them everywhere."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from torch import Tensor
from torchvision.transforms.functional import pil_to_tensor

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
REAL_RESIZE = "center-crop+bicubic-antialias"
"""How real images whose size differs from the evaluated resolution are brought to it."""
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


def shard_list(urls: str | list[str]) -> list[str]:
    """Expand brace patterns; local shards must exist (a typo should fail here, not after an hour of sampling)."""
    shards = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else [u for url in urls for u in wds.shardlists.expand_urls(url)]
    for shard in shards:
        if "://" not in shard and not shard.startswith("pipe:") and not Path(shard).is_file():
            raise FileNotFoundError(f"shard not found: {shard} (from --data {urls}); check the path and brace pattern")
    return shards


def reference_key(urls: str | list[str], feature_id: str, resize: str, resolution: int, channels: int, max_samples: int | None) -> dict:
    """Everything the statistics depend on; local shards add size and mtime so rewritten data is not served stale."""
    shards = []
    for shard in shard_list(urls):
        if Path(shard).is_file():
            stat = Path(shard).stat()
            shards.append(f"{Path(shard).resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
        else:
            shards.append(shard)
    return {
        "shards": shards,
        "feature_extractor": feature_id,
        "extractor_resize": resize,
        "resolution": resolution,
        "real_resize": REAL_RESIZE,
        "channels": channels,
        "max_samples": max_samples,
    }


def cache_path(key: dict, cache_dir: str | Path | None = None) -> Path:
    """File named by a hash of the key, in the cache directory."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cache_dir or default_cache_dir()) / f"{key['feature_extractor']}-{key['resolution']}px-{digest}.pt"


def to_tensor(image: Image.Image, resolution: int, channels: int) -> Tensor:
    """PIL image -> [C, R, R] in [-1, 1]; other sizes are centre-cropped to square, then resized (REAL_RESIZE)."""
    x = pil_to_tensor(image.convert("L" if channels == 1 else "RGB")).float() / 127.5 - 1
    h, w = x.shape[-2:]
    if (h, w) != (resolution, resolution):
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        x = x[:, top : top + side, left : left + side]
        x = F.interpolate(x[None], size=(resolution, resolution), mode="bicubic", antialias=True, align_corners=False)[0]
    return x.clamp(-1, 1)


def iter_real_batches(
    urls: str | list[str], resolution: int, batch_size: int, rank: int = 0, world: int = 1,
    max_samples: int | None = None, channels: int = 3,
) -> Iterator[Tensor]:
    """This rank's share of the real images: sample i goes to rank i % world, none padded, none dropped."""
    samples = wds.DataPipeline(wds.SimpleShardList(shard_list(urls)), wds.tarfile_to_samples())
    batch: list[Tensor] = []
    for index, sample in enumerate(samples):
        if max_samples is not None and index >= max_samples:
            break
        if index % world != rank:
            continue  # decode only what this rank keeps
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            raise ValueError(f"sample {sample['__key__']} in {sample.get('__url__')} has no image ({', '.join(IMAGE_EXTENSIONS)})")
        batch.append(to_tensor(Image.open(io.BytesIO(sample[ext])), resolution, channels))
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


def describe(stats: ReferenceStats) -> dict:
    """Plain-data summary for metrics.json."""
    return {"count": stats.count, **{k: v for k, v in stats.key.items() if k != "shards"}, "num_shards": len(stats.key["shards"])}
