"""diffusers models as parts, on tiny random-init models saved the way the hubs store them (`save_pretrained`):
an AutoencoderKL as first stage (equal to diffusers' own encode/decode), a UNet2DConditionModel as backbone,
OpenCLIP's penultimate layer, and the one-line errors for a missing directory, a wrong one, or a missing extra."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tiny_pipelines import tiny_diffusers_unet, tiny_diffusers_vae

from datamodules.webdataset import TextImageDataModule
from genart_lightning import UserError
from genart_lightning.diffusion.flow import Flow
from genart_lightning.models.latent_diffusion import FIRST_STAGE_KEY, LatentDiffusion
from genart_lightning.models.loading import load_model
from genart_lightning.nn.diffusers_parts import DiffusersAutoencoder, DiffusersUNetBackbone, load_pretrained
from genart_lightning.nn.text_encoder import FrozenTextEncoder

diffusers = pytest.importorskip("diffusers")

VAE_SCALING, VAE_SHIFT = 0.6, 0.2


@pytest.fixture(autouse=True)
def seeded() -> None:
    """Every test's random inputs (images, noise, weight perturbations) are the same on every run."""
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny AutoencoderKL (16px -> 4 x 8 x 8, with SD3-style shift) and a UNet2DConditionModel over its latents
    cross-attending to the tiny text tower's 64-wide tokens, each in its own save_pretrained directory."""
    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    vae = tiny_diffusers_vae(scaling_factor=VAE_SCALING, shift_factor=VAE_SHIFT)
    unet = tiny_diffusers_unet(cross_attention_dim=64)
    vae.save_pretrained(root / "vae")
    unet.save_pretrained(root / "unet")
    return {"vae": str(root / "vae"), "unet": str(root / "unet"), "root": root}


def _parts(pretrained: dict) -> dict:
    return dict(image_size=16, process=Flow(), conditioning="tokens", sample_steps=4, lr=1e-3,
                first_stage={"class_path": "genart_lightning.nn.diffusers_parts.DiffusersAutoencoder",
                             "init_args": {"path": pretrained["vae"]}},
                backbone=DiffusersUNetBackbone(path=pretrained["unet"]))


def test_first_stage_equals_diffusers_own_encode_and_decode(pretrained):
    ours = DiffusersAutoencoder(pretrained["vae"])
    reference = diffusers.AutoencoderKL.from_pretrained(pretrained["vae"]).eval()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        expected = (reference.encode(images).latent_dist.mean - VAE_SHIFT) * VAE_SCALING
        latents = ours.encode(images)
        assert latents.shape == (2, *ours.latent_shape(16)) == (2, 4, 8, 8)
        torch.testing.assert_close(latents, expected, atol=1e-5, rtol=0)
        decoded = reference.decode(expected / VAE_SCALING + VAE_SHIFT).sample.clamp(-1, 1)
        torch.testing.assert_close(ours.decode(latents), decoded, atol=1e-5, rtol=0)
        sampled = DiffusersAutoencoder(pretrained["vae"], sample_posterior=True).encode(images)
        assert not torch.allclose(sampled, latents)  # the switch samples the posterior instead of taking its mean


@pytest.mark.slow
def test_latent_diffusion_trains_over_diffusers_vae_and_unet(pretrained, shapes_shards_16px, tmp_path):
    L.seed_everything(0)
    model = LatentDiffusion(**_parts(pretrained))
    start = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    data = TextImageDataModule(shapes_shards_16px["train_urls"], shapes_shards_16px["val_urls"], batch_size=8,
                               num_workers=0, image_size=16)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=6)
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_progress_bar=False, num_sanity_val_steps=0,
                        limit_val_batches=0, enable_model_summary=False, callbacks=[checkpoint], default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    assert any(not torch.equal(start[k], v) for k, v in model.backbone.state_dict().items())  # the U-Net trained
    assert all(model.first_stage.vae.state_dict()[k].equal(v) for k, v in
               diffusers.AutoencoderKL.from_pretrained(pretrained["vae"]).state_dict().items())  # the VAE stayed frozen
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert not any(".vae." in k for k in saved["state_dict"])  # rebuilt from its path, not stored
    assert saved[FIRST_STAGE_KEY]["path"] == pretrained["vae"]
    assert saved["hyper_parameters"]["backbone"]["init_args"]["config"]["cross_attention_dim"] == 64
    images = model.sample(2, ["a red circle", "a blue square"], seed=3)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    reloaded = load_model(tmp_path / "last.ckpt")
    torch.testing.assert_close(reloaded.sample(2, ["a red circle", "a blue square"], seed=3), images)


def test_latent_samples_off_the_trained_square_decode_to_the_asked_size(pretrained):
    model = LatentDiffusion(**_parts(pretrained) | {"sample_steps": 2})
    assert model.diffusion_shape(16, 24) == model.first_stage.latent_shape(16, 24) == (4, 8, 12)
    images = model.sample(2, ["a red circle", "a blue square"], seed=3, height=16, width=24)
    assert images.shape == (2, 3, 16, 24) and torch.isfinite(images).all()
    prefix = "cannot sample {} (height x width) with the diffusers_unet backbone of this LatentDiffusion: height and width "
    rule = "must be multiples of 4 (the backbone's 2 x the first stage's downsampling 2); nearest sizes that work: "
    for size, nearest in (((18, 24), "16x24, 20x24"), ((16, 23), "16x20, 16x24")):  # the U-Net's halving, the VAE's
        with pytest.raises(UserError) as err:
            model.sample(1, height=size[0], width=size[1])
        assert str(err.value) == prefix.format(f"{size[0]}x{size[1]}") + rule + nearest


def test_init_from_a_diffusers_directory_loads_its_unet_and_starts_the_ema_there(pretrained):
    parts = _parts(pretrained)
    config = diffusers.UNet2DConditionModel.load_config(pretrained["unet"])
    torch.manual_seed(5)
    model = LatentDiffusion(**(parts | {"backbone": DiffusersUNetBackbone(config={k: v for k, v in config.items()
                                                                                  if not k.startswith("_")})}))
    expected = diffusers.UNet2DConditionModel.from_pretrained(pretrained["unet"]).state_dict()
    assert not torch.equal(model.backbone.unet.conv_in.weight, expected["conv_in.weight"])  # random init from config
    report = model.initialise_from(pretrained["unet"], strict=True)
    assert report.mismatches() == 0
    for name, tensor in expected.items():
        assert torch.equal(model.backbone.unet.state_dict()[name], tensor) and torch.equal(
            model.ema.module.unet.state_dict()[name], tensor), name


def test_a_different_vae_at_the_same_path_is_refused(pretrained, tmp_path):
    model = LatentDiffusion(**_parts(pretrained))
    checkpoint = {FIRST_STAGE_KEY: dict(model.frozen_fingerprints()[FIRST_STAGE_KEY], sha256="0" * 16)}
    with pytest.raises(ValueError, match="was trained with the frozen first stage"):
        model.on_load_checkpoint(checkpoint)


def test_penultimate_text_layer_reads_the_last_but_one_block():
    final, penultimate = FrozenTextEncoder(), FrozenTextEncoder(layer="penultimate")
    captions = ["a red circle", ""]
    reference = copy.deepcopy(final)
    reference.clip.transformer.resblocks = reference.clip.transformer.resblocks[:-1]
    with torch.no_grad():
        ours, full, short = penultimate(captions), final(captions), reference(captions)
    torch.testing.assert_close(ours.tokens, short.tokens)
    torch.testing.assert_close(ours.pooled, full.pooled)  # the pooled vector stays the final layer's
    assert not torch.allclose(ours.tokens, full.tokens)
    with pytest.raises(ValueError, match="choose final or penultimate"):
        FrozenTextEncoder(layer="last")


def test_wrong_widths_and_bad_directories_are_one_line(pretrained, tmp_path):
    with pytest.raises(ValueError, match="cross-attends to width 64, but the text encoder gives tokens of width 32"):
        DiffusersUNetBackbone(path=pretrained["unet"]).build(4, 32, None)
    with pytest.raises(ValueError, match="takes 4 and returns 4 channels, but the diffused space has 3"):
        DiffusersUNetBackbone(path=pretrained["unet"]).build(3, 64, None)
    with pytest.raises(ValueError, match="reads text tokens only.*conditioning: tokens"):
        DiffusersUNetBackbone(path=pretrained["unet"]).build(4, 64, 64)
    problems = {
        "pretrained weights directory not found": (tmp_path / "nowhere", None),
        "not a diffusers save_pretrained directory": (tmp_path, None),
        "holds a diffusers UNet2DConditionModel, not a AutoencoderKL": (pretrained["unet"], None),
    }
    for message, (path, subfolder) in problems.items():
        with pytest.raises(UserError, match=message) as caught:
            load_pretrained("AutoencoderKL", str(path), subfolder)
        assert "\n" not in str(caught.value)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((pretrained["root"] / "vae" / "config.json").read_text())
    with pytest.raises(UserError, match="cannot load AutoencoderKL from") as caught:  # config but no weights file
        load_pretrained("AutoencoderKL", str(broken))
    assert "\n" not in str(caught.value)


def test_missing_extra_names_it(monkeypatch, pretrained):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    with pytest.raises(UserError, match=r"pip install 'genart-lightning\[diffusers\]'"):
        DiffusersAutoencoder(pretrained["vae"])


@pytest.mark.slow
def test_export_to_diffusers_reloads_in_diffusers_with_identical_outputs(pretrained, tmp_path, capsys):
    from genart_lightning.cli import main as genart

    model = LatentDiffusion(**_parts(pretrained))
    with torch.no_grad():  # give the EMA copy weights of its own, so the test sees which weights were written
        for p in model.ema.module.parameters():
            p.add_(0.01 * torch.randn_like(p))
    trainer = L.Trainer(accelerator="cpu", logger=False, max_steps=0, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    genart(["export", "--ckpt", str(tmp_path / "model.ckpt"), "--diffusers", str(tmp_path / "out")])
    assert "diffusers save_pretrained" in capsys.readouterr().out
    unet = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "out" / "unet").eval()
    vae = diffusers.AutoencoderKL.from_pretrained(tmp_path / "out" / "vae").eval()
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0]), torch.randn(2, 32, 64)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=context).sample,
                                   model.ema.module(x, t, context=context), atol=0, rtol=0)
        images = torch.rand(1, 3, 16, 16) * 2 - 1
        torch.testing.assert_close(vae.encode(images).latent_dist.mean, model.first_stage.vae.encode(images).latent_dist.mean)
    assert vae.config.scaling_factor == VAE_SCALING and vae.config.shift_factor == VAE_SHIFT


def test_shipped_sd2_config_without_its_weights_is_one_line(shapes_shards_16px, capsys):
    from genart_lightning.cli import entry

    config = str(Path(__file__).parents[1] / "experiments" / "ldm_sd2_finetune_512.yaml")
    with pytest.raises(SystemExit) as exit_:
        entry(["fit", "--config", config, "--trainer.accelerator=cpu", "--trainer.devices=1",
               "--model.init_args.text_encoder=genart-tiny", "--model.init_args.text_pretrained=null",
               f"--data.init_args.train_urls={shapes_shards_16px['train_urls']}",
               f"--data.init_args.val_urls={shapes_shards_16px['val_urls']}"])
    assert exit_.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: pretrained weights directory not found: /weights/stable-diffusion-2-base; copy")


@pytest.mark.slow
def test_lora_over_a_diffusers_unet_checkpoints_adapters_and_exports_merged_to_diffusers(pretrained, shapes_shards_16px,
                                                                                          tmp_path, capsys):
    pytest.importorskip("peft")
    from genart_lightning.cli import main as genart

    L.seed_everything(0)
    model = LatentDiffusion(**(_parts(pretrained) | {"lora": {"rank": 4}, "ema_decay": 0.5}))
    data = TextImageDataModule(shapes_shards_16px["train_urls"], shapes_shards_16px["val_urls"], batch_size=8,
                               num_workers=0, image_size=16)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=4)
    L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False, num_sanity_val_steps=0,
              limit_val_batches=0, enable_model_summary=False, callbacks=[checkpoint],
              default_root_dir=tmp_path).fit(model, datamodule=data)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert saved and all("lora_" in k for k in saved if k.startswith(("backbone.", "ema.module.")))
    with pytest.raises(UserError, match="holds LoRA adapters.*add --merge-lora"):
        genart(["export", "--ckpt", str(tmp_path / "last.ckpt"), "--diffusers", str(tmp_path / "out")])
    genart(["export", "--ckpt", str(tmp_path / "last.ckpt"), "--merge-lora", "--diffusers", str(tmp_path / "out")])
    assert "diffusers save_pretrained" in capsys.readouterr().out
    unet = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "out" / "unet").eval()
    base = diffusers.UNet2DConditionModel.from_pretrained(pretrained["unet"]).eval()
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0]), torch.randn(2, 32, 64)
    with torch.no_grad():
        adapted = model.ema.module.eval()(x, t, context=context)
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=context).sample, adapted, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(base(x, t, encoder_hidden_states=context).sample, adapted, atol=1e-4)
