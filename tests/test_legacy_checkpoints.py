"""Checkpoints written before the package layout moved (commit 2becf4f) still load and sample the same images;
old class paths and renamed arguments in configs get one line naming the new ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from helpers import genart_in_process

from genart_lightning.cli import moved_class_error
from genart_lightning.models.cgan import TextConditionalGAN
from genart_lightning.models.diffusion import PixelDiffusion
from genart_lightning.models.loading import load_model
from genart_lightning.nn.unet import UNetBackbone

LEGACY = Path(__file__).parent / "fixtures" / "legacy"
PROMPTS = ["a large red circle in the centre, black background", "a small blue square at the top left, white background"]
FAMILIES = ["DCGAN", "TextConditionalGAN", "VAE", "PixelDiffusion", "LatentDiffusion"]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_checkpoint_from_before_the_move_samples_what_it_sampled_then(family):
    model = load_model(LEGACY / f"{family}.ckpt")
    assert type(model).__name__ == family
    expected = torch.load(LEGACY / "expected.pt", weights_only=True)[family]
    images = model.sample(2, captions=PROMPTS if model.conditional else None, seed=0)
    torch.testing.assert_close(images, expected, rtol=1e-5, atol=1e-5)


def test_the_fixtures_are_small():
    assert sum(p.stat().st_size for p in LEGACY.iterdir()) < 2 * 1024**2


def test_old_argument_names_are_renamed_with_a_deprecation_line():
    with pytest.warns(FutureWarning, match="`cond_drop_prob` is deprecated, write `caption_dropout: 0.3`"):
        model = PixelDiffusion(image_size=8, backbone=UNetBackbone(base_channels=8, channel_mult=[1], attention_levels=[], head_channels=8),
                               cond_drop_prob=0.3)
    assert model.hparams.caption_dropout == 0.3 and "cond_drop_prob" not in model.hparams
    with pytest.warns(FutureWarning, match="`text_model` is deprecated"):
        gan = TextConditionalGAN(image_size=16, z_dim=8, g_channels=4, d_channels=4, text_model="genart-tiny")
    assert gan.hparams.text_encoder == "genart-tiny" and "text_model" not in gan.hparams


def test_an_old_class_path_in_a_config_names_the_new_one(tmp_path):
    config = tmp_path / "old.yaml"
    old = "genart_lightning.callbacks.evaluation.PeriodicEvaluation"
    config.write_text(yaml.safe_dump({"trainer": {"callbacks": [{"class_path": old, "init_args": {"every_n_steps": 5}}]}}))
    assert moved_class_error(["--config", str(config)]) == (
        f"{old} (in {config}) has moved: write class_path: genart_lightning.callbacks.periodic_evaluation.PeriodicEvaluation"
    )
    assert moved_class_error([f"--config={tmp_path / 'missing.yaml'}", "--model.init_args.lr=1e-3"]) is None
    code, _, err = genart_in_process("fit", "--config", str(config))
    assert code == 2
    assert err.strip().splitlines() == [f"error: {moved_class_error(['--config', str(config)])}"]


def test_a_flat_diffusion_argument_of_an_old_config_says_where_it_moved(tmp_path):
    config = tmp_path / "old.yaml"
    model = {"class_path": "genart_lightning.models.diffusion.PixelDiffusion", "init_args": {"image_size": 16, "base_channels": 8}}
    config.write_text(yaml.safe_dump({"model": model}))
    code, _, err = genart_in_process("fit", "--config", str(config), "--print_config")
    assert code == 2
    [line] = err.strip().splitlines()
    assert line.endswith("base_channels moved into the model's backbone: write backbone: {class_path: "
                         "genart_lightning.nn.unet.UNetBackbone, init_args: {base_channels: ...}}"), line
