"""Diffusion and VAE training guard non-finite losses as the GANs do: `nonfinite: raise` stops with DivergenceError,
`skip` leaves the weights of that step untouched, counts it and trains on."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from datamodules.webdataset import TextImageDataModule
from genart_lightning.models.base import DivergenceError
from genart_lightning.models.diffusion import PixelDiffusion
from genart_lightning.models.vae import VAE
from genart_lightning.nn.unet import UNetBackbone

POISONED_BATCH = 1


class PoisonAndWatch(L.Callback):
    """Turns one batch's images into NaN and records the trainable weights after every batch."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == POISONED_BATCH:
            batch["image"].fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append({k: p.detach().clone() for k, p in pl_module.named_parameters() if p.requires_grad})


def family(name: str, nonfinite: str):
    if name == "diffusion":
        return PixelDiffusion(image_size=16, backbone=UNetBackbone(base_channels=8, channel_mult=[1], attention_levels=[],
                                                                     head_channels=8), lr=1e-3, nonfinite=nonfinite)
    return VAE(image_size=16, base_channels=8, channel_mults=[1, 2], nonfinite=nonfinite, lr=1e-3)


def fit(model, shards, tmp_path) -> PoisonAndWatch:
    watch = PoisonAndWatch()
    data = TextImageDataModule(shards["train_urls"], shards["val_urls"], batch_size=8, num_workers=0, image_size=16)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path, callbacks=[watch])
    trainer.fit(model, data)
    return watch


@pytest.mark.parametrize("name", ["diffusion", "vae"])
def test_skip_leaves_the_poisoned_step_out(name, shapes_shards_16px, tmp_path):
    torch.manual_seed(0)
    model = family(name, "skip")
    watch = fit(model, shapes_shards_16px, tmp_path)
    before, after, later = watch.weights[POISONED_BATCH - 1], watch.weights[POISONED_BATCH], watch.weights[-1]
    assert all(torch.equal(before[k], after[k]) for k in before)  # the NaN step changed nothing
    assert all(torch.isfinite(p).all() for p in later.values())
    assert any(not torch.equal(before[k], later[k]) for k in before)  # and training went on
    assert model.nonfinite_skips == 1


@pytest.mark.parametrize("name", ["diffusion", "vae"])
def test_raise_stops_at_the_poisoned_step(name, shapes_shards_16px, tmp_path):
    with pytest.raises(DivergenceError, match=f"non-finite loss .* at global_step {POISONED_BATCH}"):
        fit(family(name, "raise"), shapes_shards_16px, tmp_path)


def test_a_wrong_mode_is_one_line():
    with pytest.raises(ValueError, match="nonfinite must be 'raise' or 'skip', got 'ignore'"):
        family("vae", "ignore")
