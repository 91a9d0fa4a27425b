"""Shared fixtures: small shapes datasets written once per test session."""

from __future__ import annotations

import pytest

from datamodules.synthetic import write_shapes_shards


@pytest.fixture(scope="session")
def shapes_shards(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """240 shapes samples at 32px: 6 train shards of <= 40 (216 samples), 1 val shard (24 samples).

    Returns write_shapes_shards' info: train_urls / val_urls brace patterns, num_train, num_val, shard paths.
    """
    return write_shapes_shards(tmp_path_factory.mktemp("shapes"), 240, image_size=32, seed=0, samples_per_shard=40)


@pytest.fixture(scope="session")
def shapes_shards_16px(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """512 shapes samples at 16px (tiny-net training tests): 4 train shards of <= 128, 1 val shard (51 samples)."""
    return write_shapes_shards(tmp_path_factory.mktemp("shapes16"), 512, image_size=16, seed=0, samples_per_shard=128)


@pytest.fixture(scope="session")
def genart_cache(tmp_path_factory: pytest.TempPathFactory):
    """A GENART_CACHE directory for the whole session: the shapes judge is trained once (~15 s) and shared."""
    return tmp_path_factory.mktemp("genart-cache")
