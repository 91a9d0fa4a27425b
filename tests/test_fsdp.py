"""FSDP2 (`--trainer.strategy fsdp2`) on 2 CPU processes with gloo: the code path users run on GPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from tiny_pipelines import tiny_sd_pipeline

from genart_lightning.models.diffusion import PixelDiffusion
from genart_lightning.models.gan import DCGAN
from genart_lightning.models.loading import load_model
from genart_lightning.run.fsdp import FSDP2Strategy
from genart_lightning.run.resume import logged_step, unreadable

HERE = Path(__file__).parent
DDP_TOLERANCE = 1e-4
"""FSDP averages gradients with a reduce-scatter, DDP with bucketed all-reduces: the same sums in another order. Measured
after 4 AdamW steps of lr 1e-3: 0 for the DiT, 1.1e-5 for the U-Net (its GroupNorms); Adam's normalisation turns
rounding in small gradients into differences of that size."""


@pytest.fixture(scope="module")
def two_process_runs(shapes_shards_16px: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both families' runs in one torchrun launch (one pair of interpreters, not one per family)."""
    out = tmp_path_factory.mktemp("fsdp")
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--nproc-per-node", "2", str(HERE / "fsdp_runs.py"), "flow_dit,vp_unet",
                           shapes_shards_16px["train_urls"], str(out), "--sharded"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    return out


@pytest.mark.parametrize("family", ["flow_dit", "vp_unet"])
def test_fsdp2_trains_resumes_exactly_matches_ddp_and_shards_the_state(family: str, two_process_runs: Path) -> None:
    tmp_path = two_process_runs / family
    fsdp, resumed, ddp = (torch.load(tmp_path / run / "weights.pt") for run in ("fsdp", "fsdp-resumed", "ddp"))
    assert fsdp.keys() == ddp.keys() and any(k.startswith("ema.module.") for k in fsdp)
    for key in fsdp:  # resumed from the half-way checkpoint: bit-identical to the uninterrupted FSDP run
        assert torch.equal(resumed[key], fsdp[key]), key
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=0, atol=DDP_TOLERANCE)
    for rank in range(2):  # live + EMA parameters and AdamW moments: each rank holds half
        ratio = json.loads((tmp_path / "fsdp" / f"bytes-rank{rank}.json").read_text()) / json.loads(
            (tmp_path / "ddp" / f"bytes-rank{rank}.json").read_text())
        assert ratio <= 0.6, ratio
    # the checkpoint is one full file: load_model (and so `genart sample`) reads it like any other
    checkpoints = [tmp_path / "fsdp" / "checkpoints" / "epoch=0-step=4.ckpt"]
    if family == "flow_dit":  # sharded checkpoints (directories): the same run, resumed as exactly, read as well
        checkpoints.append(tmp_path / "sharded" / "checkpoints" / "epoch=0-step=4.ckpt")
        assert checkpoints[-1].is_dir() and unreadable(checkpoints[-1]) is None and logged_step(checkpoints[-1]) == logged_step(checkpoints[0])
        for run in ("sharded", "sharded-resumed"):
            weights = torch.load(tmp_path / run / "weights.pt")
            assert all(torch.equal(weights[key], fsdp[key]) for key in fsdp), run
        # HSDP on a 2 x 1 (replicate, shard) mesh: resumes bit-identically, agrees with DDP (the 1 x 2 mesh is `fsdp`)
        hsdp, hsdp_resumed = (torch.load(tmp_path / run / "weights.pt") for run in ("hsdp", "hsdp-resumed"))
        for key in fsdp:
            assert torch.equal(hsdp_resumed[key], hsdp[key]), key
            torch.testing.assert_close(hsdp[key], ddp[key], rtol=0, atol=DDP_TOLERANCE)
        hsdp_bytes = json.loads((tmp_path / "hsdp" / "bytes-rank0.json").read_text())
        assert hsdp_bytes == json.loads((tmp_path / "ddp" / "bytes-rank0.json").read_text())  # 2 replicas of 1 shard
    for path in checkpoints:
        loaded = load_model(path).state_dict()
        assert all(torch.equal(loaded[key], fsdp[key]) for key in fsdp), path


def test_fsdp2_is_one_word_and_unsupported_settings_are_one_line() -> None:
    trainer = L.Trainer(strategy="fsdp2", accelerator="cpu", devices=1, logger=False)
    assert isinstance(trainer.strategy, FSDP2Strategy)
    with pytest.raises(ValueError, match=r"DCGAN does not run under FSDP .*use --trainer.strategy ddp"):
        DCGAN().shard(None)
    with pytest.raises(ValueError, match="train_text_encoder is not supported under --trainer.strategy fsdp2"):
        PixelDiffusion(image_size=16, train_text_encoder=True).shard(None)


def test_fsdp2_with_bf16_and_activation_checkpointing_per_block(shapes_shards_16px: dict, tmp_path: Path) -> None:
    """One process (a mesh of 1) is enough to see the switches compose: every DiT block is its own FSDP unit with
    float32 DTensor shards, computes in bfloat16 under `bf16-mixed`, and is recomputed in backward. In its own
    process: the strategy starts a process group there, which must not outlive the test in pytest's. The same process
    fine-tunes a whole SD pipeline model under FSDP2: its U-Net's down and up blocks become units and it trains (the
    two-process exactness above is the strategy's, shown on our networks)."""
    pytest.importorskip("diffusers")
    pipeline = tiny_sd_pipeline(tmp_path)
    done = subprocess.run([sys.executable, str(HERE / "fsdp_runs.py"), "bf16", shapes_shards_16px["train_urls"], "-"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "GENART_TEST_PIPELINE": str(pipeline)})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"units": True, "dtensor_fp32": True, "dtypes": ["torch.bfloat16"], "calls": 4,
                      "gathered": ["torch.bfloat16"], "pipeline_units": 4, "pipeline_trained": True}, report
