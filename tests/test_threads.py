"""CPU runs give torch the cores they may use less their loader workers, unless the user said otherwise."""

from __future__ import annotations

import os

import pytest
import torch
import yaml
from helpers import tiny_config

from genart_lightning.cli import entry
from genart_lightning.run.threads import choose_threads, usable_cores


@pytest.fixture
def no_thread_settings(monkeypatch):
    for name in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_threads_are_the_cores_less_the_loader_workers(no_thread_settings, monkeypatch):
    assert usable_cores() == 8
    assert choose_threads(2)[0] == 6
    assert choose_threads(2, processes=2)[0] == 2  # two ranks on the node split its cores
    assert choose_threads(12)[0] == 1
    assert choose_threads(2, requested=3) == (3, "--threads")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")
    assert choose_threads(1)[0] == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert choose_threads(1) == (5, "OMP_NUM_THREADS")
    with pytest.raises(ValueError, match="--threads 0"):
        choose_threads(0, requested=0)


def test_fit_sets_the_threads_and_says_so(no_thread_settings, shapes_shards_16px, tmp_path, capsys):
    config = tiny_config(shapes_shards_16px, max_steps=1)
    config["data"]["init_args"]["num_workers"] = 2
    config["trainer"]["default_root_dir"] = str(tmp_path / "run")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    torch.set_num_threads(1)
    entry(["fit", "--config", str(tmp_path / "config.yaml"), "--trainer.logger=false"])
    assert torch.get_num_threads() == 6
    assert "CPU threads: 6 for torch (8 usable cores - 2 loader workers)" in capsys.readouterr().out
    entry(["fit", "--config", str(tmp_path / "config.yaml"), "--trainer.logger=false", "--threads", "3"])
    assert torch.get_num_threads() == 3
