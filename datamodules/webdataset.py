"""TextImageDataModule: WebDataset text-image shards (img2dataset layout) for every family, correct under DDP.

Batches are dicts: `image` float [B,3,H,W] in [-1,1], `caption` list[str], `key` list[str]. With `kind: latents`
(shards written by `genart shards encode`) `latent` float [B,C,h,w] replaces `image`, and where the text encoder was
cached `text_tokens` [B,L,D], `text_mask` [B,L] and `text_pooled` [B,E] come along; `latent_cache` then holds what
made the cache, which the model checks against its own first stage and text encoder.

Training, mode "exact": shards are dealt to (rank, worker) slots, so every sample is read at most once per epoch,
and every rank gets the same number of full batches (a few samples per epoch are left out to make them equal; the
count is logged). Mode "resampled": each worker draws shards with replacement from its own seeded stream and every
rank makes `batches_per_epoch` batches. Validation reads every sample exactly once over all ranks, without padding,
so ranks may get one batch more or less than each other: log validation metrics through torchmetrics (or
`sync_dist=True` in epoch-level `self.log`), never with collective calls inside `validation_step`.
"""

from __future__ import annotations

import os
from typing import Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from datamodules.buckets import Bucketing, parse_buckets
from datamodules.distributed import rank_world
from datamodules.latents import read_cache_info
from datamodules.loader import ShardLoader, pin_memory_default
from datamodules.shards import count_samples, expand_urls, is_local, scan_buckets
from datamodules.stream import MAX_IMAGE_PIXELS, StreamConfig, Transform
from datamodules.tarstream import MAX_MEMBER_BYTES


def existing_shards(urls: str | list[str], name: str, flag: str | None = None) -> list[str]:
    """The shard URLs of `--data.NAME` (or of the option `flag`), or one line naming the first local shard that is
    missing (checked before a run starts, so a typo in a brace pattern costs no run directory)."""
    flag = flag or f"--data.{name}"
    expanded = expand_urls(urls)
    if not expanded:
        raise ValueError(f"no shards in {flag}={urls!r}; give a path or brace pattern")
    for url in expanded:
        if is_local(url) and not os.path.isfile(url):
            raise FileNotFoundError(
                f"shard not found: {url} (from {flag}); check the path and brace pattern,"
                " or write shards with `genart shards`"
            )
    return expanded


class TextImageDataModule(L.LightningDataModule):
    """Text-image WebDataset shards -> batches of {image, caption, key} for training and validation."""

    def __init__(
        self,
        train_urls: str | list[str] | None = None,
        val_urls: str | list[str] | None = None,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        image_size: int = 32,
        resize: bool = True,
        center_crop: bool = True,
        random_flip: bool = False,
        mode: Literal["exact", "resampled"] = "exact",
        batches_per_epoch: int | None = None,
        shuffle_buffer: int = 1000,
        require_caption: bool = True,
        strict: bool = False,
        max_member_bytes: int = MAX_MEMBER_BYTES,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        seed: int = 0,
        pin_memory: bool | None = None,
        kind: Literal["images", "latents"] = "images",
        buckets: str | list[list[int]] | None = None,
        bucket_step: int = 64,
    ):
        """
        Args:
            train_urls: training shards: brace pattern (data/train-{000000..000099}.tar), list, or pipe:/http URLs.
            val_urls: validation shards, read in order, each sample once over all ranks.
            batch_size: per-rank training batch size.
            val_batch_size: per-rank validation batch size (default: batch_size).
            num_workers: loader worker processes per rank; exact mode needs shards >= ranks x workers.
            image_size: output side in pixels (images are square).
            resize: resize the shorter side to image_size (else images must already be that size).
            center_crop: crop the centre square (else the resize stretches to a square).
            random_flip: horizontal flip of half the training images (decided from key, seed and epoch).
            mode: "exact" (each sample at most once per epoch) or "resampled" (shards drawn with replacement).
            batches_per_epoch: resampled mode: batches per rank per epoch (default: one pass over the data).
            shuffle_buffer: training samples shuffled in a buffer of this many per worker (1 = off).
            require_caption: skip samples without KEY.txt (False: they get caption "").
            strict: raise at the first unusable sample (naming shard and key) instead of skipping and counting.
            max_member_bytes: a tar member larger than this is read past and counted ("oversized member"), never held.
            max_image_pixels: an image with more pixels is refused from its header, before decoding ("corrupt image").
            seed: shard order, shuffling and flips; same seed, same epoch order.
            pin_memory: pin batches for faster GPU copies (default: when CUDA is available).
            kind: "images", or "latents": shards of `genart shards encode` (latents made once; image options unused).
            buckets: aspect-ratio buckets: "auto" (about image_size**2 pixels, sides multiples of bucket_step, 1:4 to
                4:1) or a list of [height, width]; every batch is one bucket, each image resized to cover its bucket
                and centre-cropped, with `original_size` and `crop_top_left` [B, 2] in the batch. Buckets are chosen
                from the image headers, read once per rank at setup.
            bucket_step: auto buckets' sides are multiples of this (64 as SDXL; a multiple of the network's
                downsampling, and of the VAE's for latent diffusion).
        """
        super().__init__()
        self.save_hyperparameters()
        if batch_size < 1 or num_workers < 0 or image_size < 1:
            raise ValueError(
                f"batch_size={batch_size}, num_workers={num_workers}, image_size={image_size}: need batch_size >= 1,"
                " num_workers >= 0, image_size >= 1 (--data.batch_size / --data.num_workers / --data.image_size)"
            )
        if kind == "latents" and buckets:
            raise ValueError("buckets resize images, but latent shards hold latents encoded at one size; train the "
                             "buckets from images (--data.kind=images) or leave --data.buckets unset")
        if kind == "latents" and random_flip:
            raise ValueError("random_flip flips images, but latent shards hold latents encoded once; set "
                             "--data.random_flip=false (or train from images: --data.kind=images)")
        self.train_loader: ShardLoader | None = None
        self.val_loader: ShardLoader | None = None
        self.latent_cache: dict | None = None
        """kind=latents: the latents.json record of the shards (first stage, scaling, text encoder, image size)."""

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return rank_world()

    def _urls(self, name: str) -> list[str]:
        return existing_shards(getattr(self.hparams, name), name)

    def _loader(self, name: str, stage: str, batch_size: int) -> ShardLoader:
        hp = self.hparams
        rank, world = self._rank_world()
        urls = self._urls(name)
        if hp.kind == "latents":
            cache = read_cache_info(urls)
            if self.latent_cache is not None and cache != self.latent_cache:
                raise ValueError(f"--data.train_urls and --data.val_urls are latent caches made differently ({urls[0]});"
                                 " encode both with the same first stage and text encoder")
            if cache.get("image_size") != hp.image_size:
                raise ValueError(f"the latent shards {urls[0]} were encoded from {cache.get('image_size')}px images;"
                                 f" set --data.image_size={cache.get('image_size')} (the model's image_size too)")
            self.latent_cache = cache
        counts = [count_samples(u, hp.require_caption, hp.kind) for u in urls]
        bucketing = self._bucketing(urls) if hp.buckets else None
        config = StreamConfig(
            urls=urls,
            stage=stage,
            mode=hp.mode,
            batch_size=batch_size,
            transform=Transform(hp.image_size, hp.resize, hp.center_crop, hp.random_flip),
            rank=rank,
            world_size=world,
            num_workers=self._workers_for(len(urls), world) if stage == "train" else hp.num_workers,
            seed=hp.seed,
            epoch=0,
            require_caption=hp.require_caption,
            strict=hp.strict,
            max_member_bytes=hp.max_member_bytes,
            max_image_pixels=hp.max_image_pixels,
            kind=hp.kind,
            bucketing=bucketing,
            shuffle_buffer=hp.shuffle_buffer if stage == "train" else 1,
        )
        pin = pin_memory_default() if hp.pin_memory is None else hp.pin_memory
        per_epoch = hp.batches_per_epoch or max(1, sum(counts) // (batch_size * world))
        loader = ShardLoader(config, counts, pin, per_epoch)
        if stage == "train":
            self._check_train_plan(loader, len(urls), sum(counts), world)
        return loader

    def _bucketing(self, urls: list[str]) -> Bucketing:
        """Each sample's aspect bucket, from the image headers of every shard (no decoding)."""
        hp = self.hparams
        sizes = parse_buckets(hp.buckets, hp.image_size, hp.bucket_step)
        bucketing = Bucketing(sizes, {url: dict(scan_buckets(url, sizes, hp.require_caption, hp.max_member_bytes,
                                                             hp.max_image_pixels)) for url in urls})
        histogram = ", ".join(f"{h}x{w}: {n}" for (h, w), n in bucketing.histogram().items())
        rank_zero_info(f"aspect buckets (height x width: samples) of {len(urls)} shards: {histogram}")
        return bucketing

    def _workers_for(self, num_shards: int, world: int) -> int:
        """Exact mode gives every worker whole shards: with fewer shards than ranks x workers (but one per rank at
        least), use as many workers as the shards allow, and say so in one line, instead of refusing to start."""
        hp = self.hparams
        if hp.mode != "exact" or hp.num_workers <= 1 or num_shards >= world * hp.num_workers or num_shards < world:
            return hp.num_workers
        workers = num_shards // world
        rank_zero_warn(f"{num_shards} training shards for {world} rank{'s' if world > 1 else ''} x {hp.num_workers} "
                       f"workers: using {workers} loader worker{'s' if workers > 1 else ''} per rank (exact mode gives "
                       "each worker whole shards); write smaller shards (genart shards ... --shard-size N) to use all")
        return workers

    def _check_train_plan(self, loader: ShardLoader, num_shards: int, num_samples: int, world: int) -> None:
        """Fail at setup, not as a DDP hang: every worker of every rank needs shards and at least one batch."""
        hp, workers = self.hparams, loader.workers
        if hp.mode == "exact" and num_shards < world * workers:  # fewer shards than ranks: workers were cut already
            raise ValueError(
                f"{num_shards} shards for {world} ranks: need >= {world} in exact mode (whole shards per rank);"
                " write more, smaller shards (genart shards ... --shard-size N) or use --data.mode=resampled"
            )
        plan = loader.plan()
        if plan.batches_per_rank < 1:
            raise ValueError(
                f"{num_samples} training samples give no full batch of {hp.batch_size} per rank for {world} ranks x"
                f" {workers} workers; lower --data.batch_size or --data.num_workers, or add data"
            )
        rank_zero_info(
            f"train data ({hp.mode}): {num_shards} shards, {num_samples} samples, {world} ranks x {workers} workers,"
            f" {plan.batches_per_rank} batches of {hp.batch_size} per rank per epoch"
            + (f"; {plan.dropped} samples left out in epoch 0 (full batches only"
               + (", the same number on every rank)" if world > 1 else ")") if hp.mode == "exact" and plan.dropped else "")
        )

    def setup(self, stage: str | None = None) -> None:
        """Count samples per shard and plan the loaders (on every rank, once its rank is known)."""
        if stage in (None, "fit") and self.hparams.train_urls and self.train_loader is None:
            self.train_loader = self._loader("train_urls", "train", self.hparams.batch_size)
        if stage in (None, "fit", "validate", "test") and self.hparams.val_urls and self.val_loader is None:
            self.val_loader = self._loader("val_urls", "val", self.hparams.val_batch_size or self.hparams.batch_size)

    def train_dataloader(self) -> ShardLoader:
        """Stateful training loader (mid-epoch resume restores its position)."""
        if self.train_loader is None:
            if not self.hparams.train_urls:
                raise ValueError("no training data: set --data.train_urls (e.g. data/train-{000000..000009}.tar)")
            self.setup("fit")
        return self.train_loader

    def val_dataloader(self) -> ShardLoader | list:
        """Validation loader: each sample once over all ranks; empty when no val_urls."""
        if self.val_loader is None and self.hparams.val_urls:
            self.setup("validate")
        return self.val_loader if self.val_loader is not None else []

    def test_dataloader(self) -> ShardLoader | list:
        """The validation shards (the shapes dataset has no separate test split)."""
        return self.val_dataloader()

    def state_dict(self) -> dict:
        """Nothing beyond the loader's own state, which Lightning saves through the fit loop."""
        return {}
