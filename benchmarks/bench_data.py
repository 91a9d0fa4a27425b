"""Data loading: TextImageDataModule vs a bare tar + PIL decode loop on the same shards, and 1 vs 2 workers.

The baseline does only the unavoidable work (read tar members, decode each PNG with PIL, make an array); ours adds
grouping, caption decoding, error accounting, shuffling, batching and the [-1, 1] float tensor. The ratio says what
that costs per sample. Worker scaling is timed with the wall clock (the work runs in other processes), so on a
shared 2-core machine it is bounded by the cores other jobs leave free.
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

from benchmarks.common import Comparison, alternate, fix_threads
from datamodules.synthetic import write_shapes_shards
from datamodules.webdataset import TextImageDataModule


def _plain_pil(shards: list[str]) -> int:
    """Baseline: decode every image of the shards with PIL into a uint8 array."""
    count = 0
    for shard in shards:
        with tarfile.open(shard, "r|") as tar:
            for member in tar:
                if member.name.endswith(".png"):
                    with Image.open(io.BytesIO(tar.extractfile(member).read())) as image:
                        np.asarray(image.convert("RGB"))
                    count += 1
    return count


def _ours(urls: str, image_size: int, workers: int) -> int:
    dm = TextImageDataModule(urls, batch_size=64, num_workers=workers, image_size=image_size, shuffle_buffer=256,
                             pin_memory=False)
    dm.setup("fit")
    return sum(len(batch["key"]) for batch in dm.train_dataloader())


def _rate(fn, *args) -> float:
    """Samples per wall second of one pass."""
    start = time.perf_counter()
    samples = fn(*args)
    return samples / (time.perf_counter() - start)


def main(quick: bool = False) -> list[Comparison]:
    """Datamodule vs plain PIL decode (same process), and 2 vs 1 loader workers."""
    threads = fix_threads()
    num, size, rounds = (2000, 32, 3) if quick else (8000, 32, 5)
    with tempfile.TemporaryDirectory() as tmp:
        info = write_shapes_shards(tmp, num, image_size=size, samples_per_shard=num // 8)
        urls, shards = info["train_urls"], info["train_shards"]
        decode = alternate({"ours": lambda: _rate(_ours, urls, size, 0), "pil": lambda: _rate(_plain_pil, shards)},
                           rounds)
        scaling = alternate({"2": lambda: _rate(_ours, urls, size, 2), "1": lambda: _rate(_ours, urls, size, 1)},
                            rounds)
    setup = (f"{info['num_train']} shapes samples, {size}px PNG, {len(shards)} shards, batch 64, torch threads "
             f"{threads}, {os.cpu_count()} cores; wall clock; one epoch per block")
    return [
        Comparison(
            "data: datamodule vs plain PIL decode", "samples/s", "TextImageDataModule (0 workers)",
            "tar + PIL decode loop", decode["ours"], decode["pil"], higher_is_better=True, goal=0.9,
            goal_text="ours >= 0.9x the bare decode loop", setup=setup,
            note="ours also decodes captions, shuffles, batches and converts to float [-1, 1]",
        ),
        Comparison(
            "data: 2 vs 1 loader workers", "samples/s", "2 workers", "1 worker", scaling["2"], scaling["1"],
            higher_is_better=True, goal=1.3, goal_text="2 workers >= 1.3x one worker (needs 2 free cores)",
            setup=setup, note="bounded by free cores: the build machine has 2, shared with other jobs",
        ),
    ]


if __name__ == "__main__":
    for result in main():
        print(result.line())
        print("  ", result.setup, "--", result.note)
