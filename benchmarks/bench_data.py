"""Data loading: TextImageDataModule vs a bare tar + PIL decode loop on the same shards, and 1 vs 2 workers; and on
512x384 JPEG shards cropped to 256px training images, vs webdataset's own pipeline doing the same work.

The baseline does only the unavoidable work (read tar members with Python's tarfile, decode each PNG with PIL, make
an array); ours adds grouping, caption decoding, error accounting, shuffling, batching and the [-1, 1] float tensor,
but reads tars with its own header parser (datamodules/tarstream.py). So the ratio mixes a cheaper tar read with the
pipeline's extra work; the extra line "same tar reader" compares ours with the bare loop over our reader, which
isolates the pipeline's cost per sample. Worker scaling is timed with the wall clock (the work runs in other
processes), so on a shared 2-core machine it is bounded by the cores other jobs leave free; the same blocks time 2 vs
1 processes of a pure-Python loop to show that bound.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import resource
import statistics
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

from benchmarks.common import Comparison, alternate, fix_threads
from datamodules.shards import write_shards
from datamodules.stream import read_shard
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


def _plain_pil_our_reader(shards: list[str]) -> int:
    """The same bare decode loop over our tar reader: what remains is the pipeline's own work."""
    count = 0
    for shard in shards:
        for sample in read_shard(shard):
            with Image.open(io.BytesIO(sample["png"])) as image:
                np.asarray(image.convert("RGB"))
            count += 1
    return count


def _ours(urls: str | list[str], image_size: int, workers: int, batch: int = 64) -> int:
    dm = TextImageDataModule(urls, batch_size=batch, num_workers=workers, image_size=image_size, shuffle_buffer=256,
                             pin_memory=False)
    dm.setup("fit")
    return sum(len(batch["key"]) for batch in dm.train_dataloader())


JPEG_SIZE, CROP, JPEG_BATCH = (512, 384), 256, 32


JPEG_NOISE = {"smooth": 0, "noisy": 48}
"""Per-pixel uniform noise amplitude over smooth colour fields: none (small JPEGs, cheap decode) or strong (photo-like
texture: JPEGs about 4x larger and slower to decode)."""


def _jpeg_shards(out: str, num: int, per_shard: int, noise: int) -> list[str]:
    """512x384 JPEGs (quality 90) of smooth colour fields plus uniform noise of amplitude `noise`, with captions."""
    rng = np.random.default_rng(0)
    width, height = JPEG_SIZE

    def sample(i: int) -> dict:
        low = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(low).resize(JPEG_SIZE, Image.Resampling.BICUBIC), dtype=np.int16)
        if noise:
            image = image + rng.integers(-noise, noise + 1, (height, width, 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        return {"__key__": f"{i:06d}", "jpg": buffer.getvalue(), "txt": f"photo number {i}".encode()}

    return [path for path, _ in write_shards((sample(i) for i in range(num)), out, "photos", per_shard)]


def _torchvision_v2(shards: list[str], workers: int) -> int:
    """What torchvision recommends for speed, read through webdataset: PIL decode, then transforms.v2 on uint8 tensors
    (ToImage, Resize(256, antialias=True), CenterCrop(256), ToDtype(float32, scale=True)), batches of 32."""
    import torch
    import webdataset as wds
    from torchvision.transforms import v2

    transform = v2.Compose([v2.ToImage(), v2.Resize(CROP, antialias=True), v2.CenterCrop(CROP),
                            v2.ToDtype(torch.float32, scale=True)])
    dataset = (wds.WebDataset(shards, shardshuffle=False, nodesplitter=None, workersplitter=wds.split_by_worker,
                              empty_check=False)
               .shuffle(256).decode("pilrgb").to_tuple("jpg", "txt").map_tuple(transform, lambda c: c)
               .batched(JPEG_BATCH, partial=False))
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=workers)
    return sum(len(images) for images, _ in loader)


def _rate(fn, *args, cpu: list[float] | None = None) -> float:
    """Samples per wall second of one pass; appends CPU microseconds per sample (with loader workers) to `cpu`."""
    start, start_cpu = time.perf_counter(), _cpu_seconds()
    samples = fn(*args)
    wall = time.perf_counter() - start
    if cpu is not None:
        cpu.append((_cpu_seconds() - start_cpu) / samples * 1e6)
    return samples / wall


def _spin(n: int) -> None:
    total = 0
    for i in range(n):
        total += i


def _core_rate(processes: int, loops: int = 20_000_000) -> float:
    """Pure-Python loop steps per wall second with `processes` forked at once: how many cores the machine gives us."""
    start = time.perf_counter()
    children = [multiprocessing.get_context("fork").Process(target=_spin, args=(loops,)) for _ in range(processes)]
    for child in children:
        child.start()
    for child in children:
        child.join()
    return processes * loops / (time.perf_counter() - start)


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (the loader joins its workers at epoch end)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def main(quick: bool = False) -> list[Comparison]:
    """Datamodule vs plain PIL decode (same process), and 2 vs 1 loader workers."""
    threads = fix_threads()
    num, size, rounds = (2000, 32, 3) if quick else (8000, 32, 5)
    with tempfile.TemporaryDirectory() as tmp:
        # 8 equal training shards (90% of num): workers get whole shards, so with 2 neither waits for the other.
        info = write_shapes_shards(tmp, num, image_size=size, samples_per_shard=num * 9 // 80)
        urls, shards = info["train_urls"], info["train_shards"]
        decode = alternate({"ours": lambda: _rate(_ours, urls, size, 0), "pil": lambda: _rate(_plain_pil, shards),
                            "reader": lambda: _rate(_plain_pil_our_reader, shards)}, rounds)
        cpu: dict[str, list[float]] = {"1": [], "2": []}
        scaling = alternate({w: lambda w=w: _rate(_ours, urls, size, int(w), cpu=cpu[w]) for w in ("2", "1")}
                            | {f"cores {n}": lambda n=n: _core_rate(n) for n in (2, 1)}, rounds)
        jpeg_num = 320 if quick else 960
        crops = {}
        for kind, noise in JPEG_NOISE.items():
            jpeg = _jpeg_shards(f"{tmp}/{kind}", jpeg_num, jpeg_num // 8, noise)
            crops[kind] = alternate({"ours": lambda jpeg=jpeg: _rate(_ours, jpeg, CROP, 2, JPEG_BATCH),
                                     "torchvision": lambda jpeg=jpeg: _rate(_torchvision_v2, jpeg, 2)}, rounds)
    jpeg_setup = (f"{jpeg_num} JPEGs of {JPEG_SIZE[0]}x{JPEG_SIZE[1]} (quality 90) in 8 shards -> {CROP}px centre crops, "
                  f"batch {JPEG_BATCH}, shuffle buffer 256, 2 workers each, {os.cpu_count()} cores; wall clock")
    setup = (f"{info['num_train']} shapes samples, {size}px PNG, {len(shards)} shards, batch 64, torch threads "
             f"{threads}, {os.cpu_count()} cores; wall clock; one epoch per block")
    cores = statistics.median(scaling["cores 2"]) / statistics.median(scaling["cores 1"])
    same_reader = statistics.median(decode["ours"]) / statistics.median(decode["reader"])
    return [
        Comparison(
            "data: datamodule vs plain PIL decode", "samples/s", "TextImageDataModule (0 workers)",
            "tar + PIL decode loop", decode["ours"], decode["pil"], higher_is_better=True, goal=0.9,
            goal_text="ours >= 0.9x the bare decode loop", setup=setup,
            note="ours also decodes captions, shuffles (buffer 256), batches and converts to float [-1, 1]; it reads"
            " tars with its own header parser where the baseline uses Python's tarfile",
            extra={"same tar reader": f"ours / bare loop over our tar reader: {same_reader:.3f} (the pipeline's own"
                   f" cost; that loop: median {statistics.median(decode['reader']):.0f} samples/s)"},
        ),
        *(Comparison(
            f"data: datamodule vs torchvision v2 pipeline, 256px crops of {kind} 512x384 JPEGs", "samples/s",
            "TextImageDataModule (2 workers)", "webdataset + PIL decode + transforms.v2 on uint8 tensors (2 workers)",
            crops[kind]["ours"], crops[kind]["torchvision"], higher_is_better=True, goal=1.0,
            goal_text="ours >= 1.0x torchvision v2", setup=jpeg_setup,
            note="both decode with PIL and resize with torchvision's uint8 antialiased kernel (the same pixels: "
                 "tests/test_datamodule_fastpaths.py); ours also plans exact epochs, counts bad samples, never unpickles "
                 "and scales to [-1, 1]",
        ) for kind in JPEG_NOISE),
        Comparison(
            "data: 2 vs 1 loader workers", "samples/s", "2 workers", "1 worker", scaling["2"], scaling["1"],
            higher_is_better=True, goal=1.3, goal_text="2 workers >= 1.3x one worker (needs 2 free cores)",
            setup=setup, note="bounded by free cores: the build machine has 2, shared with other jobs",
            extra={
                "CPU per sample": f"main process + workers, median: 1 worker {statistics.median(cpu['1'][-rounds:]):.0f} us,"
                f" 2 workers {statistics.median(cpu['2'][-rounds:]):.0f} us",
                "cores free": f"2 vs 1 processes of a pure-Python loop, in the same blocks: {cores:.2f}x, the most"
                " any loader could scale to during this run",
            },
        ),
    ]


if __name__ == "__main__":
    for result in main():
        print(result.line())
        print("  ", result.setup, "--", result.note)
