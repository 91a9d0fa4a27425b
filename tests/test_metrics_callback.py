"""PeriodicEvaluation: evaluates during fit at the configured steps, logs curves, matches a direct evaluation."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from datamodules.webdataset import TextImageDataModule
from genart_lightning.callbacks.periodic_evaluation import PeriodicEvaluation
from genart_lightning.metrics.evaluator import evaluate
from genart_lightning.models.gan import DCGAN
from genart_lightning.shapes.suite import ShapesSuite


@pytest.mark.slow
def test_periodic_evaluation_logs_curves_of_the_sampled_model(shapes_shards, genart_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("GENART_CACHE", str(genart_cache))
    torch.manual_seed(0)
    model = DCGAN(image_size=32, z_dim=16, g_channels=8, d_channels=8)
    data = TextImageDataModule(train_urls=shapes_shards["train_urls"], batch_size=8, num_workers=0, image_size=32)
    callback = PeriodicEvaluation(every_n_steps=2, num_samples=16, data_urls=shapes_shards["val_urls"], features="judge", batch_size=8)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=4, logger=CSVLogger(tmp_path), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    trainer.callbacks.append(callback)
    trainer.fit(model, datamodule=data)

    records = [json.loads(line) for line in (tmp_path / "lightning_logs" / "version_0" / "eval" / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [2, 4]  # a GAN step counts 2 (one per optimizer): one evaluation per batch here
    assert records[0]["fid"] != records[1]["fid"]  # the model trained in between
    assert records[0]["reference"]["count"] == shapes_shards["num_val"] and records[0]["num_samples"] == 16
    assert trainer.callback_metrics["val/fid"] == pytest.approx(records[1]["fid"])
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "val/fid" in logged and "val/kid" in logged

    # The last evaluation is of the final weights (EMA inside sample()): evaluating them again gives the same FID.
    again = evaluate(model, shapes_shards["val_urls"], 16, "judge", batch_size=8, suites=[ShapesSuite()])
    assert again["fid"] == pytest.approx(records[1]["fid"], rel=1e-6)
