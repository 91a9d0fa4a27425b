"""Real 2-process CPU DDP (gloo) fits of pixel and latent diffusion and of flow + DiT: ranks draw different noise and
noise levels, weights stay in sync."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import tiny_unet
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.webdataset import TextImageDataModule
from genart_lightning.diffusion.flow import Flow
from genart_lightning.models.diffusion import PixelDiffusion
from genart_lightning.models.latent_diffusion import LatentDiffusion
from genart_lightning.models.vae import VAE
from genart_lightning.nn.dit import DiTBackbone

pytestmark = [pytest.mark.slow, pytest.mark.ddp_fork]

TINY = dict(image_size=16, backbone=tiny_unet())


def _flat(module: torch.nn.Module, trained_only: bool = False) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters() if p.requires_grad or not trained_only])


class RankProbe(L.Callback):
    """Gathers every rank's first-step noise and timesteps, and the backbone's and its EMA's weights before and after."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.first: torch.Tensor | None = None
        self.initial: torch.Tensor | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.initial = _flat(pl_module.backbone, trained_only=True).clone()  # under LoRA: the adapters

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.first is None:
            self.first = pl_module.all_gather(torch.cat([outputs["noise"].flatten()[:64], outputs["u"].float()]))

    def on_train_end(self, trainer, pl_module) -> None:
        live = pl_module.all_gather(_flat(pl_module.backbone, trained_only=True))
        ema = pl_module.all_gather(_flat(pl_module.ema.module))
        if trainer.is_global_zero:
            torch.save({"first": self.first, "initial": self.initial, "live": live, "ema": ema,
                        "world": trainer.world_size}, self.out)


def _fit_ddp(model: L.LightningModule, shards: dict, root, steps: int = 3) -> dict:
    data = TextImageDataModule(shards["train_urls"], shards["val_urls"], batch_size=8, num_workers=0, image_size=16)
    out = str(root / "probe.pt")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        max_steps=steps,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[RankProbe(out), ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=0)],
        default_root_dir=root,
    )
    L.seed_everything(0)  # the same global seed everywhere, as on a cluster: per-rank streams come from the family
    trainer.fit(model, data)
    assert (root / "ckpt" / "last.ckpt").is_file()
    return torch.load(out)


def _assert_ranks_differ_and_agree(probe: dict) -> None:
    assert probe["world"] == 2
    first = probe["first"]
    noise, t = first[:, :64], first[:, 64:]
    assert not torch.allclose(noise[0], noise[1]), "both ranks drew the same noise"
    assert not torch.equal(t[0], t[1]), "both ranks drew the same timesteps"
    assert torch.equal(probe["live"][0], probe["live"][1]) and torch.equal(probe["ema"][0], probe["ema"][1])
    moved = (probe["live"][0] - probe["initial"]).abs()
    assert moved.max() > 1e-4 and (moved > 0).float().mean() > 0.5, "the weights did not train"


@pytest.mark.timeout(300)
def test_pixel_diffusion_ddp_fit(shapes_shards_16px: dict, tmp_path) -> None:
    # the text tower trained along, as ddpm_shapes.yaml does: DDP needs every trainable weight to get a gradient
    model = PixelDiffusion(**TINY, ema_decay=0.9, train_text_encoder=True)
    _assert_ranks_differ_and_agree(_fit_ddp(model, shapes_shards_16px, tmp_path))


@pytest.mark.timeout(300)
def test_latent_diffusion_ddp_fit(shapes_shards_16px: dict, tmp_path) -> None:
    vae_path = tmp_path / "vae.ckpt"
    vae_trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    data = TextImageDataModule(shapes_shards_16px["train_urls"], batch_size=8, num_workers=0, image_size=16)
    vae_trainer.fit(VAE(image_size=16, base_channels=16, channel_mults=[1, 2]), data)
    vae_trainer.save_checkpoint(vae_path)
    latent_tiny = {"image_size": 16, "backbone": tiny_unet(channel_mult=[1], attention_levels=[0])}  # 8 x 8 latents
    model = LatentDiffusion(first_stage_ckpt=str(vae_path), ema_decay=0.9, **latent_tiny)
    _assert_ranks_differ_and_agree(_fit_ddp(model, shapes_shards_16px, tmp_path))


@pytest.mark.timeout(300)
def test_flow_dit_ddp_fit(shapes_shards_16px: dict, tmp_path) -> None:
    dit = DiTBackbone(patch_size=2, hidden_size=32, depth=2, num_heads=2)
    model = PixelDiffusion(image_size=16, process=Flow(), backbone=dit, ema_decay=0.9)
    _assert_ranks_differ_and_agree(_fit_ddp(model, shapes_shards_16px, tmp_path))


@pytest.mark.timeout(300)
def test_lora_flow_dit_ddp_fit(shapes_shards_16px: dict, tmp_path) -> None:
    pytest.importorskip("peft")
    dit = DiTBackbone(patch_size=2, hidden_size=32, depth=2, num_heads=2)
    source = PixelDiffusion(image_size=16, process=Flow(), backbone=dit)
    with torch.no_grad():  # weights of its own: a fresh DiT's zero-init output layer would pass no gradient back
        for p in source.parameters():
            p.add_(0.05 * torch.randn_like(p))
    saver = L.Trainer(accelerator="cpu", logger=False, max_steps=0, enable_progress_bar=False)
    saver.strategy.connect(source)
    saver.save_checkpoint(tmp_path / "base.ckpt")
    model = PixelDiffusion(image_size=16, process=Flow(), backbone=dit, ema_decay=0.9, init_from=str(tmp_path / "base.ckpt"),
                           lora={"rank": 4})
    _assert_ranks_differ_and_agree(_fit_ddp(model, shapes_shards_16px, tmp_path))
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
    adapters = {k: v for k, v in state.items() if k.startswith("backbone.")}
    assert adapters and all("lora_" in k for k in adapters)
    assert all(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k)  # trained from zero on both ranks
