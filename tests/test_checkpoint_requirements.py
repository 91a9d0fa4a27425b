"""A checkpoint says which frozen text encoder it was trained with, and refuses another one in one line."""

from __future__ import annotations

import functools

import pytest
import torch

from genart_lightning.models.base import FAMILY_KEY, TEXT_ENCODER_KEY
from genart_lightning.models.diffusion import PixelDiffusion
from genart_lightning.models.loading import load_model
from genart_lightning.nn import text_encoder
from genart_lightning.nn.unet import UNetBackbone


def tiny(**kwargs) -> PixelDiffusion:
    unet = UNetBackbone(base_channels=8, channel_mult=[1], attention_levels=[], head_channels=8)
    return PixelDiffusion(image_size=8, backbone=unet, **kwargs)


def save(model: PixelDiffusion, path) -> dict:
    """A checkpoint as Lightning writes it: the family's on_save_checkpoint fills in its entries."""
    checkpoint = {"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return checkpoint


def test_a_different_frozen_text_encoder_is_refused_in_one_line(tmp_path, monkeypatch):
    path = tmp_path / "model.ckpt"
    checkpoint = save(tiny(), path)
    saved = checkpoint[TEXT_ENCODER_KEY]
    assert checkpoint[FAMILY_KEY].endswith("PixelDiffusion")
    assert saved["model"] == "genart-tiny" and saved["pretrained"] == "random init" and len(saved["sha256"]) == 16
    load_model(path)  # the same encoder rebuilds: accepted
    # what an open_clip upgrade that changes the random init would do: another seed for the same config
    monkeypatch.setattr(text_encoder, "create_openclip", functools.partial(text_encoder.create_openclip, seed=1))
    with pytest.raises(ValueError) as err:
        load_model(path)
    line = str(err.value)
    assert "\n" not in line and f"checkpoint {path} was trained with text encoder genart-tiny (random init, weights {saved['sha256']})" in line
    assert "was built now; give the same text_encoder / text_pretrained" in line
    with pytest.raises(ValueError, match="was trained with text encoder"):  # the resume path: Lightning's hook
        tiny().on_load_checkpoint(torch.load(path, weights_only=True))


def test_a_trained_text_encoder_is_stored_not_fingerprinted(tmp_path, monkeypatch):
    path = tmp_path / "model.ckpt"
    checkpoint = save(tiny(train_text_encoder=True), path)
    assert TEXT_ENCODER_KEY not in checkpoint and any(k.startswith("text_encoder.") for k in checkpoint["state_dict"])
    monkeypatch.setattr(text_encoder, "create_openclip", functools.partial(text_encoder.create_openclip, seed=1))
    load_model(path)  # its weights come from the checkpoint, whatever the init
