"""`init_from`: weights only from a genart .ckpt, a `genart export` .safetensors or a diffusers directory, a fresh
step 0, and a loaded / missing / unexpected report that is right for a deliberately changed config."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import cpu_trainer, shards_data, tiny_unet
from lightning.pytorch.callbacks import ModelCheckpoint

from genart_lightning import UserError
from genart_lightning.commands.export import export_checkpoint
from genart_lightning.diffusion.vp import VP
from genart_lightning.models.diffusion import PixelDiffusion


def _model(**overrides) -> PixelDiffusion:
    settings = dict(image_size=16, process=VP(prediction="v"), backbone=tiny_unet(), lr=3e-3, ema_decay=0.9)
    return PixelDiffusion(**(settings | overrides))




@pytest.fixture(scope="module")
def source(shapes_shards_16px, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("source")
    L.seed_everything(0)
    data = shards_data(shapes_shards_16px, batch_size=16)
    model = _model()
    checkpoint = ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0, every_n_train_steps=20)
    cpu_trainer(root, 20, callbacks=[checkpoint]).fit(model, datamodule=data)
    val = cpu_trainer(root, 1).validate(model, datamodule=data, verbose=False)[0]["val/loss"]
    return {"ckpt": root / "last.ckpt", "model": model, "val_loss": val, "data": data, "root": root}


@pytest.mark.slow
def test_fine_tuning_starts_at_step_zero_with_the_source_weights(source, tmp_path):
    export = tmp_path / "weights.safetensors"
    export_checkpoint(source["ckpt"], export)
    for path in (source["ckpt"], export):
        L.seed_everything(1)  # another random init, which init_from must replace
        model = _model(init_from=str(path), init_strict=True)
        report = model.initialise_from(str(path), strict=True)
        assert report.mismatches() == 0 and len(report.loaded) == len(model.state_dict())
        for name, tensor in source["model"].state_dict().items():
            assert torch.equal(model.state_dict()[name], tensor), name
        val = cpu_trainer(tmp_path, 1).validate(model, datamodule=source["data"], verbose=False)[0]["val/loss"]
        assert val == pytest.approx(source["val_loss"], rel=1e-6)
    trainer = cpu_trainer(tmp_path, 3)
    trainer.fit(model, datamodule=source["data"])  # setup loads init_from; the run counts its own steps from 0
    assert trainer.global_step == 3


def test_report_names_what_a_changed_config_does_not_share(source):
    # extra res blocks (missing in the source) and no text encoder (the source's pooled-text input is unexpected
    # here, its cross-attention keys have another shape); what matches by name and shape loads
    wider = {"num_res_blocks": 2}
    model = _model(backbone=tiny_unet(**wider), text_encoder=None)
    source_keys = set(torch.load(source["ckpt"], weights_only=True)["state_dict"])
    report = model.initialise_from(str(source["ckpt"]))
    assert set(report.missing) == set(model.state_dict()) - source_keys and report.missing
    assert report.unexpected and all(k not in model.state_dict() for k in report.unexpected)
    assert any("pooled_embed" in k for k in report.unexpected)
    assert report.mismatched and all(" vs " in k for k in report.mismatched)
    saved = source["model"].state_dict()
    assert report.loaded and all(torch.equal(model.state_dict()[k], saved[k]) for k in report.loaded)
    with pytest.raises(UserError, match=r"init_from .*: loaded \d+ tensors; missing \d+ .*init_strict"):
        _model(backbone=tiny_unet(**wider), text_encoder=None).initialise_from(str(source["ckpt"]), strict=True)


def test_missing_or_wrong_source_is_one_line(tmp_path):
    model = _model()
    with pytest.raises(FileNotFoundError, match="init_from weights not found"):
        model.initialise_from(str(tmp_path / "nope.ckpt"))
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is unreadable"):
        model.initialise_from(str(tmp_path / "junk.ckpt"))
    with pytest.raises(UserError, match="a directory without diffusion_pytorch_model.safetensors"):
        model.initialise_from(str(tmp_path))
