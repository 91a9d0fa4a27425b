"""VAE family: it learns shapes, its latent scale whitens latents, checkpoints round-trip, options are wired."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.nn import functional as F

from datamodules.webdataset import TextImageDataModule
from genart_lightning.models.loading import load_model
from genart_lightning.models.vae import VAE

TRAIN_STEPS = 180
CHECKPOINT_EVERY = 60  # TRAIN_STEPS is a multiple: last.ckpt is written at the final step


def _data(shards: dict) -> TextImageDataModule:
    return TextImageDataModule(shards["train_urls"], shards["val_urls"], batch_size=32, num_workers=0, image_size=16)


@pytest.fixture(scope="module")
def trained(shapes_shards_16px: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small spatial VAE trained briefly on 16px shapes, with its PSNR/SSIM before training."""
    root = tmp_path_factory.mktemp("vae")
    L.seed_everything(0)
    data = _data(shapes_shards_16px)
    data.setup("validate")
    model = VAE(image_size=16, base_channels=16, lr=1e-3)
    untrained = model.reconstruction_metrics(data.val_dataloader())
    checkpoint = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, save_top_k=0, every_n_train_steps=CHECKPOINT_EVERY)
    trainer = L.Trainer(
        max_steps=TRAIN_STEPS,
        accelerator="cpu",
        logger=TensorBoardLogger(root, name="tb"),
        callbacks=[checkpoint],
        check_val_every_n_epoch=4,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data)
    return {"model": model.eval(), "trainer": trainer, "data": data, "untrained": untrained, "root": root}


def test_vae_learns_shapes_and_latent_scale_whitens_latents(trained: dict) -> None:
    model, data = trained["model"], trained["data"]
    logged = trained["trainer"].callback_metrics
    final = model.reconstruction_metrics(data.val_dataloader())
    assert final["psnr"] > trained["untrained"]["psnr"] + 5.0, (trained["untrained"], final)
    assert final["ssim"] > trained["untrained"]["ssim"] + 0.2, (trained["untrained"], final)
    assert float(logged["val/psnr"]) > trained["untrained"]["psnr"] + 5.0  # the fit loop reports it too
    latents = torch.cat([model.encode(batch["image"]) for batch in data.val_dataloader()])
    assert latents.shape[1:] == model.latent_shape(16) == (4, 4, 4)
    assert model.scaling != 1.0
    assert abs(latents.std().item() - 1.0) < 0.12, (latents.std().item(), model.scaling)
    assert list((trained["root"] / "tb").rglob("reconstructions/*.png")), "no reconstruction grid was written"


def test_checkpoint_round_trip_gives_same_encode_decode(trained: dict, tmp_path) -> None:
    model, trainer = trained["model"], trained["trainer"]
    images = next(iter(trained["data"].val_dataloader()))["image"][:8]
    path = tmp_path / "vae.ckpt"
    trainer.save_checkpoint(path)
    for reloaded in (load_model(path), load_model(trained["root"] / "checkpoints" / "last.ckpt")):
        assert reloaded.scaling == model.scaling  # the final step's scale is in the written checkpoints
        latents = reloaded.encode(images)
        torch.testing.assert_close(latents, model.encode(images), rtol=0, atol=0)
        torch.testing.assert_close(reloaded.decode(latents), model.decode(latents), rtol=0, atol=0)
    assert model.decode(model.encode(images)).abs().max() <= 1.0


def test_flat_latent_samples_but_refuses_to_be_a_first_stage() -> None:
    model = VAE(image_size=16, latent="flat", latent_dim=8, base_channels=8)
    samples = model.sample(3, seed=1)
    assert samples.shape == (3, 3, 16, 16) and samples.abs().max() <= 1.0
    torch.testing.assert_close(samples, model.sample(3, seed=1))
    for call in (lambda: model.encode(samples), lambda: model.decode(torch.zeros(1, 8)), lambda: model.latent_shape(16)):
        with pytest.raises(ValueError, match="flat latent"):
            call()


def test_bad_image_size_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="image_size=18 is not divisible"):
        VAE(image_size=18, channel_mults=(1, 2, 4))


def test_as_a_first_stage_it_takes_non_square_images() -> None:
    model = VAE(image_size=16, latent_channels=2, base_channels=8, channel_mults=(1, 2), num_res_blocks=1).eval()
    assert model.latent_shape(16, 24) == (2, 8, 12) and model.latent_shape(16) == (2, 8, 8)
    assert model.decode(torch.zeros(1, *model.latent_shape(8, 24))).shape == (1, 3, 8, 24)
    with pytest.raises(ValueError, match="image size 16x25 is not divisible by this VAE's downsampling factor 2"):
        model.latent_shape(16, 25)


def test_adversarial_term_gives_each_network_only_its_own_gradient() -> None:
    torch.manual_seed(0)
    model = VAE(image_size=16, base_channels=8, adv_weight=0.5, disc_channels=8)
    disc = model.discriminator
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    recon = torch.rand(2, 3, 16, 16, requires_grad=True)
    model._adversarial_terms(images, recon).backward()
    disc_grads = [p.grad.clone() for p in disc.parameters()]
    recon_grad = recon.grad.clone()

    disc.zero_grad()
    recon.grad = None
    hinge = F.relu(1.0 - disc(images)).mean() + F.relu(1.0 + disc(recon.detach())).mean()
    hinge.backward()  # the discriminator's own loss only
    for got, want in zip(disc_grads, [p.grad for p in disc.parameters()], strict=True):
        torch.testing.assert_close(got, want)
    disc.requires_grad_(False)
    (-0.5 * disc(recon).mean()).backward()  # the autoencoder's adversarial term only
    torch.testing.assert_close(recon_grad, recon.grad)


class _RecordBeta(L.Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, float]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: VAE, batch, batch_idx: int) -> None:
        self.seen.append((trainer.global_step, pl_module.kl_weight()))


def test_text_conditioned_flat_vae_with_warmup_and_adversary_trains(shapes_shards_16px: dict, tmp_path) -> None:
    L.seed_everything(0)
    model = VAE(
        image_size=16, latent="flat", latent_dim=16, base_channels=8, beta=0.01, kl_warmup_steps=4,
        adv_weight=0.1, adv_start_step=2, disc_channels=8, text_encoder="genart-tiny",
    )
    assert model.conditional
    beta = _RecordBeta()
    trainer = L.Trainer(
        max_steps=6, accelerator="cpu", logger=False, callbacks=[beta], enable_checkpointing=False,
        val_check_interval=3, limit_val_batches=1, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, _data(shapes_shards_16px))
    assert beta.seen == [(s, 0.01 * min(1.0, s / 4)) for s in range(6)]
    logged = trainer.callback_metrics
    assert {"train/d_loss", "train/g_adv", "val/psnr", "val/ssim"} <= set(logged)
    assert all(torch.isfinite(logged[k]) for k in ("train/loss", "train/d_loss", "train/g_adv"))
    captions = ["a small red circle on the left, white background", "a large blue square at the top, black backdrop"]
    model.eval()
    assert not torch.equal(model.sample(2, captions, seed=3), model.sample(2, captions[::-1], seed=3))
    torch.testing.assert_close(model.sample(2, captions, seed=3), model.sample(2, captions, seed=3))


def test_gradient_checkpointing_recomputes_each_block_and_gives_the_same_gradients() -> None:
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    grads, calls = {}, {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        vae = VAE(image_size=16, base_channels=8, channel_mults=[1, 2], gradient_checkpointing=checkpointing).train()
        blocks = [*vae.encoder.blocks, *vae.decoder.blocks]
        calls[checkpointing] = 0

        def count(*_, key=checkpointing) -> None:  # a pre hook: a post hook misses early-stopped recomputes
            calls[key] += 1

        for block in blocks:
            block.register_forward_pre_hook(count)
        mean, _ = vae.encoder(images).chunk(2, dim=1)
        vae.decoder(mean).square().mean().backward()
        grads[checkpointing] = torch.cat([p.grad.flatten() for p in [*vae.encoder.parameters(), *vae.decoder.parameters()]])
    assert calls == {False: len(blocks), True: 2 * len(blocks)}  # with the switch every block runs again in backward
    torch.testing.assert_close(grads[True], grads[False])
