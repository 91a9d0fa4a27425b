"""Evaluation runner: FID over 2 DDP ranks equals 1 process, cached reference statistics are reused."""

from __future__ import annotations

import random
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torchvision.transforms.functional import pil_to_tensor

from datamodules.synthetic import render_sample, write_shapes_shards
from genart_lightning.metrics import reference_stats
from genart_lightning.metrics.evaluator import Evaluator, evaluate, to_side
from genart_lightning.metrics.features import FeatureExtractor
from genart_lightning.models.base import GenerativeModel


class Moments(FeatureExtractor):
    """Four cheap, deterministic features (channel means, overall spread): FID well-conditioned with ~10 images."""

    num_features = 4
    feature_id = "test-moments"
    resize = "none"

    def forward(self, images: Tensor) -> Tensor:
        return torch.cat([images.mean((2, 3)), images.std((1, 2, 3))[:, None]], dim=1)


class RenderedShapes(GenerativeModel):
    """Test family whose samples are shapes renders brightened by `shift`: a known-good and a known-bad model."""

    def __init__(self, image_size: int = 16, channels: int = 3, shift: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device

    def image_shape(self) -> tuple[int, int, int]:
        return (self.hparams.channels, self.hparams.image_size, self.hparams.image_size)

    def sample(self, n: int, captions=None, seed: int = 0) -> Tensor:
        rng = random.Random(seed)
        size = self.hparams.image_size
        images = torch.stack([pil_to_tensor(render_sample(rng, size)[0]).float() / 127.5 - 1 for _ in range(n)])
        return (images + self.hparams.shift).clamp(-1, 1)


@pytest.fixture(scope="module")
def odd_shards(tmp_path_factory) -> dict:
    """11 validation images at 16px: an odd count, so 2 ranks get 6 and 5."""
    return write_shapes_shards(tmp_path_factory.mktemp("odd"), 110, image_size=16, val_fraction=0.1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, urls: str, cache: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        # 9 samples in chunks of 2: ranks get chunks {0, 2, 4} and {1, 3} (5 and 4 images).
        result = evaluate(RenderedShapes(shift=0.2), urls, num_samples=9, features=Moments(), batch_size=2, cache_dir=cache)
        out[rank] = result
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fid_over_two_ddp_ranks_equals_one_process(odd_shards, tmp_path):
    single = evaluate(
        RenderedShapes(shift=0.2), odd_shards["val_urls"], num_samples=9, features=Moments(), batch_size=2, cache_dir=tmp_path / "one"
    )
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, _free_port(), odd_shards["val_urls"], str(tmp_path / "two"), results), nprocs=2)
    for rank in (0, 1):
        assert results[rank]["world_size"] == 2
        assert results[rank]["reference"]["count"] == 11  # every real image once: none dropped, none padded
        assert results[rank]["fid"] == pytest.approx(single["fid"], rel=1e-6)
    assert single["reference"]["count"] == 11 and single["fid"] > 0.05


def test_reference_statistics_are_cached_and_reused(odd_shards, tmp_path, monkeypatch):
    first = evaluate(RenderedShapes(shift=0.3), odd_shards["val_urls"], 8, Moments(), batch_size=4, cache_dir=tmp_path)
    assert not first["reference"]["reused"] and len(list(tmp_path.glob("test-moments-16px-*.pt"))) == 1

    def no_reading(*args, **kwargs):
        raise AssertionError("real images were read again although the statistics are cached")

    monkeypatch.setattr("genart_lightning.metrics.evaluator.real_loader", no_reading)
    second = evaluate(RenderedShapes(shift=0.3), odd_shards["val_urls"], 8, Moments(), batch_size=4, cache_dir=tmp_path)
    assert second["reference"]["reused"] and second["reference"]["cache"] == first["reference"]["cache"]
    assert second["fid"] == pytest.approx(first["fid"], rel=1e-9)
    assert second["kid"] == pytest.approx(first["kid"], rel=1e-6)


def test_fid_ranks_a_better_model_lower_and_records_how(odd_shards, tmp_path):
    evaluator = Evaluator(odd_shards["val_urls"], 10, Moments(), batch_size=5, cache_dir=tmp_path)
    good, bad = evaluator(RenderedShapes(shift=0.0)), evaluator(RenderedShapes(shift=0.5))
    assert good["fid"] < bad["fid"]
    assert good["reference"]["count"] == 11 and good["feature_extractor"]["id"] == "test-moments"
    assert (good["num_samples"], good["resolution"], good["seed"]) == (10, 16, 0)


def test_reference_key_changes_with_the_data(odd_shards, tmp_path):
    shard = odd_shards["val_shards"][0]
    before = reference_stats.reference_key(shard, "x", "none", 16)
    torch.save({}, tmp_path / "other.tar")
    assert reference_stats.reference_key(str(tmp_path / "other.tar"), "x", "none", 16) != before
    with pytest.raises(FileNotFoundError, match="shard not found: .*missing-000000.tar"):
        reference_stats.reference_key(str(tmp_path / "missing-000000.tar"), "x", "none", 16)


def test_sampling_options_the_family_lacks_are_refused(odd_shards, tmp_path):
    evaluator = Evaluator(odd_shards["val_urls"], 4, Moments(), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="RenderedShapes.sample\\(\\) takes no guidance"):
        evaluator(RenderedShapes(), guidance=2.0)


class WideShapes(RenderedShapes):
    """RenderedShapes that draws `width`-wide images: its square renders in the middle of a black band."""

    def sample(self, n: int, captions=None, seed: int = 0, height: int | None = None, width: int | None = None) -> Tensor:
        images = super().sample(n, captions, seed)
        pad = ((width or images.shape[-1]) - images.shape[-1]) // 2
        return torch.nn.functional.pad(images, (pad, pad), value=-1.0)


def test_non_square_samples_are_scored_centre_cropped_to_the_reference_size(odd_shards, tmp_path):
    evaluator = Evaluator(odd_shards["val_urls"], 6, Moments(), batch_size=3, cache_dir=tmp_path)
    wide, square = evaluator(WideShapes(), width=24), evaluator(RenderedShapes())
    assert wide["sampling"] == {"width": 24} and wide["resolution"] == 16
    assert wide["fid"] == pytest.approx(square["fid"], rel=1e-9)  # the band is cropped away: the same images scored
    images = torch.linspace(-1, 1, 2 * 3 * 8 * 12).reshape(2, 3, 8, 12)
    assert torch.equal(to_side(images, 8), images[..., 2:10]) and to_side(images, 4).shape == (2, 3, 4, 4)
