"""Shared by the cluster tests (preemption, SLURM, export): tiny DCGAN and diffusion fit configs, checkpoint readers."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import yaml
from helpers import TINY_UNET
from lightning.pytorch import Callback

CHECKPOINT_EVERY = 10  # optimizer steps; a DCGAN iteration is 2 (D and G)


def dcgan_config(shards: dict, root: Path, max_steps: int) -> dict:
    """A 16px DCGAN with 8-channel nets on the shapes shards: a real GAN fit in a few seconds per rank on CPU."""
    return {
        "seed_everything": 0,
        "model": {
            "class_path": "genart_lightning.models.gan.DCGAN",
            "init_args": {"image_size": 16, "z_dim": 16, "g_channels": 8, "d_channels": 8},
        },
        "data": {
            "class_path": "datamodules.webdataset.TextImageDataModule",
            "init_args": {"train_urls": shards["train_urls"], "batch_size": 8, "num_workers": 0, "image_size": 16,
                          "shuffle_buffer": 16, "seed": 0},
        },
        "trainer": {
            "accelerator": "cpu",
            "max_steps": max_steps,
            "default_root_dir": str(root),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(root)}},
            "log_every_n_steps": 5,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
        "sample_grid": {"every_n_steps": 0, "num_samples": 4},
        "checkpoint": {"every_n_train_steps": CHECKPOINT_EVERY},
    }


def diffusion_config(shards: dict, root: Path, max_steps: int, val_every: int) -> dict:
    """16px text-conditional pixel diffusion as `ddpm_shapes.yaml` trains it (text tower trained along, warmup,
    clipping), with validation every `val_every` steps: what a resume must reproduce besides the weights."""
    return {
        "seed_everything": 0,
        "model": {
            "class_path": "genart_lightning.models.diffusion.PixelDiffusion",
            "init_args": {"image_size": 16, "backbone": {"class_path": "genart_lightning.nn.unet.UNetBackbone",
                                                         "init_args": dict(TINY_UNET)},
                          "train_text_encoder": True, "warmup_steps": 5, "ema_decay": 0.9},
        },
        "data": {
            "class_path": "datamodules.webdataset.TextImageDataModule",
            "init_args": {"train_urls": shards["train_urls"], "val_urls": shards["val_urls"], "batch_size": 16,
                          "num_workers": 0, "image_size": 16, "seed": 0},
        },
        "trainer": {
            "accelerator": "cpu", "max_steps": max_steps, "default_root_dir": str(root), "deterministic": True,
            "val_check_interval": val_every, "check_val_every_n_epoch": None, "limit_val_batches": 2,
            "gradient_clip_val": 1.0, "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
        },
        "sample_grid": {"every_n_steps": 0, "num_samples": 4},
        "checkpoint": {"every_n_train_steps": CHECKPOINT_EVERY},
    }


def write_config(config: dict, path: Path) -> Path:
    """Write a config as YAML and return its path."""
    path.write_text(yaml.safe_dump(config))
    return path


def load_checkpoint(path: Path) -> dict:
    """A training checkpoint read the way users and `genart sample` read it: weights_only, nothing executed."""
    return torch.load(path, map_location="cpu", weights_only=True)


class PaceSteps(Callback):
    """Sleep after each training batch so a job outside the test process is still running when signalled.

    Without it a fast machine can finish the whole job between the first checkpoint and the signal.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args: object) -> None:
        time.sleep(self.seconds)
