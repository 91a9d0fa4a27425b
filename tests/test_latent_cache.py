"""Latent cache: `genart shards encode` -> latent shards -> latent diffusion trains from them as from the images."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers import PicklePayload, add_member, genart_in_process, tiny_unet

from datamodules.latents import CACHE_FILE, CacheMismatch, read_cache_info
from datamodules.shards import expand_urls, format_report, inspect_shards
from datamodules.webdataset import TextImageDataModule
from genart_lightning.models.diffusion import PixelDiffusion
from genart_lightning.models.latent_cache import encode_shards, load_first_stage
from genart_lightning.models.latent_diffusion import LatentDiffusion
from genart_lightning.models.vae import VAE
from genart_lightning.nn.text_encoder import FrozenTextEncoder

ONE_LEVEL = {"channel_mult": [1], "attention_levels": [0]}  # 8 x 8 latents
STEPS = 4


def _trainer(steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                     limit_val_batches=0, **kwargs)


def _vae(data: TextImageDataModule, path: Path, seed: int) -> Path:
    L.seed_everything(seed)
    trainer = _trainer(3)
    trainer.fit(VAE(image_size=16, base_channels=16, channel_mults=[1, 2], lr=1e-3), data)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def cache(shapes_shards_16px: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A VAE trained 3 steps (latent scale != 1), and the 16px shapes train shards encoded with it and the tiny text
    encoder, in float32 and in float16."""
    root = tmp_path_factory.mktemp("latent-cache")
    images = TextImageDataModule(shapes_shards_16px["train_urls"], batch_size=16, num_workers=0, image_size=16)
    vae = _vae(images, root / "vae.ckpt", seed=0)
    urls = expand_urls(shapes_shards_16px["train_urls"])
    out = {"vae": vae, "root": root, "urls": urls}
    for precision in ("float32", "float16"):
        text = FrozenTextEncoder("genart-tiny").eval()
        counts = encode_shards(load_first_stage(str(vae)), text, urls, root / precision, 16, batch_size=32,
                               precision=precision)
        out[precision] = str(root / precision / "train-{000000..000003}.tar")
        out["counts"] = counts
    return out


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.keys: list[list[str]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.keys.append(list(batch["key"]))


def _fit(vae: Path, urls: str, kind: str, **model_args) -> tuple[LossRecorder, LatentDiffusion]:
    L.seed_everything(0)
    model = LatentDiffusion(first_stage_ckpt=str(vae), image_size=16, backbone=tiny_unet(**ONE_LEVEL), lr=1e-3,
                            caption_dropout=0.5, **model_args)
    data = TextImageDataModule(urls, batch_size=8, num_workers=0, image_size=16, kind=kind, shuffle_buffer=16)
    recorder = LossRecorder()
    _trainer(STEPS, callbacks=[recorder]).fit(model, data)
    return recorder, model


def test_training_from_the_cache_matches_training_from_images(cache: dict, shapes_shards_16px: dict) -> None:
    """Same seed: the same batches, and losses equal to 1e-4 from a float32 cache (text states cached too, with
    caption dropout 0.5 swapping in the empty caption's states); 5e-3 relative from float16, whose 11-bit mantissa
    rounds each latent by up to 2**-11 of its value."""
    assert cache["counts"]["samples"] == shapes_shards_16px["num_train"]
    images, model = _fit(cache["vae"], shapes_shards_16px["train_urls"], "images")
    cached32, model32 = _fit(cache["vae"], cache["float32"], "latents")
    assert cached32.keys == images.keys
    np.testing.assert_allclose(cached32.losses, images.losses, rtol=0, atol=1e-4)
    for a, b in zip(model32.backbone.parameters(), model.backbone.parameters(), strict=True):
        # the updates agree, not only the losses: 4 Adam steps of lr 1e-3 move a weight by up to 4e-3, and Adam's
        # normalisation turns rounding in near-zero gradients into differences of ~1e-5
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    cached16, _ = _fit(cache["vae"], cache["float16"], "latents")
    np.testing.assert_allclose(cached16.losses, images.losses, rtol=5e-3)
    # the switch acts: the cached batches hold latents, no images
    cached = TextImageDataModule(cache["float32"], batch_size=4, num_workers=0, kind="latents", image_size=16)
    batch = next(iter(cached.train_dataloader()))
    assert "image" not in batch and batch["latent"].shape == (4, 4, 8, 8) and batch["text_tokens"].dtype == torch.float32


def test_a_cache_of_another_first_stage_or_text_encoder_is_refused(cache: dict, shapes_shards_16px: dict) -> None:
    images = TextImageDataModule(shapes_shards_16px["train_urls"], batch_size=16, num_workers=0, image_size=16)
    other = _vae(images, cache["root"] / "other-vae.ckpt", seed=1)
    record = read_cache_info(expand_urls(cache["float32"]))
    model = LatentDiffusion(first_stage_ckpt=str(other), image_size=16, backbone=tiny_unet(**ONE_LEVEL))
    with pytest.raises(CacheMismatch, match=r"made by first stage VAE sha256 \w+ .* this model has first stage VAE sha256"):
        model.check_latent_cache(record)
    with pytest.raises(CacheMismatch, match="re-encode them"):  # through fit: stops in setup, before the first step
        _fit(other, cache["float32"], "latents")
    same_vae = LatentDiffusion(first_stage_ckpt=str(cache["vae"]), image_size=16, backbone=tiny_unet(**ONE_LEVEL),
                               text_layer="penultimate")
    with pytest.raises(CacheMismatch, match="text genart-tiny .* final"):
        same_vae.check_latent_cache(record)
    trained_text = LatentDiffusion(first_stage_ckpt=str(cache["vae"]), image_size=16, backbone=tiny_unet(**ONE_LEVEL),
                                   text_layer="penultimate", train_text_encoder=True)
    trained_text.check_latent_cache(record)  # a tower trained along reads the captions, not the cached states
    with pytest.raises(ValueError, match="PixelDiffusion diffuses pixels.*train LatentDiffusion"):
        PixelDiffusion(image_size=16, backbone=tiny_unet(**ONE_LEVEL)).check_latent_cache(record)
    with pytest.raises(FileNotFoundError, match=f"no {CACHE_FILE} beside .*not latent shards.*genart shards encode"):
        TextImageDataModule(shapes_shards_16px["train_urls"], num_workers=0, kind="latents", image_size=16).setup("fit")


def test_two_rank_encode_writes_disjoint_shards_covering_every_sample(cache: dict, shapes_shards_16px: dict,
                                                                      tmp_path: Path, monkeypatch) -> None:
    """torchrun with 2 processes, each encoding its own shards (no process group); then a second run (its two ranks in
    this process, with the variables torchrun sets) skips them all."""
    genart = Path(sys.executable).with_name("genart")
    command = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", "2", "--no-python", str(genart),
               "shards", "encode", "--first-stage", str(cache["vae"]), "--data", shapes_shards_16px["train_urls"],
               "--out", str(tmp_path / "out"), "--batch-size", "64"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0/2: " in done.stdout and "rank 1/2: " in done.stdout and "into 2 shards" in done.stdout
    written = sorted((tmp_path / "out").glob("*.tar"))
    assert [p.name for p in written] == [Path(u).name for u in cache["urls"]]
    keys = [k for p in written for k in _keys(p, ".latent.npy")]
    source = [k for u in cache["urls"] for k in _keys(u, ".txt")]
    assert len(keys) == len(set(keys)) and sorted(keys) == sorted(source)
    data = TextImageDataModule(str(tmp_path / "out" / "train-{000000..000003}.tar"), batch_size=8, num_workers=0,
                               kind="latents", image_size=16)
    data.setup("fit")
    assert sum(data.train_loader.counts) == len(source)  # sizes.json of both ranks merged
    assert data.latent_cache["text_encoder"] is None and data.latent_cache["precision"] == "float16"
    assert f"latents: 4x8x8 ({len(source)})" in format_report(inspect_shards(str(tmp_path / "out" / "*.tar")))
    for rank in range(2):
        for name, value in {"RANK": rank, "LOCAL_RANK": rank, "GROUP_RANK": 0, "WORLD_SIZE": 2, "TORCHELASTIC_RUN_ID": 1,
                            "LOCAL_WORLD_SIZE": 2}.items():
            monkeypatch.setenv(name, str(value))
        code, out, err = genart_in_process(*command[5:])
        assert code == 0 and "(2 already there)" in out, err[-2000:]


def test_latent_ranks_are_disjoint_equal_and_resume_exactly(cache: dict) -> None:
    def loader(rank: int):
        dm = TextImageDataModule(cache["float16"], batch_size=8, num_workers=2, kind="latents", shuffle_buffer=16,
                                 image_size=16)
        dm._rank_world = lambda: (rank, 2)  # what a 2-rank Trainer reports to rank `rank`
        dm.setup("fit")
        return dm.train_dataloader()

    per_rank = [[b["key"] for b in loader(r)] for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    keys = [k for rank in per_rank for batch in rank for k in batch]
    assert len(keys) == len(set(keys))
    first = loader(1)
    state, seen = None, []
    for i, batch in enumerate(first):
        seen.append(batch["key"])
        if i == 2:
            state = first.state_dict()
    resumed = loader(1)
    resumed.load_state_dict(state)
    assert [b["key"] for b in resumed] == seen[3:] == per_rank[1][3:]


def test_corrupt_latents_are_counted_and_skipped_never_unpickled(cache: dict, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    out.mkdir()
    shutil.copy(cache["root"] / "float16" / CACHE_FILE, out)
    marker = tmp_path / "unpickled"
    payload = io.BytesIO()
    np.save(payload, np.array([PicklePayload(str(marker))], dtype=object), allow_pickle=True)
    good = np.zeros((4, 8, 8), np.float16)
    with tarfile.open(out / "train-000000.tar", "w") as tar:
        for i, latent in enumerate([payload.getvalue(), _npy(good), b"not an npy", _npy(good)]):
            add_member(tar, f"{i:03d}.txt", b"a caption")
            add_member(tar, f"{i:03d}.latent.npy", latent)
    dm = TextImageDataModule(val_urls=str(out / "train-000000.tar"), batch_size=1, num_workers=0, kind="latents",
                             image_size=16)
    with pytest.warns(UserWarning, match=r"skipped 2 unusable samples .*\(corrupt latent: 2\)"):
        keys = [k for b in dm.val_dataloader() for k in b["key"]]
    assert sorted(keys) == ["001", "003"] and not marker.exists()



def _keys(path: str | Path, member: str) -> list[str]:
    with tarfile.open(path) as tar:
        return [m.name.split(".")[0] for m in tar if m.name.endswith(member)]


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()
