"""The shapes dataset: reproducible bytes, captions that match attributes, a colour scorer that reads images right."""

from __future__ import annotations

import json
import random
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.synthetic import (
    COLOURS,
    POSITIONS,
    caption_with_colour,
    dominant_shape_colour,
    render_sample,
    write_shapes_shards,
)


def _to_tensor(images) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1 for im in images])


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = write_shapes_shards(tmp_path / "a", 60, image_size=16, seed=3, samples_per_shard=25)
    b = write_shapes_shards(tmp_path / "b", 60, image_size=16, seed=3, samples_per_shard=25)
    c = write_shapes_shards(tmp_path / "c", 60, image_size=16, seed=4, samples_per_shard=25)
    shards = a["train_shards"] + a["val_shards"]
    assert (a["num_train"], a["num_val"], len(a["train_shards"])) == (54, 6, 3)
    assert a["train_urls"].endswith("train-{000000..000002}.tar")
    for x, y in zip(shards, b["train_shards"] + b["val_shards"], strict=True):
        assert Path(x).read_bytes() == Path(y).read_bytes()
    assert Path(shards[0]).read_bytes() != Path(c["train_shards"][0]).read_bytes()


def test_members_and_captions_match_attributes(shapes_shards):
    keys = set()
    with tarfile.open(shapes_shards["train_shards"][0]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for name, data in members.items():
        if name.endswith(".json"):
            key = name[: -len(".json")]
            keys.add(key)
            attrs = json.loads(data)
            caption = members[key + ".txt"].decode()
            assert caption == attrs["caption"]
            for word in (attrs["shape"], attrs["colour"], attrs["size"], attrs["background"]):
                assert word in caption
            assert POSITIONS[attrs["position"]] in caption
            assert attrs["colour"] != attrs["background"]
            assert members[key + ".png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert len(keys) == 40


@pytest.mark.parametrize("size", [16, 32])
def test_dominant_colour_reads_rendered_images(size):
    rng = random.Random(0)
    samples = [render_sample(rng, size) for _ in range(200)]
    images = _to_tensor([s[0] for s in samples])
    truth = [s[1]["colour"] for s in samples]
    accuracy = np.mean([p == t for p, t in zip(dominant_shape_colour(images), truth, strict=True)])
    assert accuracy >= 0.97  # measured 1.0 (32px) and 0.995 (16px); chance is 1/8
    # Noise stronger than a half-trained generator's (std 0.3 in [-1,1] units) must not flip the answer often.
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    noisy = dominant_shape_colour(images + 0.3 * noise)
    assert np.mean([p == t for p, t in zip(noisy, truth, strict=True)]) >= 0.95  # measured 1.0 / 0.99


def test_plain_background_has_no_shape():
    flat = torch.tensor(COLOURS["blue"], dtype=torch.float32).view(1, 3, 1, 1).expand(2, 3, 16, 16) / 127.5 - 1
    assert dominant_shape_colour(flat) == ["none", "none"]


def test_caption_with_colour_names_the_colour():
    rng = random.Random(1)
    for colour in COLOURS:
        caption = caption_with_colour(colour, rng)
        assert re.search(rf"\b{colour} (circle|square|triangle)\b", caption), caption
    with pytest.raises(ValueError, match="unknown colour"):
        caption_with_colour("mauve", rng)
