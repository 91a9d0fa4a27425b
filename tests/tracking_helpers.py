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


def start_genart(*args: str, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """Start `genart ARGS` as a user would (a fresh process, one CPU thread); stdout and stderr together."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "genart_lightning.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    """Wait for a started `genart` and fail with the end of its output if it failed; returns the output."""
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(proc.args[2:])} exited {proc.returncode}:\n{out[-4000:]}"
    return out


def genart(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300) -> str:
    """Run `genart ARGS` to the end; returns its output."""
    return finish(start_genart(*args, cwd=cwd, env=env), timeout)


def step_losses(metrics_csv: Path, key: str = "train/loss") -> list[tuple[int, float]]:
    """(step, value) of every row of a CSVLogger metrics.csv that has `key`."""
    with open(metrics_csv) as f:
        return [(int(row["step"]), float(row[key])) for row in csv.DictReader(f) if row.get(key)]
