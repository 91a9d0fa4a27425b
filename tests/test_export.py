"""`genart export`: a real training checkpoint -> safetensors that `genart sample` loads to the same model."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from cluster_helpers import load_checkpoint
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors import safe_open

from datamodules.webdataset import TextImageDataModule
from genart_lightning.cli import main
from genart_lightning.models.gan import DCGAN
from genart_lightning.models.loading import load_model


@pytest.fixture(scope="module")
def trained_checkpoint(shapes_shards_16px: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """last.ckpt of a few DCGAN iterations (EMA weights moved away from the init), with a config.yaml beside it."""
    root = tmp_path_factory.mktemp("export")
    L.seed_everything(0)
    data = TextImageDataModule(shapes_shards_16px["train_urls"], batch_size=8, num_workers=0, image_size=16)
    model = DCGAN(image_size=16, z_dim=16, g_channels=8, d_channels=8, ema_decay=0.5)
    checkpoint = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, save_top_k=0)
    trainer = L.Trainer(max_steps=8, accelerator="cpu", logger=False, callbacks=[checkpoint],
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    (root / "checkpoints" / "config.yaml").write_text("model:\n  class_path: genart_lightning.models.gan.DCGAN\n")
    return root / "checkpoints" / "last.ckpt"


def test_export_round_trip_gives_the_same_model_and_carries_its_config(trained_checkpoint: Path, capsys) -> None:
    out = trained_checkpoint.parent / "dcgan.safetensors"
    main(["export", "--ckpt", str(trained_checkpoint), "--out", str(out)])
    assert "with config" in capsys.readouterr().out
    with safe_open(str(out), framework="pt") as f:
        metadata = f.metadata()
        names = set(f.keys())
    checkpoint = load_checkpoint(trained_checkpoint)
    assert names == set(checkpoint["state_dict"]) and any(n.startswith("ema.") for n in names)
    assert metadata["genart_family"] == "genart_lightning.models.gan.DCGAN"
    assert json.loads(metadata["hyper_parameters"])["g_channels"] == 8
    assert metadata["config"] == (trained_checkpoint.parent / "config.yaml").read_text()
    from_ckpt, from_export = load_model(trained_checkpoint), load_model(out)
    for name, tensor in from_ckpt.state_dict().items():
        assert torch.equal(tensor, from_export.state_dict()[name]), name
    assert torch.equal(from_ckpt.sample(4, seed=3), from_export.sample(4, seed=3))


def test_sample_accepts_checkpoint_and_export_alike(trained_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.safetensors"
    main(["export", "--ckpt", str(trained_checkpoint), "--out", str(out)])
    for source, png in ((trained_checkpoint, tmp_path / "a.png"), (out, tmp_path / "b.png")):
        main(["sample", "--ckpt", str(source), "--num", "4", "--seed", "1", "--out", str(png)])
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_export_errors_name_the_problem(tmp_path: Path, trained_checkpoint: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: .*missing.ckpt \(from --ckpt\)"):
        main(["export", "--ckpt", str(tmp_path / "missing.ckpt")])
    with pytest.raises(FileNotFoundError, match=r"config not found: .*nope.yaml \(from --config\)"):
        main(["export", "--ckpt", str(trained_checkpoint), "--config", str(tmp_path / "nope.yaml")])
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="lacks genart metadata"):
        load_model(plain)
