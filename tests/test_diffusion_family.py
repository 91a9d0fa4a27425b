"""Diffusion families end to end on CPU: EMA sampling of a trained model is reproducible and survives checkpoints (its
training and prompt following: test_prompt_following.py); latent diffusion checkpoints carry their frozen VAE."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import DIGITS_STEPS, cpu_trainer, shards_data, tiny_unet

from genart_lightning.cli import main as genart
from genart_lightning.diffusion.flow import Flow
from genart_lightning.diffusion.vp import VP
from genart_lightning.models.diffusion import PixelDiffusion
from genart_lightning.models.latent_diffusion import LatentDiffusion
from genart_lightning.models.loading import load_model
from genart_lightning.models.vae import VAE
from genart_lightning.nn.dit import DiTBackbone

TINY = dict(image_size=16, backbone=tiny_unet())






@pytest.mark.slow
@pytest.mark.xdist_group("digits-vp")  # the worker that trains the vp digits model (conftest.trained_digits)
def test_sampling_is_reproducible_uses_ema_and_survives_the_checkpoint(trained_digits) -> None:
    trained = trained_digits("vp")
    model = trained["model"]
    prompts = ["a handwritten digit seven"] * 2 + ["", "the number 3, written by hand"]
    first = model.sample(4, prompts, seed=3, steps=8, sampler="ddim", eta=0.0)
    torch.testing.assert_close(model.sample(4, prompts, seed=3, steps=8, sampler="ddim", eta=0.0), first, rtol=0, atol=0)
    assert not torch.allclose(model.sample(4, prompts, seed=4, steps=8, sampler="ddim"), first)
    assert first.shape == (4, 3, 8, 8) and first.min() >= -1 and first.max() <= 1

    checkpoint = torch.load(trained["ckpt"], weights_only=True)
    assert int(checkpoint["state_dict"]["ema.n_averaged"]) == DIGITS_STEPS  # EMA is saved, so a resumed run continues it
    saved = checkpoint["state_dict"]
    assert any(k.startswith("text_encoder.") for k in saved) and any(k.startswith("text_ema.") for k in saved)
    loaded = load_model(trained["ckpt"])
    torch.testing.assert_close(loaded.sample(4, prompts, seed=3, steps=8, sampler="ddim"), first)
    with torch.no_grad():  # sample() reads the EMA copies only: wrecking the raw backbone and text tower changes nothing
        for p in [*loaded.backbone.parameters(), *loaded.text_encoder.parameters()]:
            p.zero_()
    torch.testing.assert_close(loaded.sample(4, prompts, seed=3, steps=8, sampler="ddim"), first)


@pytest.mark.slow
@pytest.mark.xdist_group("digits-vp")
def test_genart_sample_command_writes_a_guided_grid(trained_digits, tmp_path, capsys) -> None:
    out = tmp_path / "grid.png"
    genart(["sample", "--ckpt", str(trained_digits("vp")["ckpt"]), "--num", "8", "--prompt", "a handwritten digit two",
            "--prompt", "the number 5, written by hand", "--steps", "10", "--sampler", "dpmpp_2m",
            "--guidance", "4", "--seed", "0", "--out", str(out)])
    assert out.is_file() and "8 samples" in capsys.readouterr().out


def test_train_text_encoder_trains_and_saves_the_tower_and_a_frozen_one_stays_out(shapes_shards_16px: dict, tmp_path) -> None:
    towers = {}
    for trainable in (False, True):
        L.seed_everything(0)
        model = PixelDiffusion(**TINY, train_text_encoder=trainable, lr=1e-3)
        start = [p.detach().clone() for p in model.text_encoder.parameters()]
        trainer = cpu_trainer(tmp_path / str(trainable), 3)
        trainer.fit(model, shards_data(shapes_shards_16px, batch_size=8))
        moved = [not torch.equal(a, b) for a, b in zip(start, model.text_encoder.parameters(), strict=True)]
        trainer.save_checkpoint(tmp_path / f"{trainable}.ckpt")
        saved = torch.load(tmp_path / f"{trainable}.ckpt", weights_only=True)["state_dict"]
        towers[trainable] = (any(moved), sum(k.startswith("text_encoder.") for k in saved))
        if trainable:  # the reloaded model has the trained tower, not the seeded random init
            loaded = load_model(tmp_path / "True.ckpt")
            torch.testing.assert_close(loaded.text_encoder(["a red circle"]).pooled, model.text_encoder(["a red circle"]).pooled)
    assert towers[False] == (False, 0)  # frozen: untouched, rebuilt from its name
    assert towers[True][0] and towers[True][1] > 0


def test_bad_settings_fail_with_one_clear_line() -> None:
    with pytest.raises(ValueError, match="zero_terminal_snr=True cannot be used with prediction='eps'"):
        PixelDiffusion(**TINY, process=VP(zero_terminal_snr=True, prediction="eps"))
    with pytest.raises(ValueError, match="unknown prediction 'noise'"):
        PixelDiffusion(**TINY, process={"class_path": "genart_lightning.diffusion.vp.VP", "init_args": {"prediction": "noise"}})
    with pytest.raises(ValueError, match="LatentDiffusion needs first_stage_ckpt"):
        LatentDiffusion(**TINY)


def test_attention_block_defaults_by_conditioning_and_is_recorded_for_reloading() -> None:
    conditional = PixelDiffusion(image_size=16, backbone=tiny_unet())
    unconditional = PixelDiffusion(image_size=16, backbone=tiny_unet(), text_encoder=None)
    kind = lambda model: model.hparams.backbone["init_args"]["attention_block"]  # noqa: E731
    assert kind(conditional) == "transformer" and kind(unconditional) == "plain"
    chosen = PixelDiffusion(image_size=16, backbone=tiny_unet(attention_block="transformer"), text_encoder=None)
    PixelDiffusion(**dict(chosen.hparams)).load_state_dict(chosen.state_dict())  # the recorded kind rebuilds the same net
    with pytest.raises(RuntimeError, match="Missing key"):
        unconditional.load_state_dict(chosen.state_dict())


def test_unconditional_family_without_text_encoder(shapes_shards_16px: dict, tmp_path) -> None:
    model = PixelDiffusion(**TINY, text_encoder=None, process=VP(prediction="x0", schedule="linear", min_snr_gamma=None))
    assert not model.conditional
    cpu_trainer(tmp_path, 2).fit(model, shards_data(shapes_shards_16px, batch_size=8))
    images = model.sample(2, seed=0, steps=3, sampler="ddpm")
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


@pytest.mark.slow
def test_latent_diffusion_trains_on_scaled_latents_and_is_self_contained(shapes_shards_16px: dict, tmp_path) -> None:
    L.seed_everything(0)
    data = shards_data(shapes_shards_16px, batch_size=16)
    vae_trainer = cpu_trainer(tmp_path / "vae", 20)
    vae_trainer.fit(VAE(image_size=16, base_channels=16, channel_mults=[1, 2], lr=1e-3), data)
    vae_path = tmp_path / "vae.ckpt"
    vae_trainer.save_checkpoint(vae_path)
    vae = load_model(vae_path)
    assert vae.scaling != 1.0  # a trained first stage with a real scale factor

    model = LatentDiffusion(first_stage_ckpt=str(vae_path), image_size=16,
                            backbone=tiny_unet(channel_mult=[1], attention_levels=[0]),
                            process=VP(prediction="v", zero_terminal_snr=True), ema_decay=0.9)
    images = next(iter(data.val_dataloader()))["image"][:4]
    torch.testing.assert_close(model.to_diffusion_space(images), vae.encode(images))  # latents include the scale
    assert model.diffusion_shape() == vae.latent_shape(16) == (4, 8, 8)
    trainer = cpu_trainer(tmp_path / "ldm", 4)
    trainer.fit(model, data)
    assert all(not p.requires_grad for p in model.first_stage.parameters()) and not model.first_stage.training
    trainer.save_checkpoint(tmp_path / "ldm.ckpt")

    dit = LatentDiffusion(first_stage_ckpt=str(vae_path), image_size=16, process=Flow(), ema_decay=0.9,
                          backbone=DiTBackbone(patch_size=2, hidden_size=32, depth=2, num_heads=2))  # 16 latent patches
    trainer_dit = cpu_trainer(tmp_path / "dit", 3)
    trainer_dit.fit(dit, data)
    trainer_dit.save_checkpoint(tmp_path / "dit.ckpt")
    with pytest.raises(ValueError, match="clip_x0=True clamps x0 estimates to .* LatentDiffusion diffuses unbounded"):
        LatentDiffusion(first_stage_ckpt=str(vae_path), image_size=16, clip_x0=True)

    vae_path.unlink()  # the latent-diffusion checkpoints must not need the VAE file any more
    dit_samples = dit.eval().sample(2, ["a red circle", "a blue square"], seed=0, steps=3, sampler="heun")
    torch.testing.assert_close(load_model(tmp_path / "dit.ckpt").sample(2, ["a red circle", "a blue square"], seed=0, steps=3,
                                                                        sampler="heun"), dit_samples)
    loaded = load_model(tmp_path / "ldm.ckpt")
    expected = model.eval().sample(2, ["a red circle", "a blue square"], seed=0, steps=4, sampler="dpmpp_2m")
    torch.testing.assert_close(loaded.sample(2, ["a red circle", "a blue square"], seed=0, steps=4, sampler="dpmpp_2m"), expected)
    assert expected.shape == (2, 3, 16, 16) and expected.min() >= -1 and expected.max() <= 1
