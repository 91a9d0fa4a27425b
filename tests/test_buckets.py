"""Aspect-ratio buckets: single-bucket batches, exact epochs over 2 DDP ranks, exact resume, and models that train."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import STEP, tiny_unet, write_mixed_shards
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.buckets import auto_buckets, nearest_bucket
from datamodules.shards import bucket_histogram, expand_urls, format_report, inspect_shards
from datamodules.webdataset import TextImageDataModule
from genart_lightning.callbacks.rank_state import RankState
from genart_lightning.diffusion.flow import Flow
from genart_lightning.models.diffusion import PixelDiffusion
from genart_lightning.nn.dit import DiTBackbone


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_mixed_shards(tmp_path_factory.mktemp("mixed"), 300, per_shard=50)  # 6 shards


def datamodule(urls: str, **kwargs) -> TextImageDataModule:
    options = dict(batch_size=6, num_workers=2, image_size=32, buckets="auto", bucket_step=STEP, shuffle_buffer=16)
    return TextImageDataModule(urls, **(options | kwargs))


def test_auto_buckets_keep_the_area_and_images_go_to_the_nearest_ratio() -> None:
    buckets = auto_buckets(32, STEP)
    assert (32, 32) in buckets and all(h * w <= 32 * 32 and h % STEP == 0 == w % STEP for h, w in buckets)
    assert all(max(h / w, w / h) <= 4 for h, w in buckets) and buckets == [(64, 16), (40, 24), (32, 32), (24, 40),
                                                                            (16, 64)]
    assert buckets[nearest_bucket(24, 48, buckets)] == (24, 40)  # 2:1 wide -> the widest near it, 5:3
    assert buckets[nearest_bucket(48, 24, buckets)] == (40, 24)
    assert buckets[nearest_bucket(30, 30, buckets)] == (32, 32)
    with pytest.raises(ValueError, match="bucket_step=7 must divide image_size=32"):
        auto_buckets(32, 7)


def test_batches_hold_one_bucket_with_sizes_and_crops_and_validation_sees_everything(mixed: str) -> None:
    dm = datamodule(mixed, val_urls=mixed, val_batch_size=5)
    dm.setup("fit")
    buckets = dm.train_loader.config.bucketing.sizes
    seen = 0
    for batch in dm.train_dataloader():
        shape = tuple(batch["image"].shape[-2:])
        assert shape in buckets and batch["original_size"].shape == batch["crop_top_left"].shape == (6, 2)
        for (height, width), (top, left) in zip(batch["original_size"].tolist(), batch["crop_top_left"].tolist(),
                                                strict=True):
            assert buckets[nearest_bucket(height, width, buckets)] == shape  # each image in its own bucket
            scale = max(shape[0] / height, shape[1] / width)  # resized to cover, then centre-cropped
            assert (top, left) == ((round(height * scale) - shape[0]) // 2, (round(width * scale) - shape[1]) // 2)
        seen += 1
    assert seen == len(dm.train_loader)
    val = [batch for batch in dm.val_dataloader()]
    assert len(val) == len(dm.val_loader)
    keys = [k for batch in val for k in batch["key"]]
    assert sorted(keys) == [f"{i:06d}" for i in range(300)]  # every sample once, short batches per bucket
    report = format_report(inspect_shards(mixed))
    assert "48x24 (" in report  # the shards' size histogram, what the buckets are chosen from
    histogram = bucket_histogram(expand_urls(mixed), "auto", 32, STEP)  # what `shards info --buckets auto` prints
    assert sum(histogram.values()) == 300 and histogram[(16, 64)] == 0 and histogram[(24, 40)] > 0


class BucketRecorder(L.LightningModule):
    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.batches: list[dict] = []

    def training_step(self, batch, batch_idx):
        self.batches.append({"keys": batch["key"], "shape": list(batch["image"].shape[-2:]), "epoch": self.current_epoch})
        return (batch["image"].mean() - self.weight) ** 2

    def on_train_end(self) -> None:
        Path(self.out_dir, f"rank{self.global_rank}.json").write_text(json.dumps(self.batches))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _ddp_fit(urls: str, out: Path, steps: int, ckpt_path: str | None = None) -> list[list[dict]]:
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=5, save_top_k=-1)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_fork", max_steps=steps, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[checkpoint, RankState()],  # every rank's data position, as `genart fit` attaches
                        num_sanity_val_steps=0, default_root_dir=out)
    trainer.fit(BucketRecorder(str(out)), datamodule(urls), ckpt_path=ckpt_path)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.timeout(300)
@pytest.mark.ddp_fork
def test_two_rank_ddp_epochs_are_exact_across_buckets_and_resume_exactly(mixed: str, tmp_path: Path) -> None:
    dm = datamodule(mixed)
    dm._rank_world = lambda: (0, 2)
    dm.setup("fit")
    per_epoch = len(dm.train_loader)
    steps = per_epoch + 4  # into the second epoch
    full = _ddp_fit(mixed, tmp_path / "full", steps)
    for epoch in range(2):
        batches = [[b for b in full[r] if b["epoch"] == epoch] for r in range(2)]
        assert len(batches[0]) == len(batches[1]) == (per_epoch if epoch == 0 else 4)  # equal counts per rank
        keys = [k for rank in batches for b in rank for k in b["keys"]]
        assert len(keys) == len(set(keys))  # each sample at most once per epoch, over ranks and workers
    shapes = {tuple(b["shape"]) for rank in full for b in rank}
    assert len(shapes) >= 3  # the epoch mixes buckets
    resumed = _ddp_fit(mixed, tmp_path / "resumed", steps, str(tmp_path / "full" / "ckpt" / "epoch=0-step=5.ckpt"))
    for r in range(2):
        assert resumed[r] == full[r][5:]  # the same keys in the same buckets and order after the checkpoint


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_unet_and_dit_train_on_mixed_buckets(mixed: str, backbone: str) -> None:
    net = (tiny_unet()
           if backbone == "unet" else DiTBackbone(patch_size=4, hidden_size=32, depth=2, num_heads=2))
    model = PixelDiffusion(image_size=32, process=Flow(), clip_x0=False, backbone=net, lr=2e-3, text_encoder=None)
    shapes, losses = set(), []

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            shapes.add(tuple(batch["image"].shape[-2:]))
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(max_steps=30, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[Watch()])
    trainer.fit(model, datamodule(mixed, num_workers=0, batch_size=8))
    assert len(shapes) >= 3 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) < sum(losses[:10])  # flat-colour images: the velocity loss falls within 30 steps
