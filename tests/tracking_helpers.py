"""Shared by the tracking tests (sweeps, W&B, reproducibility): a tiny real fit config and the `genart` command."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tiny_config(shards: dict, max_steps: int = 8) -> dict:
    """A real VAE fit on 16px shapes shards, small enough for a few seconds on one CPU core."""
    return {
        "model": {
            "class_path": "genart_lightning.models.vae.VAE",
            "init_args": {"image_size": 16, "latent_channels": 2, "base_channels": 8, "channel_mults": [1, 2],
                          "num_res_blocks": 1, "lr": 1e-3, "num_logged_reconstructions": 0},
        },
        "data": {
            "class_path": "datamodules.webdataset.TextImageDataModule",
            "init_args": {"train_urls": shards["train_urls"], "val_urls": shards["val_urls"], "batch_size": 8,
                          "num_workers": 0, "image_size": 16, "shuffle_buffer": 16, "seed": 0},
        },
        "trainer": {"max_steps": max_steps, "accelerator": "cpu", "devices": 1, "log_every_n_steps": 1,
                    "limit_val_batches": 0, "enable_progress_bar": False,
                    "enable_model_summary": False},
        "sample_grid": {"every_n_steps": 0, "num_samples": 4},
    }


def genart(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `genart ARGS` as a user would (a fresh process) and fail with its output if it fails."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    out = subprocess.run([sys.executable, "-m", "genart_lightning.cli", *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"genart {' '.join(args)} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def step_losses(metrics_csv: Path, key: str = "train/loss") -> list[tuple[int, float]]:
    """(step, value) of every row of a CSVLogger metrics.csv that has `key`."""
    with open(metrics_csv) as f:
        return [(int(row["step"]), float(row[key])) for row in csv.DictReader(f) if row.get(key)]
