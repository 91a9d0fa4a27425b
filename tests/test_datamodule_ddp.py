"""Real 2-process CPU DDP (gloo) with 2 loader workers per rank over an odd number of shards."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules.synthetic import write_shapes_shards
from datamodules.webdataset import TextImageDataModule

pytestmark = [pytest.mark.slow, pytest.mark.ddp_fork]


class RankRecorder(L.LightningModule):
    """Records, per rank and epoch, the keys of every training and validation batch; writes them at the end."""

    def __init__(self, out_dir: str, too_few_shards: str):
        super().__init__()
        self.out_dir = out_dir
        self.too_few_shards = too_few_shards
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.train_keys: dict[int, list[list[str]]] = {}
        self.val_keys: dict[int, list[str]] = {}
        self.val_totals: list[float] = []

    def training_step(self, batch, batch_idx):
        self.train_keys.setdefault(self.current_epoch, []).append(batch["key"])
        return (batch["image"].mean() - self.weight) ** 2  # DDP all-reduces this gradient every step

    def validation_step(self, batch, batch_idx):
        self.val_keys.setdefault(self.current_epoch, []).extend(batch["key"])

    def on_validation_epoch_end(self):
        # One epoch-level sync after uneven validation batches: must neither hang nor miss a sample.
        count = torch.tensor(float(len(self.val_keys.get(self.current_epoch, []))))
        self.val_totals.append(float(self.all_gather(count).sum()))

    def on_fit_end(self):
        error = ""
        try:
            TextImageDataModule(self.too_few_shards, batch_size=8, num_workers=2).setup("fit")
        except ValueError as exn:
            error = str(exn)
        record = {"train": self.train_keys, "val": self.val_keys, "val_totals": self.val_totals, "error": error}
        Path(self.out_dir, f"rank{self.global_rank}.json").write_text(json.dumps(record))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.timeout(300)
def test_ddp_two_ranks_two_workers_odd_shards(tmp_path):
    info = write_shapes_shards(tmp_path / "data", 170, image_size=8, samples_per_shard=31)  # 153 train, 17 val
    assert len(info["train_shards"]) == 5
    one = f"{tmp_path}/data/train-000000.tar"
    dm = TextImageDataModule(info["train_urls"], info["val_urls"], batch_size=8, val_batch_size=4, num_workers=2,
                             image_size=8, shuffle_buffer=16)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_fork", max_epochs=2, num_sanity_val_steps=0,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(RankRecorder(str(tmp_path), one), dm)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    for epoch in ("0", "1"):
        batches = [ranks[r]["train"][epoch] for r in range(2)]
        assert len(batches[0]) == len(batches[1]) > 0  # equal batch counts: no rank waits in an all-reduce
        keys = [k for r in range(2) for batch in batches[r] for k in batch]
        assert all(len(b) == 8 for r in range(2) for b in batches[r])
        assert len(keys) == len(set(keys))  # disjoint over ranks and workers, nothing repeated
        assert set(keys) <= {f"train{i:08d}" for i in range(153)}
        val = [ranks[r]["val"][epoch] for r in range(2)]
        assert sorted(val[0] + val[1]) == [f"val{i:08d}" for i in range(153, 170)]  # exactly the val set
        assert not set(val[0]) & set(val[1])
    assert ranks[0]["val_totals"] == ranks[1]["val_totals"] == [17.0, 17.0]
    assert ranks[0]["train"]["0"] != ranks[0]["train"]["1"]  # shards and samples reshuffled per epoch
    for r in range(2):
        assert ranks[r]["error"].startswith("1 shards for 2 ranks: need >= 2 in exact mode")
        assert "--shard-size" in ranks[r]["error"] and "--data.mode=resampled" in ranks[r]["error"]
