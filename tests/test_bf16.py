"""bf16 mixed precision (`--trainer.precision bf16-mixed`) for every family with a large network: the networks compute
in bfloat16 under autocast while their weights stay float32, and training steps change them and stay finite."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import tiny_unet
from torch import nn

from datamodules.webdataset import TextImageDataModule
from genart_lightning.diffusion.flow import Flow
from genart_lightning.models.diffusion import PixelDiffusion
from genart_lightning.models.gan import DCGAN
from genart_lightning.models.vae import VAE
from genart_lightning.nn.dit import DiTBackbone

UNET = tiny_unet()
FAMILIES = {
    "pixel diffusion, U-Net": (lambda: PixelDiffusion(image_size=16, backbone=UNET), "backbone"),
    "flow, DiT": (lambda: PixelDiffusion(image_size=16, process=Flow(),
                                         backbone=DiTBackbone(patch_size=2, hidden_size=32, depth=2, num_heads=2)), "backbone"),
    "VAE": (lambda: VAE(image_size=16, base_channels=8, channel_mults=[1, 2]), "decoder"),
    "DCGAN": (lambda: DCGAN(image_size=16, z_dim=16, g_channels=8, d_channels=8), "generator"),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_mixed_computes_in_bfloat16_and_keeps_float32_weights(family: str, shapes_shards_16px: dict, tmp_path) -> None:
    build, network = FAMILIES[family]
    L.seed_everything(0)
    model = build()
    net: nn.Module = getattr(model, network)
    dtypes: set[torch.dtype] = set()
    for layer in net.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            layer.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
    start = {k: v.clone() for k, v in net.state_dict().items()}
    data = TextImageDataModule(shapes_shards_16px["train_urls"], batch_size=8, num_workers=0, image_size=16)
    # with gradient clipping, as the diffusion configs train (Lightning refuses to clip a fused optimizer under autocast)
    clip = 1.0 if isinstance(model, PixelDiffusion) else None
    L.Trainer(max_steps=4, accelerator="cpu", precision="bf16-mixed", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, gradient_clip_val=clip,
              default_root_dir=tmp_path).fit(model, datamodule=data)
    assert torch.bfloat16 in dtypes, f"{family}: its {network} never computed in bfloat16 ({dtypes})"
    weights = dict(net.state_dict())
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert any(not torch.equal(start[k], v) for k, v in weights.items())  # the steps were applied
