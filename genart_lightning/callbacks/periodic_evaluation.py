"""Periodic evaluation during fit: FID/KID (and CLIP score / attribute accuracy) as curves over training."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L

from genart_lightning.digits.suite import DigitsSuite
from genart_lightning.metrics.evaluator import Evaluator
from genart_lightning.models.base import GenerativeModel
from genart_lightning.shapes.suite import ShapesSuite


class PeriodicEvaluation(L.Callback):
    """Every `every_n_steps` optimizer steps, score `num_samples` samples against the validation shards (FID/KID, and
    FD-DINOv2 and precision/recall where asked).

    Runs on every rank (each samples its share; `compute` is a collective, so a rank-zero-only call
    would hang). Families sample with their EMA weights inside `sample()`, so the curve is the EMA
    model's. Values are logged as `val/fid`, `val/kid`, ... (so ModelCheckpoint can monitor them) and
    appended with how they were computed to `<log_dir>/eval/metrics.jsonl`. The real reference
    statistics are computed at the first evaluation and cached for later ones and for `genart eval`.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        num_samples: int = 1000,
        data_urls: str | list[str] | None = None,
        features: str = "inception",
        fid_weights: str | None = None,
        prompts: str = "auto",
        clip_model: str | None = None,
        clip_pretrained: str | None = None,
        guidance: float | None = None,
        batch_size: int = 64,
        seed: int = 0,
        fd_dinov2: str | None = None,
        precision_recall: str | None = None,
        precision_recall_k: int = 3,
    ) -> None:
        """
        Args:
            every_n_steps: evaluate when `trainer.global_step` passes a multiple of this (a GAN counts 2 per iteration).
            num_samples: generated images per evaluation (over all ranks).
            data_urls: real shards; default: the datamodule's `val_urls`.
            features: FID/KID features: inception, judge (shapes data, offline) or a TorchScript file.
            fid_weights: local Inception weights file (offline nodes).
            prompts: conditional families: auto, shapes (attribute accuracy) or data (the shards' captions).
            clip_model: OpenCLIP model for CLIP score (none by default); clip_pretrained: its tag or file.
            guidance: classifier-free guidance scale for diffusion families (default: the family's own).
            batch_size: images sampled per call on each rank.
            seed: sampling seed; the same at every evaluation, so curves compare like with like.
            fd_dinov2: also FD-DINOv2 (`val/fd_dinov2`): a Dinov2Model save_pretrained directory or a hub id in the hub cache.
            precision_recall: also `val/precision` and `val/recall` (k = precision_recall_k nearest neighbours) on the
                FID features ("fid") or DINOv2's ("dinov2", needs fd_dinov2); None: off.
        """
        self.every_n_steps = every_n_steps
        self.options = dict(
            num_samples=num_samples, features=features, fid_weights=fid_weights, prompts=prompts, clip_model=clip_model,
            clip_pretrained=clip_pretrained, batch_size=batch_size, seed=seed, fd_dinov2=fd_dinov2,
            precision_recall=precision_recall, precision_recall_k=precision_recall_k,
        )
        self.data_urls = data_urls
        self.guidance = guidance
        self.evaluator: Evaluator | None = None
        self._last_bucket = 0

    def _data_urls(self, trainer: L.Trainer) -> str | list[str]:
        data = getattr(trainer.datamodule, "hparams", None)
        if not self.data_urls and getattr(data, "kind", "images") == "latents":
            raise ValueError("PeriodicEvaluation needs real images, and the datamodule reads latent shards; set the "
                             "callback's data_urls to the image shards the cache was encoded from")
        urls = self.data_urls or getattr(data, "val_urls", None)
        if not urls:
            raise ValueError("PeriodicEvaluation has no real data: set its data_urls or the datamodule's --data.val_urls")
        return urls

    def evaluate(self, trainer: L.Trainer, pl_module: GenerativeModel) -> dict:
        """Evaluate now (all ranks), log the numbers and append the full record on rank 0."""
        if self.evaluator is None:
            self.evaluator = Evaluator(self._data_urls(trainer), **self.options, suites=[ShapesSuite(), DigitsSuite()])
        guidance = {"guidance": self.guidance} if self.guidance is not None else {}
        result = self.evaluator(pl_module, **guidance)
        result["step"] = trainer.global_step
        scores = {f"val/{k}": v for k, v in result.items() if isinstance(v, float) and k != "guidance"}  # settings: JSON
        for name, value in scores.items():
            # callback_metrics only (ModelCheckpoint can monitor val/fid); loggers get the values directly below,
            # since self.log would hold them back until a multiple of log_every_n_steps.
            pl_module.log(name, value, on_step=True, on_epoch=False, logger=False)
        for logger in trainer.loggers:
            logger.log_metrics(scores, step=trainer.global_step)
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask
        if trainer.is_global_zero:
            path = Path(log_dir or trainer.default_root_dir) / "eval" / "metrics.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps(result) + "\n")
        return result

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: GenerativeModel, outputs, batch, batch_idx: int) -> None:
        # Buckets, not `step % n == 0`: a GAN's global_step moves by 2 per batch and could skip the multiple.
        bucket = trainer.global_step // self.every_n_steps if self.every_n_steps > 0 else 0
        if bucket > self._last_bucket:
            self._last_bucket = bucket
            self.evaluate(trainer, pl_module)

    def state_dict(self) -> dict:
        return {"last_bucket": self._last_bucket}

    def load_state_dict(self, state_dict: dict) -> None:
        self._last_bucket = state_dict.get("last_bucket", 0)
