"""Flow and EDM samplers on trained models (their training and prompt following: test_prompt_following.py); a resumed
flow + DiT run equals the uninterrupted one."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import cpu_trainer, shards_data, tiny_unet
from lightning.pytorch.callbacks import ModelCheckpoint

from genart_lightning.callbacks.rank_state import RankState
from genart_lightning.diffusion.edm import EDM
from genart_lightning.diffusion.flow import Flow
from genart_lightning.models.diffusion import PixelDiffusion
from genart_lightning.models.loading import load_model
from genart_lightning.nn.dit import DiTBackbone


def _flow_dit(**kwargs) -> PixelDiffusion:
    return PixelDiffusion(image_size=16, process=Flow(), backbone=DiTBackbone(patch_size=2, hidden_size=64, depth=3, num_heads=2),
                          warmup_steps=20, ema_decay=0.99, sample_steps=20, train_text_encoder=True, **kwargs)


@pytest.mark.xdist_group("digits-flow")  # the worker that trains the flow digits model (conftest.trained_digits)
def test_heun_samples_a_trained_flow(trained_digits) -> None:
    model = trained_digits("flow")["model"]
    heun = model.sample(8, ["a handwritten digit four"] * 8, seed=0, steps=10, sampler="heun", guidance=4.0)
    euler = model.sample(8, ["a handwritten digit four"] * 8, seed=0, steps=10, sampler="euler", guidance=4.0)
    assert heun.shape == (8, 3, 8, 8) and torch.isfinite(heun).all() and not torch.allclose(heun, euler)


def test_edm_samples_with_heun_by_default_and_refuses_ddim() -> None:
    edm = PixelDiffusion(image_size=8, process=EDM(), backbone=tiny_unet())
    assert edm.hparams.sampler == "heun"  # the process's usual sampler is the default
    with pytest.raises(ValueError, match="unknown sampler 'ddim' .* samplers of the edm process are heun, euler, dpmpp_2m"):
        edm.sample(1, ["x"], steps=3, sampler="ddim")


@pytest.mark.slow
def test_a_resumed_flow_dit_run_equals_the_uninterrupted_run(shapes_shards_16px: dict, tmp_path) -> None:
    def run(root, steps: int, resume: str | None = None) -> PixelDiffusion:
        L.seed_everything(0)
        model = _flow_dit(lr=1e-3)
        checkpoint = ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0, every_n_train_steps=1)
        cpu_trainer(root, steps, callbacks=[checkpoint, RankState()]).fit(model, shards_data(shapes_shards_16px, batch_size=8), ckpt_path=resume)
        return model

    straight = run(tmp_path / "straight", 6)
    run(tmp_path / "cut", 3)
    resumed = run(tmp_path / "cut", 6, resume=str(tmp_path / "cut" / "last.ckpt"))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    loaded = load_model(tmp_path / "cut" / "last.ckpt")  # a DiT checkpoint rebuilds from its saved parts
    assert loaded.hparams.backbone["class_path"] == "genart_lightning.nn.dit.DiTBackbone"
    torch.testing.assert_close(loaded.sample(2, ["a red circle"] * 2, seed=1, steps=4),
                               resumed.eval().sample(2, ["a red circle"] * 2, seed=1, steps=4))
