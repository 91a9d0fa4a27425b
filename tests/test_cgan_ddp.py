"""Conditional GAN under real 2-process CPU DDP: G, D and EMA end identical on both ranks, with no DDP errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO

# Every option that touches synchronisation is on: accumulation, n_critic, lazy R1, spectral norm (its vectors are
# buffers), conditional BatchNorm in G and the caption standardisation in G and D (their running statistics differ
# per rank unless averaged).
WORKER = """
import sys
import lightning as L
import torch
from datamodules.webdataset import TextImageDataModule
from genart_lightning.models.cgan import TextConditionalGAN

train_urls, out = sys.argv[1], sys.argv[2]
L.seed_everything(0)
model = TextConditionalGAN(
    image_size=16, z_dim=16, g_channels=8, d_channels=8, spectral_norm=True, loss="hinge",
    r1_gamma=1.0, r1_interval=2, n_critic=2, accumulate_grad_batches=2, ema_decay=0.9,
)
initial = {k: v.clone() for k, v in model.state_dict().items()}
data = TextImageDataModule(train_urls=train_urls, batch_size=8, num_workers=0, image_size=16)
trainer = L.Trainer(
    accelerator="cpu", devices=2, strategy="ddp", max_steps=6, logger=False, enable_checkpointing=False,
    enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
)
trainer.fit(model, datamodule=data)
torch.save({"state": model.state_dict(), "initial": initial, "g_steps": model.g_steps, "d_steps": model.d_steps}, f"{out}/rank{trainer.global_rank}.pt")
"""


@pytest.mark.slow
def test_two_process_ddp_keeps_g_d_and_ema_identical(shapes_shards_16px: dict, tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, str(script), shapes_shards_16px["train_urls"], str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "unused parameters" not in run.stderr and "find_unused_parameters" not in run.stderr

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # 6 optimizer steps = 4 D steps (each 2 micro-batches, R1 on the 1st and 3rd) + 2 G steps (n_critic=2) on both ranks
    assert [(r["d_steps"], r["g_steps"]) for r in ranks] == [(4, 2), (4, 2)]
    state0, state1 = ranks[0]["state"], ranks[1]["state"]
    assert state0.keys() == state1.keys()
    for prefix in ("generator.", "discriminator.", "ema."):
        names = [k for k in state0 if k.startswith(prefix)]
        assert names, prefix
        for name in names:
            assert torch.equal(state0[name], state1[name]), f"{name} differs across ranks"
    trained = ("generator.stem.weight", "discriminator.embed.parametrizations.weight.original", "ema.module.stem.weight")
    for name in (*trained, "generator.cond_norm.running_mean", "discriminator.cond_norm.running_mean"):
        assert not torch.equal(state0[name], ranks[0]["initial"][name]), f"{name} did not change"
