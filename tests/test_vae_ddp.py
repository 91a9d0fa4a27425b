"""The VAE config trains under 2-process CPU DDP through the real `genart fit` command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO

from genart_lightning.models.loading import load_model


@pytest.mark.slow
def test_vae_shapes_config_fits_with_two_process_ddp(shapes_shards_16px: dict, tmp_path: Path) -> None:
    steps = 6
    command = [
        sys.executable, "-m", "genart_lightning.cli", "fit", "--config", "experiments/vae_shapes.yaml",
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.logger=false",
        f"--trainer.max_steps={steps}", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
        f"--checkpoint.every_n_train_steps={steps}", "--sample_grid.every_n_steps=0", "--sample_grid.num_samples=4",
        f"--run_summary.path={tmp_path / 'metrics.json'}",
        "--model.init_args.image_size=16", "--model.init_args.base_channels=8", "--model.init_args.kl_warmup_steps=2",
        f"--data.init_args.train_urls={shapes_shards_16px['train_urls']}",
        f"--data.init_args.val_urls={shapes_shards_16px['val_urls']}",
        "--data.init_args.image_size=16", "--data.init_args.batch_size=16", "--data.init_args.num_workers=0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["global_step"] == steps
    assert {"val/psnr", "val/ssim", "train/latent_scale"} <= set(summary["metrics"])
    model = load_model(tmp_path / "checkpoints" / "last.ckpt")
    # the scale in the final checkpoint is the one the last training step computed (and logged)
    assert model.scaling != 1.0
    assert model.scaling == pytest.approx(summary["metrics"]["train/latent_scale"], rel=1e-6)
    latents = model.encode(torch.zeros(1, 3, 16, 16))
    assert latents.shape == (1, *model.latent_shape(16))
