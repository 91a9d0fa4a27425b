"""Aspect-ratio buckets: every batch holds images of one (height, width), close to the image's own aspect ratio.

Centre-cropping every image to a square throws away the sides of wide images and the top and bottom of tall ones,
and teaches a model that subjects are cut off (SDXL's paper shows it). Buckets keep about the same pixel count as
the square (`image_size`**2) at several aspect ratios; each image goes to the bucket nearest its own ratio, is
resized to cover it and centre-cropped into it.

Which bucket a sample goes to is decided from its image header before training (`scan_buckets`), so batch
composition is a pure function of the shard order: the epoch plan counts full batches per bucket, and a resumed
worker rebuilds its half-filled buckets by replaying the stream without decoding anything.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

MAX_ASPECT = 4.0
"""Auto buckets stop at 1:4 and 4:1."""


def auto_buckets(image_size: int, step: int, max_aspect: float = MAX_ASPECT) -> list[tuple[int, int]]:
    """(height, width) pairs, multiples of `step`, of at most image_size**2 pixels and each as large as that allows,
    from the tallest to the widest (the same ratios turned both ways); the square is always one."""
    if step < 1 or image_size % step:
        raise ValueError(f"bucket_step={step} must divide image_size={image_size} (--data.bucket_step)")
    area, tallest = image_size * image_size, {}
    for height in range(step, int(image_size * math.sqrt(max_aspect)) + 1, step):
        width = area // height // step * step
        if width >= step and max(height / width, width / height) <= max_aspect:
            tallest[width] = height  # several heights floor to one width: keep the largest bucket
    return sorted(((h, w) for w, h in tallest.items()), key=lambda hw: hw[1] / hw[0])


def parse_buckets(spec: str | Sequence[Sequence[int]], image_size: int, step: int) -> list[tuple[int, int]]:
    """`auto`, or an explicit list of (height, width)."""
    if spec == "auto":
        return auto_buckets(image_size, step)
    if isinstance(spec, str):
        raise ValueError(f"buckets={spec!r}: give auto or a list of [height, width] pairs (--data.buckets)")
    buckets = [tuple(int(v) for v in hw) for hw in spec]
    if not buckets or any(len(hw) != 2 or min(hw) < 1 for hw in buckets):
        raise ValueError(f"buckets={spec!r}: give auto or a list of [height, width] pairs of positive sizes")
    return sorted(set(buckets), key=lambda hw: hw[1] / hw[0])


def nearest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest the image's (in log ratio, so 2:1 and 1:2 are as far)."""
    ratio = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][1] / buckets[i][0]) - ratio))


@dataclass(frozen=True)
class Bucketing:
    """The buckets and, per shard URL, each sample's bucket (plain data: it pickles into loader workers)."""

    sizes: list[tuple[int, int]]
    of: dict[str, dict[str, int | None]] = field(default_factory=dict)  # url -> key -> bucket

    def bucket(self, url: str, key: str) -> int | None:
        return self.of.get(url, {}).get(key)

    def counts(self, url: str) -> list[int]:
        """Samples per bucket in one shard."""
        out = [0] * len(self.sizes)
        for bucket in self.of.get(url, {}).values():
            if bucket is not None:
                out[bucket] += 1
        return out

    def histogram(self) -> dict[tuple[int, int], int]:
        """Samples per bucket over all shards."""
        totals = [sum(column) for column in zip(*(self.counts(url) for url in self.of), strict=True)] if self.of else []
        return dict(zip(self.sizes, totals, strict=False))
