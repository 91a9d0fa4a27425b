"""Worker side of the text-image loader: read shards, decode with explicit decoders only, batch, report errors.

Nothing here ever unpickles: members other than images and .txt are skipped undecoded, so a crafted
KEY.pyd / KEY.pkl in a shard is inert (webdataset's default decoders would `pickle.loads` it).
"""

from __future__ import annotations

import io
import random
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.transforms.v2 import functional as F
from webdataset.gopen import gopen

from datamodules.latents import LATENT_MEMBER, TEXT_MEMBER, load_array, load_text
from datamodules.tarstream import MAX_MEMBER_BYTES, Oversized, tar_members

if TYPE_CHECKING:
    from datamodules.buckets import Bucketing

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
PAYLOADS = {"images": IMAGE_EXTENSIONS, "latents": (LATENT_MEMBER,)}
"""What a training sample of each data kind must hold besides its caption."""
READ_EXTENSIONS = frozenset((*IMAGE_EXTENSIONS, LATENT_MEMBER, TEXT_MEMBER, "txt"))
MAX_PASSES = 2
"""Exact mode re-reads a worker's shards at most once more when unreadable samples leave its quota unmet."""
PIPE_MAX_BYTES = 2 << 20
"""Image batches up to this size leave a loader worker as numpy arrays through its pipe, larger ones as tensors in
shared memory. Measured on the 2-core build machine: torch's shared-memory handoff (a new segment per batch, a socket
handshake to pass its descriptor) costs a worker more than copying a few MB through the pipe, and the main process
as much as copying ~2 MB."""


class BadSample(Exception):
    """A sample or shard that cannot be used; `reason` is the counter name, the message names shard and key."""

    def __init__(self, reason: str, shard: str, key: str, detail: str):
        super().__init__(f"{reason}: shard {shard}, key {key}: {detail}")
        self.reason = reason


@dataclass
class Skipped:
    """Per-worker counts of skipped samples by reason, and the last message (names shard and key)."""

    counts: Counter = field(default_factory=Counter)
    last: str = ""

    def add(self, exn: BadSample) -> None:
        self.counts[exn.reason] += 1
        self.last = str(exn)

    def state(self) -> tuple[dict, str]:
        return dict(self.counts), self.last


def resize_uint8(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """HWC uint8 array of `image` resized to (height, width) `size`, antialiased bilinear.

    Resized as a uint8 tensor with torchvision (its channels-last uint8 kernel), not with PIL: on 512x384 JPEGs to
    256px that took the resize from about 2.0 to 0.5 ms per image here, and it is the kernel torchvision's v2
    pipeline runs, so our output equals what users would get from `transforms.v2.Resize(antialias=True)`.
    """
    array = np.array(image, dtype=np.uint8)  # writable: torch refuses to wrap PIL's read-only buffer silently
    if array.shape[:2] == tuple(size):
        return array
    chw = torch.from_numpy(array).permute(2, 0, 1)  # a channels-last view, what the fast kernel reads
    return F.resize(chw, list(size), antialias=True).permute(1, 2, 0).numpy()


def centre_window(length: int, size: int) -> slice:
    """The `size` central positions of `length` (torchvision's centre-crop offset)."""
    start = int(round((length - size) / 2.0))
    return slice(start, start + size)


@dataclass(frozen=True)
class Transform:
    """Image options of the datamodule: resize shorter side, centre-crop to a square, random horizontal flip."""

    image_size: int
    resize: bool = True
    center_crop: bool = True
    random_flip: bool = False

    def __call__(self, image: Image.Image, flip: bool) -> np.ndarray:
        """HWC uint8 array of an RGB image; an image already at the output size is not resampled."""
        size = self.image_size
        array = self._fit(image) if image.size != (size, size) else np.asarray(image, dtype=np.uint8)
        return array[:, ::-1] if flip else array  # a view: collate's stack makes it contiguous

    def _fit(self, image: Image.Image) -> np.ndarray:
        size = self.image_size
        if self.resize and self.center_crop:
            longer = int(size * max(image.size) / min(image.size))  # shorter side to `size`, as transforms.v2.Resize
            array = resize_uint8(image, (longer, size) if image.width <= image.height else (size, longer))
        elif self.resize:
            array = resize_uint8(image, (size, size))
        else:
            array = np.asarray(image, dtype=np.uint8)
        if self.center_crop and array.shape[0] >= size and array.shape[1] >= size:
            array = array[centre_window(array.shape[0], size), centre_window(array.shape[1], size)]
        if array.shape[:2] != (size, size):
            raise ValueError(f"image is {image.size[0]}x{image.size[1]}, expected {size}x{size}; enable resize")
        return array


def cover_crop(image: Image.Image, size: tuple[int, int], flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """HWC uint8 array of `image` resized to cover (height, width) `size` (aspect kept) and centre-cropped into it,
    and the crop's (top, left) in the resized image (what SDXL's crop conditioning reads)."""
    height, width = size
    scale = max(height / image.height, width / image.width)
    resized = (max(height, round(image.height * scale)), max(width, round(image.width * scale)))
    array = resize_uint8(image, resized)
    top, left = (resized[0] - height) // 2, (resized[1] - width) // 2
    array = array[top : top + height, left : left + width]
    return (array[:, ::-1] if flip else array), np.array([top, left], dtype=np.int64)


MAX_IMAGE_PIXELS = 8192 * 8192
"""Default cap on an image's pixel count, checked from its header before decoding (decompression bombs)."""


def read_shard(url: str, everything: bool = False, max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[dict]:
    """Yield samples {"__key__", ext: bytes} of one tar, reading only image and caption members (all: `everything`).

    A member over `max_member_bytes` comes as `Oversized` (read past, never held); `untrusted_problem` names it.
    """
    stream = gopen(url)
    current: dict | None = None
    try:
        for (key, ext), data in tar_members(stream, _sample_member if everything else _wanted_member, max_member_bytes):
            if current is not None and key != current["__key__"]:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            current[ext] = data
    except Exception:
        # A truncated tail: the sample read so far is whole if it has its payload and caption (the cut came later).
        if current is not None and any(has_payload_and_caption(current, True, kind) for kind in PAYLOADS):
            yield current
        raise
    finally:
        stream.close()
    if current is not None:
        yield current


def oversized_problem(sample: dict) -> tuple[str, str] | None:
    """(reason, detail) when a member of `sample` was over the size cap and skipped."""
    for ext, value in sample.items():
        if isinstance(value, Oversized):
            return "oversized member", (f".{ext} member of {value.size} bytes is over max_member_bytes={value.limit}; "
                                        "re-encode it smaller or raise --data.max_member_bytes")
    return None


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """A lazily decoded PIL image, refused from its header alone when it has more than `max_pixels` pixels."""
    image = Image.open(io.BytesIO(data))
    if image.width * image.height > max_pixels:
        image.close()
        raise ValueError(f"image of {image.width}x{image.height} pixels is over max_image_pixels={max_pixels} "
                         "(a decompression bomb, or raise --data.max_image_pixels)")
    return image


def _sample_member(name: str) -> tuple[str, str] | None:
    """(key, lower-case extension) of a member name; the key ends at the first dot of the file name."""
    start = name.rfind("/") + 1
    dot = name.find(".", start)
    return (name[:dot], name[dot + 1 :].lower()) if dot > start else None


def _wanted_member(name: str) -> tuple[str, str] | None:
    parts = _sample_member(name)
    return parts if parts is not None and parts[1] in READ_EXTENSIONS else None


def has_payload_and_caption(sample: dict, require_caption: bool, kind: str = "images") -> bool:
    """Whether a raw sample can become a training example of this data kind (before decoding)."""
    return any(e in sample for e in PAYLOADS[kind]) and (not require_caption or "txt" in sample)


@dataclass
class StreamConfig:
    """Everything a worker needs to produce its part of one epoch; plain data so it pickles into workers."""

    urls: list[str]
    stage: str  # "train" or "val"
    mode: str  # "exact" or "resampled"
    batch_size: int
    transform: Transform
    rank: int
    world_size: int
    num_workers: int
    seed: int
    epoch: int
    require_caption: bool
    strict: bool
    shuffle_buffer: int
    max_member_bytes: int = MAX_MEMBER_BYTES
    max_image_pixels: int = MAX_IMAGE_PIXELS
    kind: str = "images"  # or "latents" (shards written by `genart shards encode`)
    bucketing: Bucketing | None = None  # aspect buckets: each sample's bucket, from the header scan
    slot_shards: list[list[int]] = field(default_factory=list)  # exact train: shard ids per slot
    slot_quotas: list[int] = field(default_factory=list)  # train: batches per slot
    resume: dict[int, tuple[int, int]] = field(default_factory=dict)  # slot -> (pops, batches) already consumed


class ShardStream(IterableDataset):
    """Yields this worker's batches; each batch carries `__slot__`/`__pops__`/`__index__`/`__skipped__` for the loader."""

    def __init__(self, config: StreamConfig):
        self.config = config

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        cfg = self.config
        if workers != max(1, cfg.num_workers):
            raise RuntimeError(f"stream planned for {cfg.num_workers} workers, running in {workers}")
        slot = cfg.rank * workers + worker
        skipped = Skipped()
        pops, index = cfg.resume.get(slot, (0, 0))
        quota = cfg.slot_quotas[slot] if cfg.stage == "train" else None
        if quota is not None and index >= quota:
            return
        samples = self._raw_samples(slot, skipped)
        batches = (self._bucketed if cfg.bucketing is not None else self._filled)(samples, pops, skipped)
        for pops, batch in batches:
            yield _collate(batch, slot, pops, index, skipped)
            index += 1
            if quota is not None and index >= quota:
                break
        else:
            if quota is not None:
                raise RuntimeError(
                    f"loader slot {slot} (rank {cfg.rank}, worker {worker}) made {index} of {quota} batches: too many"
                    " unreadable samples in its shards; repair or remove them (genart shards info URLS lists them)"
                )
        yield {"__slot__": slot, "__skipped__": skipped.state()}

    def _filled(self, samples: Iterator[dict], pops: int, skipped: Skipped) -> Iterator[tuple[int, list]]:
        """(stream position, decoded batch): full batches of usable samples in stream order (an unusable one is
        skipped and the next fills its place); validation keeps its last partial batch, so every sample is seen."""
        for _ in range(pops):  # resume: replay the stream (no decoding) to the consumed position
            next(samples)
        batch = []
        for raw in samples:
            pops += 1
            if (item := self._decode_or_skip(raw, skipped)) is not None:
                batch.append(item)
            if len(batch) == self.config.batch_size:
                yield pops, batch
                batch = []
        if batch and self.config.stage == "val":
            yield pops, batch

    def _bucketed(self, samples: Iterator[dict], pops: int, skipped: Skipped) -> Iterator[tuple[int, list]]:
        """(stream position, decoded batch) with aspect buckets: raw samples wait in their bucket (known from the
        header scan) until it holds a batch, which is then decoded into that bucket's size. Batch composition
        depends on the stream order alone, so a resume replays it (no decoding) to refill the waiting buckets. A
        sample whose image turns out corrupt leaves its batch one short rather than waiting for another."""
        cfg = self.config
        sizes, size = cfg.bucketing.sizes, cfg.batch_size
        waiting: list[list[dict]] = [[] for _ in sizes]
        position = 0
        for position, raw in enumerate(samples, start=1):
            replayed = position <= pops  # a resume replays what was consumed before the checkpoint
            bucket = cfg.bucketing.bucket(raw["__url__"], raw["__key__"])
            if bucket is None:
                if not replayed:
                    self._bad("corrupt image", raw["__url__"], raw["__key__"], "unreadable image header", skipped)
                continue
            waiting[bucket].append(raw)
            if len(waiting[bucket]) == size:
                full, waiting[bucket] = waiting[bucket], []
                if not replayed:
                    yield position, self._decode_batch(full, sizes[bucket], skipped)
        if cfg.stage == "val":  # every sample once: each bucket's remainder is one more (short) batch
            for bucket, rest in enumerate(waiting):
                if rest:
                    yield position, self._decode_batch(rest, sizes[bucket], skipped)

    def _decode_batch(self, raws: list[dict], size: tuple[int, int], skipped: Skipped) -> list:
        return [item for raw in raws if (item := self._decode_or_skip(raw, skipped, size)) is not None]

    def _decode_or_skip(self, raw: dict, skipped: Skipped, size: tuple[int, int] | None = None):
        try:
            return self._decode(raw, size)
        except BadSample as exn:
            if self.config.strict:
                raise
            skipped.add(exn)
            return None

    def _raw_samples(self, slot: int, skipped: Skipped) -> Iterator[dict]:
        """Usable raw samples of this slot in epoch order (shuffled for training); deterministic for replay."""
        cfg = self.config
        if cfg.stage == "val":
            slots = cfg.world_size * max(1, cfg.num_workers)
            # Every slot reads all validation shards and keeps every `slots`-th usable sample: no padding, no repeats.
            return (s for i, s in enumerate(self._read(range(len(cfg.urls)), skipped)) if i % slots == slot)
        rng = random.Random(f"{cfg.seed}-{cfg.epoch}-{cfg.rank}-{slot}")
        if cfg.mode == "resampled":
            shards = (rng.randrange(len(cfg.urls)) for _ in iter(int, 1))
            return _shuffled(self._read(shards, skipped), cfg.shuffle_buffer, rng)
        # One shuffle buffer per pass: the buffer must not read ahead into a re-read pass.
        return (
            sample
            for p in range(MAX_PASSES)
            for sample in _shuffled(self._read(_pass_order(cfg.slot_shards[slot], p, rng, skipped), skipped),
                                    cfg.shuffle_buffer, rng)
        )

    def _read(self, shard_ids, skipped: Skipped) -> Iterator[dict]:
        cfg = self.config
        for shard in shard_ids:
            url = cfg.urls[shard]
            key = "-"
            try:
                for sample in read_shard(url, max_member_bytes=cfg.max_member_bytes):
                    key = sample["__key__"]
                    if (oversized := oversized_problem(sample)) is not None:
                        self._bad(*oversized[:1], url, key, oversized[1], skipped)
                    elif not any(e in sample for e in PAYLOADS[cfg.kind]):
                        reason, detail = _missing_payload(cfg.kind)
                        self._bad(reason, url, key, detail, skipped)
                    elif cfg.require_caption and "txt" not in sample:
                        self._bad("no caption", url, key, "no .txt member", skipped)
                    else:
                        sample["__url__"] = url
                        yield sample
            except BadSample:
                raise
            except Exception as exn:  # a truncated or unreadable tar ends that shard, not the epoch
                self._bad("unreadable shard", url, f"after {key}", f"{type(exn).__name__}: {exn}", skipped)

    def _bad(self, reason: str, url: str, key: str, detail: str, skipped: Skipped) -> None:
        exn = BadSample(reason, url, key, detail)
        if self.config.strict:
            raise exn
        skipped.add(exn)

    def _decode(self, raw: dict, size: tuple[int, int] | None = None) -> tuple[str, str, dict[str, np.ndarray]]:
        """Explicit decoders: PIL for the image (numpy without pickle for latents), UTF-8 for the caption; nothing
        else is looked at."""
        key, url = raw["__key__"], raw["__url__"]
        try:
            caption = raw["txt"].decode("utf-8").strip() if "txt" in raw else ""
        except UnicodeDecodeError as exn:
            raise BadSample("bad caption", url, key, str(exn)) from None
        if self.config.kind == "latents":
            return key, caption, _decode_latent(raw, url)
        return key, caption, self._decode_image(raw, url, size)

    def _decode_image(self, raw: dict, url: str, size: tuple[int, int] | None) -> dict[str, np.ndarray]:
        """{"image"} (and for a bucket of (height, width) `size`, the original size and the crop's top left)."""
        cfg, key = self.config, raw["__key__"]
        ext = next(e for e in IMAGE_EXTENSIONS if e in raw)
        try:
            with open_image(raw[ext], cfg.max_image_pixels) as image:
                if cfg.transform.resize or size is not None:
                    height, width = size or (cfg.transform.image_size, cfg.transform.image_size)
                    image.draft("RGB", (width, height))  # JPEG: decode small
                image.load()
                flip = cfg.transform.random_flip and cfg.stage == "train" and _coin(cfg.seed, cfg.epoch, key)
                rgb = image if image.mode == "RGB" else image.convert("RGB")  # no copy of an RGB image
                if size is None:
                    return {"image": cfg.transform(rgb, flip)}
                original = np.array([rgb.height, rgb.width], dtype=np.int64)
                array, top_left = cover_crop(rgb, size, flip)
                return {"image": array, "original_size": original, "crop_top_left": top_left}
        except Exception as exn:
            raise BadSample("corrupt image", url, key, f"{type(exn).__name__}: {exn}") from None


def _missing_payload(kind: str) -> tuple[str, str]:
    if kind == "latents":
        return "no latent", f"no .{LATENT_MEMBER} member (latent shards come from `genart shards encode`)"
    return "no image", "no .jpg/.jpeg/.png/.webp member"


def _decode_latent(raw: dict, url: str) -> dict[str, np.ndarray]:
    """The cached latent (and text states, where cached) as float32 / bool arrays."""
    key = raw["__key__"]
    try:
        arrays = {"latent": load_array(raw[LATENT_MEMBER]).astype(np.float32)}
        if TEXT_MEMBER in raw:
            text = load_text(raw[TEXT_MEMBER])
            arrays |= {"text_tokens": text["tokens"].astype(np.float32), "text_mask": text["mask"].astype(bool),
                       "text_pooled": text["pooled"].astype(np.float32)}
    except Exception as exn:
        raise BadSample("corrupt latent", url, key, f"{type(exn).__name__}: {exn}") from None
    if arrays["latent"].ndim != 3:
        raise BadSample("corrupt latent", url, key, f"latent of shape {arrays['latent'].shape}, expected [C, h, w]")
    return arrays


def _pass_order(shards: list[int], pass_index: int, rng: random.Random, skipped: Skipped) -> list[int]:
    if pass_index > 0:  # only reached when unreadable samples left the quota unmet
        skipped.counts["shards re-read to fill the epoch"] += 1
    order = list(shards)
    rng.shuffle(order)
    return order


def _coin(seed: int, epoch: int, key: str) -> bool:
    """Flip decision from the sample key, so it does not depend on stream position (resume replays no decoding)."""
    return zlib.crc32(f"{seed}-{epoch}-{key}".encode()) & 1 == 1


def _shuffled(items: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Shuffle buffer whose output depends only on the input order and rng, so a replay reproduces it."""
    if size <= 1:
        yield from items
        return
    buffer: list[dict] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def _collate(batch: list[tuple[str, str, dict[str, np.ndarray]]], slot: int, pops: int, index: int,
             skipped: Skipped) -> dict:
    arrays = {}
    for name in batch[0][2]:
        try:
            stacked = torch.from_numpy(np.stack([b[2][name] for b in batch]))
        except ValueError as exn:  # latents of several sizes, or text cached for some samples only
            raise RuntimeError(f"{name} arrays of different shapes in one batch ({exn}); encode every shard of the "
                               "cache with the same image size and text encoder") from None
        if name == "image":
            stacked = stacked.permute(0, 3, 1, 2)
            stacked = stacked.to(torch.float32, memory_format=torch.contiguous_format).div_(127.5).sub_(1.0)
        arrays[name] = stacked.numpy() if stacked.nbytes <= PIPE_MAX_BYTES else stacked  # ShardLoader makes tensors
    return {
        **arrays,
        "caption": [b[1] for b in batch],
        "key": [b[0] for b in batch],
        "__slot__": slot,
        "__pops__": pops,
        "__index__": index,
        "__skipped__": skipped.state(),
    }
