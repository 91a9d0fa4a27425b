"""TextImageDataModule in one process: batch contract, bad data skipped and counted, safe decoding, resume."""

from __future__ import annotations

import io
import pickle
import random
import tarfile
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import PicklePayload, add_member
from PIL import Image

from datamodules.loader import plan_exact
from datamodules.synthetic import write_shapes_shards
from datamodules.webdataset import TextImageDataModule


class KeyRecorder(L.LightningModule):
    """Trains a scalar on the images and records every key it is fed, in order."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.keys: list[str] = []

    def training_step(self, batch, batch_idx):
        self.keys.extend(batch["key"])
        return (batch["image"].mean() - self.weight) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path: Path, **kw) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    return L.Trainer(**(defaults | kw))


def test_batch_contract(shapes_shards):
    dm = TextImageDataModule(shapes_shards["train_urls"], shapes_shards["val_urls"], batch_size=16, num_workers=0,
                             image_size=24, random_flip=True)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "caption", "key"}
    assert batch["image"].shape == (16, 3, 24, 24) and batch["image"].dtype == torch.float32
    assert -1.0 <= batch["image"].min() < batch["image"].max() <= 1.0
    assert len(batch["caption"]) == 16 and all(isinstance(c, str) and c for c in batch["caption"])
    assert len(set(batch["key"])) == 16
    epoch = [k for b in dm.train_dataloader() for k in b["key"]]
    assert len(epoch) == len(dm.train_dataloader()) * 16 == 208  # 216 samples: 13 full batches, 8 left out
    assert len(set(epoch)) == len(epoch)
    val = [k for b in dm.val_dataloader() for k in b["key"]]
    assert sorted(val) == [f"val{i:08d}" for i in range(216, 240)]


def _png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buffer, format="PNG")
    return buffer.getvalue()




def _bad_shard(path: Path, marker: Path) -> list[str]:
    """A shard with 6 good samples, a corrupt JPEG, a caption-less sample, a pickle payload and a truncated tail."""
    good = []
    with tarfile.open(path, "w") as tar:
        for i in range(6):
            key = f"good{i}"
            add_member(tar, f"{key}.png", _png((40 * i, 100, 200)))
            add_member(tar, f"{key}.txt", f"caption {i}".encode())
            if i == 2:
                add_member(tar, f"{key}.pyd", pickle.dumps(PicklePayload(str(marker))))
            good.append(key)
            if i == 1:
                add_member(tar, "corrupt.jpg", b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 20)
                add_member(tar, "corrupt.txt", b"a corrupt image")
            if i == 3:
                add_member(tar, "nocaption.png", _png((0, 0, 0)))
        add_member(tar, "tail.png", _png((1, 2, 3)) * 40)
        add_member(tar, "tail.txt", b"the tail")
    data = path.read_bytes()
    tail = data.index(b"tail.png")  # header of the last image; cut inside its contents
    path.write_bytes(data[: tail + 512 + 300])
    return good


def test_bad_samples_skipped_counted_and_nothing_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    shard = str(tmp_path / "bad-000000.tar")
    good = _bad_shard(tmp_path / "bad-000000.tar", marker)
    dm = TextImageDataModule(shard, shard, batch_size=2, num_workers=0, image_size=16, shuffle_buffer=1)
    dm.setup("fit")
    # Validation reads the whole shard: every valid sample arrives, each bad one is counted by reason.
    loader = dm.val_dataloader()
    with pytest.warns(UserWarning, match=r"skipped 3 unusable samples in epoch 0 \(val\)"):
        keys = [k for b in loader for k in b["key"]]
    assert keys == good
    assert loader.skipped == {"corrupt image": 1, "no caption": 1, "unreadable shard": 1}
    # Training: 7 samples with image+caption headers -> 3 batches of 2, all from valid samples, none repeated.
    train = [k for b in dm.train_dataloader() for k in b["key"]]
    assert len(train) == 6 and set(train) == set(good)
    assert dm.train_dataloader().skipped["corrupt image"] == 1
    assert not marker.exists()


def test_strict_raises_naming_shard_and_key(tmp_path):
    _bad_shard(tmp_path / "bad-000000.tar", tmp_path / "pwned")
    dm = TextImageDataModule(str(tmp_path / "bad-000000.tar"), batch_size=2, num_workers=0, image_size=16,
                             shuffle_buffer=1, strict=True)
    dm.setup("fit")
    with pytest.raises(Exception, match=r"corrupt image: shard .*bad-000000.tar, key corrupt"):
        list(dm.train_dataloader())


def test_missing_shard_one_clear_error(shapes_shards):
    urls = shapes_shards["train_urls"].replace("000005", "000007")
    dm = TextImageDataModule(urls, batch_size=8, num_workers=0)
    with pytest.raises(FileNotFoundError, match=r"shard not found: .*train-000006.tar \(from --data.train_urls\)"):
        dm.setup("fit")


def test_fewer_shards_than_workers_uses_fewer_workers_and_says_so(shapes_shards):
    one = shapes_shards["train_urls"].split("{")[0] + "000000.tar"
    dm = TextImageDataModule(one, batch_size=8, num_workers=2, image_size=8)
    with pytest.warns(UserWarning, match=r"1 training shards for 1 rank x 2 workers: using 1 loader worker per rank"):
        dm.setup("fit")
    assert dm.train_loader.workers == 1
    keys = [k for batch in dm.train_loader for k in batch["key"]]
    assert len(keys) == len(set(keys)) > 0


def test_resampled_epoch_length_and_seeded_stream(shapes_shards):
    def keys(seed):
        dm = TextImageDataModule(shapes_shards["train_urls"], batch_size=8, num_workers=0, mode="resampled",
                                 batches_per_epoch=5, seed=seed, shuffle_buffer=16)
        dm.setup("fit")
        return [k for b in dm.train_dataloader() for k in b["key"]]

    first = keys(1)
    assert len(first) == 40 and first == keys(1) and first != keys(2)


def test_resampled_ranks_draw_distinct_streams_of_equal_length(shapes_shards):
    streams = []
    for rank in range(2):
        dm = TextImageDataModule(shapes_shards["train_urls"], batch_size=8, num_workers=0, mode="resampled",
                                 batches_per_epoch=5, shuffle_buffer=16)
        dm._rank_world = lambda rank=rank: (rank, 2)  # what a 2-rank Trainer reports to rank `rank`
        dm.setup("fit")
        streams.append([k for b in dm.train_dataloader() for k in b["key"]])
    assert len(streams[0]) == len(streams[1]) == 40
    assert streams[0] != streams[1]


def test_resume_mid_epoch_same_keys_in_order(tmp_path):
    """N steps vs N/2 + resume + N/2: identical keys in order (2 workers, checkpoint mid-epoch at an odd batch)."""
    info = write_shapes_shards(tmp_path / "data", 120, image_size=8, samples_per_shard=27)  # 4 shards, 108 train

    def datamodule():
        return TextImageDataModule(info["train_urls"], batch_size=8, num_workers=2, image_size=8, shuffle_buffer=32)

    steps = 20  # 12 batches per epoch: crosses an epoch boundary after the resume at step 10
    full = KeyRecorder()
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=steps // 2 - 3,
                                               save_top_k=-1)
    _trainer(tmp_path, max_steps=steps, callbacks=[ckpt]).fit(full, datamodule())
    assert len(full.keys) == steps * 8
    path = next(p for p in (tmp_path / "ckpt").iterdir() if "step=7" in p.name)
    resumed = KeyRecorder()
    _trainer(tmp_path, max_steps=steps, enable_checkpointing=False).fit(resumed, datamodule(), ckpt_path=path)
    assert resumed.keys == full.keys[7 * 8 :]
    first_epoch = full.keys[: 12 * 8]
    assert len(set(first_epoch)) == len(first_epoch)
    assert full.keys[12 * 8 : 20 * 8] != first_epoch[: 8 * 8]  # the next epoch is reshuffled


def test_resampled_resume_continues_the_same_stream(shapes_shards):
    """Loader-level resume with 2 workers: state after 5 batches + a fresh loader == the uninterrupted stream."""

    def loader():
        dm = TextImageDataModule(shapes_shards["train_urls"], batch_size=4, num_workers=2, mode="resampled",
                                 batches_per_epoch=10, seed=3, shuffle_buffer=8, image_size=8)
        dm.setup("fit")
        return dm.train_dataloader()

    first = loader()
    first.set_epoch(1)
    full, state = [], None
    for i, batch in enumerate(first):
        full.append(batch["key"])
        if i == 4:
            state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    resumed.set_epoch(1)
    rest = [batch["key"] for batch in resumed]
    assert len(full) == 10 and rest == full[5:]


def test_exact_plan_gives_every_slot_shards_and_every_rank_equal_batches():
    rng = random.Random(0)
    for trial in range(200):
        ranks, workers, batch = rng.randint(1, 4), rng.randint(1, 3), rng.choice([1, 4, 16])
        counts = [rng.choice([3, 40, 100, 1000]) for _ in range(rng.randint(ranks * workers, ranks * workers + 7))]
        plan = plan_exact(counts, ranks, workers, batch, seed=0, epoch=trial)
        assert sorted(s for shards in plan.slot_shards for s in shards) == list(range(len(counts)))
        assert all(plan.slot_shards)  # no worker without shards
        for r in range(ranks):
            mine = range(r * workers, (r + 1) * workers)
            assert sum(plan.slot_quotas[s] for s in mine) == plan.batches_per_rank
            for s in mine:  # a quota never exceeds what the slot's shards hold
                assert plan.slot_quotas[s] * batch <= sum(counts[i] for i in plan.slot_shards[s])
        assert plan.dropped == sum(counts) - plan.batches_per_rank * ranks * batch
    # Balanced dealing: 9 full shards and a small one over 2 ranks leave out far less than one shard per rank.
    assert plan_exact([1000] * 9 + [300], 2, 2, 64, seed=0, epoch=0).dropped < 1000
