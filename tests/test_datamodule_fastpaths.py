"""The loader's fast paths give what the plain paths give: worker batches by pipe or shared memory, images already at
the output size, the flip as an array view."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from datamodules import stream
from datamodules.webdataset import TextImageDataModule


def _epoch(urls: str, workers: int) -> list[dict]:
    dm = TextImageDataModule(urls, batch_size=16, num_workers=workers, image_size=16, random_flip=True, pin_memory=False)
    dm.setup("fit")
    return list(dm.train_dataloader())


@pytest.mark.parametrize("pipe_max_bytes", [stream.PIPE_MAX_BYTES, 0], ids=["pipe", "shared-memory"])
def test_worker_batches_equal_in_process_batches(shapes_shards, monkeypatch, pipe_max_bytes):
    monkeypatch.setattr(stream, "PIPE_MAX_BYTES", pipe_max_bytes)  # workers are forked: they see the patch
    in_process, worker = _epoch(shapes_shards["train_urls"], 0), _epoch(shapes_shards["train_urls"], 1)
    assert len(worker) == len(in_process) > 0
    for a, b in zip(in_process, worker, strict=True):
        assert set(b) == {"image", "caption", "key"} and isinstance(b["image"], torch.Tensor)
        assert b["image"].dtype == torch.float32 and b["image"].is_contiguous()
        assert a["key"] == b["key"] and a["caption"] == b["caption"] and torch.equal(a["image"], b["image"])


@pytest.mark.parametrize("center_crop", [True, False])
@pytest.mark.parametrize("flip", [False, True])
def test_transform_at_output_size_matches_resize_crop_flip(center_crop, flip):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8))
    plain = F.resize(image, [24] if center_crop else [24, 24], antialias=True)
    plain = F.center_crop(plain, [24, 24]) if center_crop else plain
    plain = F.horizontal_flip(plain) if flip else plain
    assert np.array_equal(stream.Transform(24, center_crop=center_crop)(image, flip), np.asarray(plain))


@pytest.mark.parametrize("height, width", [(384, 512), (512, 384), (40, 157), (33, 33)])
def test_transform_equals_torchvision_v2_resize_and_centre_crop(height, width):
    # What a user would write instead (transforms.v2 on uint8 tensors): our fast path must give the same pixels.
    from torchvision.transforms import v2

    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8))
    reference = v2.Compose([v2.ToImage(), v2.Resize(32, antialias=True), v2.CenterCrop(32)])(image)
    assert np.array_equal(stream.Transform(32)(image, False), reference.permute(1, 2, 0).numpy())
