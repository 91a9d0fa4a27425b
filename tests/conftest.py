"""Shared fixtures: small shapes datasets written once per test session, a judge cache shared by every pytest-xdist
worker, and the distributed environment put back after each test."""

from __future__ import annotations

import os

# One intra-op thread per process, set before torch is imported (subprocesses inherit it): the suite shares
# 2 cores between pytest workers and the loader workers and DDP ranks they start.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
from packaging.version import Version  # noqa: E402

from datamodules.digits import write_digits_shards  # noqa: E402
from datamodules.synthetic import write_shapes_shards  # noqa: E402

DISTRIBUTED_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK",
                   "GROUP_RANK")
"""Set by Lightning's in-process ddp_fork and by torch.distributed; a later subprocess or sbatch job must not inherit them."""


@pytest.fixture(autouse=True)
def restore_distributed_env():
    saved = {name: os.environ.get(name) for name in DISTRIBUTED_ENV}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


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
def digits_shards_8px(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """scikit-learn's handwritten digits at their own 8px, captioned: 1,438 train, 178 val, 181 test images."""
    return write_digits_shards(tmp_path_factory.mktemp("digits8"), image_size=8)


@pytest.fixture(scope="session")
def trained_digits(digits_shards_8px: dict, tmp_path_factory: pytest.TempPathFactory):
    """`trained_digits(name)`: the tiny digits model of `helpers.digits_model(name)` (vp, edm, flow), trained
    once per session on first use. Tests using it carry `xdist_group("digits-NAME")`, so one worker trains each once."""
    from helpers import train_on_digits

    models: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in models:
            models[name] = train_on_digits(name, digits_shards_8px, tmp_path_factory.mktemp(f"digits-{name}"))
        return models[name]

    return get


@pytest.fixture(scope="session")
def genart_cache(tmp_path_factory: pytest.TempPathFactory):
    """A GENART_CACHE directory for the whole session, shared by the xdist workers (their base temp folders are
    siblings): the shapes judge is trained once (~15 s; written atomically, so a race trains it twice at worst)."""
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "genart-cache"
    shared.mkdir(exist_ok=True)
    return shared


def pytest_configure(config: pytest.Config) -> None:
    """pytest 9.2 keeps node ids where pytest-xdist 3.8's loadgroup does not mark them: nothing would be grouped, every
    trained fixture rebuilt per worker, and the suite minutes longer without failing. Stop with one line instead."""
    if config.getoption("dist", "no") == "loadgroup" and Version(pytest.__version__) >= Version("9.2"):
        raise pytest.UsageError(f"--dist loadgroup groups nothing under pytest {pytest.__version__} (pytest-xdist 3.8): "
                                "install the dev extra's pytest < 9.2 (pip install -e '.[dev]')")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into the node ids
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """xdist groups (`--dist loadgroup`): a test with a group of its own keeps it (the trained digits models); every
    other test runs in its file's worker, so a module-scoped trained fixture is built once, not once per worker, and a
    file's SLURM jobs are submitted one test after another (the local cluster runs two 2-task jobs at once)."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
