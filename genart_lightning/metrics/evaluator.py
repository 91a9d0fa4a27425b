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
from genart_lightning.metrics.feature_space import FeatureSpace
from genart_lightning.metrics.features import FeatureExtractor, build_features
from genart_lightning.metrics.fid import all_sum
from genart_lightning.metrics.image_folder import ImageFolder
from genart_lightning.metrics.reference_stats import (
    KID_REFERENCE_MAX,
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
        fd_dinov2: str | None = None,
        precision_recall: str | None = None,
        precision_recall_k: int = 3,
    ) -> None:
        """`suites`: dataset plug-ins whose names `prompts` and `features` may give (e.g. shapes, judge).
        `fd_dinov2`: a DINOv2 directory or hub id (FD-DINOv2 beside FID). `precision_recall`: None (off), "fid" (on
        FID's features) or "dinov2" (on DINOv2's), with `precision_recall_k` nearest neighbours."""
        self.suites = {suite.name: suite for suite in suites}
        choices = ("auto", "data", *self.suites)
        if prompts not in choices:
            raise ValueError(f"unknown prompts {prompts!r} (--prompts); choose one of {', '.join(choices)}")
        if precision_recall not in (None, "fid", "dinov2"):
            raise ValueError(f"unknown precision/recall features {precision_recall!r} (--precision-recall); choose fid "
                             "(the FID features) or dinov2")
        if precision_recall == "dinov2" and not fd_dinov2:
            raise ValueError("--precision-recall dinov2 needs the DINOv2 network: add --fd-dinov2 PATH_OR_HUB_ID")
        if precision_recall and precision_recall_k < 1:
            raise ValueError(f"--precision-recall-k {precision_recall_k}: needs at least 1 nearest neighbour (paper: 3)")
        self.fd_dinov2, self.precision_recall, self.precision_recall_k = fd_dinov2, precision_recall, precision_recall_k
        self._dinov2: FeatureExtractor | None = None  # loaded once: it does not depend on the resolution
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
            k = self.precision_recall_k
            self.spaces = {"fid": FeatureSpace(self._features(side, channels), device, seed=self.seed,
                                               precision_recall_k=k if self.precision_recall == "fid" else None)}
            if self.fd_dinov2:
                if self._dinov2 is None:
                    from genart_lightning.metrics.dinov2 import DINOv2Features

                    self._dinov2 = DINOv2Features(self.fd_dinov2)
                self.spaces["fd_dinov2"] = FeatureSpace(self._dinov2, device, kid=False, seed=self.seed,
                                                        precision_recall_k=k if self.precision_recall == "dinov2" else None)
            self._references(side, device)
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

    def _references(self, side: int, device: torch.device) -> None:
        """Each feature space's real statistics: from the cache, or from one pass over the real images shared by every
        space that lacks them, gathered over all ranks and cached (rank 0 writes). Either way the real side is then
        taken from the statistics, so a first evaluation scores exactly as later, cached ones do."""
        rank, world = rank_world()
        missing = []
        for space in self.spaces.values():
            key = reference_key(self.data_urls, space.extractor.feature_id, space.extractor.resize, side)
            path = cache_path(key, self.cache_dir)
            # Decide together: a rank that cannot see the file would otherwise skip collectives the others run.
            if all_sum(int(path.is_file()), device) == world:
                stats = ReferenceStats.load(path)
                space.use_reference(stats, {**describe(stats), "cache": str(path), "reused": True})
            else:
                missing.append((space, key, path))
        if not missing:
            return
        for batch in real_loader(self.data_urls, side, self.batch_size, self.num_workers):
            images = batch["image"].to(device)
            with torch.no_grad():
                for space, _, _ in missing:
                    space.update(images, real=True)
        for space, key, path in missing:
            stats = space.distances.gather_reference(key)
            if rank == 0:
                stats.save(path)
            space.use_reference(stats, {**describe(stats), "cache": str(path), "reused": False})

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
        for space in self.spaces.values():
            space.reset_generated()
        for metric in (self.attributes, self.clip):
            if metric is not None:
                metric.reset()

    def _score(self, images: Tensor, captions: list[str] | None, attributes: list[dict] | None) -> None:
        for space in self.spaces.values():
            space.update(images)
        if self.clip is not None:
            self.clip.update(images, captions)
        if self.attributes is not None:
            self.attributes.update(images, attributes)

    def _scores(self, world: int) -> dict:
        """Every metric over what `_score` saw, with how each was computed (all ranks: `compute` is a collective)."""
        channels, side, _ = self._setup_for
        out: dict = {"resolution": side, "channels": channels, "world_size": world}
        scores = {name: space.compute() for name, space in self.spaces.items()}
        fid = self.spaces["fid"]
        out.update({k: v for k, v in scores["fid"].items() if k != "precision_recall"})
        out["feature_extractor"] = fid.extractor.describe()
        out["reference"] = fid.reference
        if "fd_dinov2" in self.spaces:
            dinov2 = self.spaces["fd_dinov2"]
            out["fd_dinov2"] = scores["fd_dinov2"]["fid"]
            out["fd_dinov2_features"] = {**dinov2.extractor.describe(), "reference": dinov2.reference}
        pr = next((s["precision_recall"] for s in scores.values() if "precision_recall" in s), None)
        if pr is not None:
            out.update(precision=pr.pop("precision"), recall=pr.pop("recall"))
            space = self.spaces["fid" if self.precision_recall == "fid" else "fd_dinov2"]
            out["precision_recall"] = {**pr, "features": space.extractor.feature_id,
                                       "real": "the reference's cached feature sample (all real images up to "
                                               f"{KID_REFERENCE_MAX}, else a seeded random subset)",
                                       "ball": "k-th nearest neighbour distance, inclusive (Kynkaanniemi et al. 2019)"}
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
