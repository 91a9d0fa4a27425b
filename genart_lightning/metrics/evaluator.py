"""One evaluation runner for `genart eval` and the periodic callback: sample, extract features once, score.

Under DDP every rank runs it: generated images are split in chunks (chunk c goes to rank c % world, seed
derived from c, so the images do not depend on the number of ranks), real images come from the
datamodule's unpadded validation split, and every rank calls each metric's `compute` (a collective).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor
from tqdm import tqdm

from datamodules.distributed import rank_world
from datamodules.shards import expand_urls
from datamodules.stream import read_shard
from genart_lightning.metrics.features import FeatureExtractor, build_features
from genart_lightning.metrics.fid import FeatureDistances, all_sum
from genart_lightning.metrics.image_folder import ImageFolder
from genart_lightning.metrics.reference_stats import (
    ReferenceStats,
    cache_path,
    describe,
    real_loader,
    reference_key,
)
from genart_lightning.metrics.suites import PromptSuite


def data_captions(urls: str | list[str], limit: int) -> list[str]:
    """The first `limit` captions of the shards, in order (prompts that follow the data's own caption style)."""
    captions: list[str] = []
    for url in expand_urls(urls):
        for sample in read_shard(url):
            if "txt" in sample:
                captions.append(sample["txt"].decode("utf-8").strip())
            if len(captions) >= limit:
                return captions
    if not captions:
        raise ValueError(f"no captions (KEY.txt) in {urls}; a conditional model needs them, or use --prompts shapes")
    return captions


def chunk_seed(seed: int, chunk: int) -> int:
    """Seed of the `chunk`-th batch of a run seeded `seed`: images depend on neither the batch's rank nor the world size."""
    return seed * 1_000_003 + chunk


def sample_options(sample: Callable[..., Tensor], options: dict) -> dict:
    """The options that were set (not None), checked against what `sample` takes: one line naming any it does not."""
    options = {k: v for k, v in options.items() if v is not None}
    accepted = inspect.signature(sample).parameters
    unknown = [k for k in options if k not in accepted]
    model = getattr(sample, "__self__", sample)
    family = type(model).__name__
    if {"height", "width"} & set(unknown) and hasattr(model, "image_shape"):
        _, height, width = model.image_shape()
        raise ValueError(f"{family} cannot change its sample size: it draws {height}x{width} images only (its trained "
                         "size); drop --height/--width for this family")
    if unknown:
        raise ValueError(f"{family}.sample() takes no {', '.join(unknown)}; drop --{unknown[0]} for this family")
    return options


def to_side(images: Tensor, side: int) -> Tensor:
    """Images [B, C, H, W] as real images are read for the reference: shorter side resized to `side` (bilinear,
    antialiased), centre-cropped to a square; images already `side` x `side` are returned as they are."""
    if images.shape[-2:] == (side, side):
        return images
    from torchvision.transforms import functional as TF

    if min(images.shape[-2:]) != side:
        images = TF.resize(images, side, antialias=True)
    return TF.center_crop(images, [side, side]).clamp(-1, 1)


class Samplable(Protocol):
    """What the evaluator needs of a family (`Samplable` keeps it): sampling, its image shape, its device."""

    conditional: bool
    reconstructs: bool
    device: torch.device
    training: bool

    def sample(self, n: int, captions: Sequence[str] | None = None, seed: int = 0, **options) -> Tensor: ...

    def image_shape(self) -> tuple[int, int, int]: ...

    def sampling_settings(self, options: dict) -> dict: ...

    def reconstruction_metrics(self, batches: Iterable[dict]) -> dict[str, float]: ...

    def train(self, mode: bool = True) -> Samplable: ...


class Evaluator:
    """Metrics of a model's samples against a real dataset; keeps extractor, reference and judge between calls."""

    def __init__(
        self,
        data_urls: str | list[str],
        num_samples: int,
        features: str | FeatureExtractor = "inception",
        fid_weights: str | None = None,
        prompts: str = "auto",
        clip_model: str | None = None,
        clip_pretrained: str | None = None,
        seed: int = 0,
        batch_size: int = 64,
        cache_dir: str | Path | None = None,
        num_workers: int = 0,
        progress: bool = False,
        suites: Sequence[PromptSuite] = (),
    ) -> None:
        """`suites`: dataset plug-ins whose names `prompts` and `features` may give (e.g. shapes, judge)."""
        self.suites = {suite.name: suite for suite in suites}
        choices = ("auto", "data", *self.suites)
        if prompts not in choices:
            raise ValueError(f"unknown prompts {prompts!r} (--prompts); choose one of {', '.join(choices)}")
        if num_samples < 2:
            raise ValueError(f"num_samples={num_samples}: FID needs at least 2 generated images (--num-samples)")
        self.data_urls, self.num_samples, self.features_spec = data_urls, num_samples, features
        self.fid_weights, self.prompts, self.seed, self.batch_size = fid_weights, prompts, seed, batch_size
        self.clip_model, self.clip_pretrained = clip_model, clip_pretrained
        self.cache_dir, self.num_workers = cache_dir, num_workers
        self.progress = progress  # a bar on rank 0 (the CLI); off inside fit, where Lightning's bar runs
        self._setup_for: tuple | None = None
        self._mode_set = False  # `mode` may be None (no captions), so whether it was set is kept apart

    def _setup(self, shape: tuple[int, int, int], device: torch.device, mode: str | None) -> None:
        """Build extractor, FID/KID with the real reference, the suite's accuracy and CLIP once per (resolution, device).

        `mode`: where captions come from (None: no captions; "data", "files" or a suite's name)."""
        channels, side, _ = shape
        if self._setup_for != (channels, side, device):
            self.extractor = self._features(side, channels).to(device).eval()
            self.distances = FeatureDistances(self.extractor.num_features, seed=self.seed).to(device)
            self.reference = self._reference(side, device)
            self._setup_for = (channels, side, device)
        if self._mode_set and self.mode == mode:
            return
        self.mode, self._mode_set = mode, True
        self.attributes = self.suites[mode].accuracy(side).to(device) if mode in self.suites else None
        self.clip = None
        if self.clip_model and mode is not None:
            from genart_lightning.metrics.clip_score import CLIPScore

            self.clip = CLIPScore(self.clip_model, self.clip_pretrained).to(device)

    def _features(self, side: int, channels: int) -> FeatureExtractor:
        spec = self.features_spec
        if isinstance(spec, FeatureExtractor):
            return spec
        by_name = {suite.feature_name: suite for suite in self.suites.values() if suite.feature_name}
        if spec in by_name:
            return by_name[spec].features(side)
        return build_features(spec, side, self.fid_weights, channels)

    def _reference(self, side: int, device: torch.device) -> dict:
        """Load cached real statistics, or compute them over all ranks and cache them (rank 0 writes)."""
        key = reference_key(self.data_urls, self.extractor.feature_id, self.extractor.resize, side)
        path = cache_path(key, self.cache_dir)
        rank, world = rank_world()
        # Decide together: a rank that cannot see the file would otherwise skip collectives the others run.
        if all_sum(int(path.is_file()), device) == world:
            stats = ReferenceStats.load(path)
            self.distances.load_reference(stats)
            return {**describe(stats), "cache": str(path), "reused": True}
        for batch in real_loader(self.data_urls, side, self.batch_size, self.num_workers):
            with torch.no_grad():
                self.distances.update(self.extractor(batch["image"].to(device)), real=True)
        stats = self.distances.gather_reference(key)
        if rank == 0:
            stats.save(path)
        return {**describe(stats), "cache": str(path), "reused": False}

    def _prompt_mode(self, model: Samplable) -> str | None:
        """None (unconditional), "data" (the shards' captions) or a suite's name."""
        if not model.conditional:
            return None
        if self.prompts != "auto":
            return self.prompts
        captions = data_captions(self.data_urls, 4)
        return next((name for name, suite in self.suites.items() if suite.recognises(captions)), "data")

    def _prompts(self) -> tuple[list[str] | None, list[dict] | None]:
        if self.mode in self.suites:
            return self.suites[self.mode].prompts(self.num_samples, self.seed)
        if self.mode == "data":
            captions = data_captions(self.data_urls, self.num_samples)
            return [captions[i % len(captions)] for i in range(self.num_samples)], None
        return None, None

    @torch.no_grad()
    def __call__(self, model: Samplable, guidance: float | None = None, **sample_kwargs) -> dict:
        """Evaluate `model` (on every rank); `guidance` and `sample_kwargs` go to `model.sample`. Samples of another
        size than the model's own (height / width) are scored as real images are read: shorter side resized to the
        trained size, centre-cropped."""
        sample_kwargs = sample_options(model.sample, {"guidance": guidance, **sample_kwargs})
        settings = model.sampling_settings(sample_kwargs)  # what sampling uses, defaults resolved; a bad size fails here
        device = model.device
        self._setup(model.image_shape(), device, self._prompt_mode(model))
        self._reset()
        captions, attributes = self._prompts()
        was_training = model.training
        model.eval()
        rank, world = rank_world()
        mine = [(chunk, start) for chunk, start in enumerate(range(0, self.num_samples, self.batch_size)) if chunk % world == rank]
        label = "sampling" if guidance is None else f"sampling, guidance {guidance:g}"
        for chunk, start in tqdm(mine, desc=label, unit="batch", disable=not self.progress or rank != 0):
            stop = min(start + self.batch_size, self.num_samples)
            chunk_captions = captions[start:stop] if captions else None
            images = model.sample(stop - start, captions=chunk_captions, seed=chunk_seed(self.seed, chunk), **sample_kwargs)
            images = to_side(images.float().clamp(-1, 1), self._setup_for[1])
            self._score(images.to(device), chunk_captions, attributes[start:stop] if attributes else None)
        model.train(was_training)
        out: dict = {"family": type(model).__name__, "num_samples": self.num_samples, "seed": self.seed,
                     "guidance": settings.get("guidance"), "sampling": settings, **self._scores(world)}
        if model.reconstructs:  # VAEs: how well they reconstruct the real data
            side = self._setup_for[1]
            out.update(model.reconstruction_metrics(real_loader(self.data_urls, side, self.batch_size, self.num_workers)))
        return out

    @torch.no_grad()
    def score_folder(self, folder: ImageFolder, device: torch.device | str = "cpu") -> dict:
        """Score image files (any model's samples) exactly as samples are scored: same features, resize, reference;
        CLIP score when the folder's samples.jsonl gives captions and a CLIP model is set."""
        device = torch.device(device)
        self._setup(folder.image_shape(), device, "files" if folder.captions else None)
        self._reset()
        rank, world = rank_world()
        batches = folder.batches(self.batch_size, rank, world)
        for images, captions in tqdm(batches, desc="scoring files", unit="batch", disable=not self.progress or rank != 0):
            self._score(images.to(device), captions, None)
        return {"fake": str(folder.directory.resolve()), "num_samples": len(folder.files), **self._scores(world)}

    def _reset(self) -> None:
        self.distances.reset_generated()
        for metric in (self.attributes, self.clip):
            if metric is not None:
                metric.reset()

    def _score(self, images: Tensor, captions: list[str] | None, attributes: list[dict] | None) -> None:
        self.distances.update(self.extractor(images), real=False)
        if self.clip is not None:
            self.clip.update(images, captions)
        if self.attributes is not None:
            self.attributes.update(images, attributes)

    def _scores(self, world: int) -> dict:
        """Every metric over what `_score` saw, with how each was computed (all ranks: `compute` is a collective)."""
        channels, side, _ = self._setup_for
        out: dict = {"resolution": side, "channels": channels, "world_size": world}
        out.update(self.distances.compute())
        out["feature_extractor"] = {
            "id": self.extractor.feature_id, "resize": self.extractor.resize, "num_features": self.extractor.num_features,
            "antialias": getattr(self.extractor, "antialias", None),
        }
        out["reference"] = self.reference
        out["prompts"] = self.mode
        if self.clip is not None:
            clip = self.clip.compute()
            out.update(clip_score=float(clip["clip_score"]), clip_truncated_captions=int(clip["truncated_captions"]))
            out["clip_model"] = {"id": self.clip.model_id, "context_length": self.clip.context_length,
                                 "truncation": f"captions longer than {self.clip.context_length} tokens are cut (end token kept)"}
        if self.attributes is not None:
            out.update({k: float(v) for k, v in self.attributes.compute().items()})
        return out


def evaluate(
    model: Samplable,
    data_urls: str | list[str],
    num_samples: int,
    features: str | FeatureExtractor = "inception",
    guidance: float | None = None,
    seed: int = 0,
    batch_size: int = 64,
    **options,
) -> dict:
    """Evaluate one model once (see `Evaluator` for the options); returns metrics with how they were computed."""
    evaluator = Evaluator(data_urls, num_samples, features, seed=seed, batch_size=batch_size, **options)
    return evaluator(model, guidance=guidance)
