"""CPU runs give torch the cores they may use less their loader workers, unless the user said otherwise."""

from __future__ import annotations

import os
import re

import pytest
import torch
import yaml
from helpers import tiny_config
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

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
    assert choose_threads(2, requested=3)[:2] == (3, "--threads")
    assert choose_threads(2).tuning_candidates() == [1, 2, 4, 6, 8]
    assert choose_threads(2, requested=3).tuning_candidates() == []  # the user's count is kept
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")
    assert choose_threads(1)[0] == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert choose_threads(1)[:2] == (5, "OMP_NUM_THREADS")
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


class FakeClock:
    """perf_counter and /proc/stat for the tuner: each iteration takes what `seconds_per_step[threads]` says for
    torch's threads, with `idle_cores` of this process's cores idle meanwhile."""

    def __init__(self, seconds_per_step: dict[int, float], idle_cores: float = 1.0) -> None:
        self.now, self.seconds_per_step, self.idle_cores = 0.0, seconds_per_step, idle_cores
        self.jiffies = (0, 0)

    def step(self) -> None:
        self.now += self.seconds_per_step[torch.get_num_threads()]
        cores = len(os.sched_getaffinity(0))
        self.jiffies = (self.jiffies[0] + round(100 * self.idle_cores), self.jiffies[1] + 100 * cores)

    def install(self, monkeypatch) -> None:
        from genart_lightning.callbacks import step_clock, thread_tuner

        monkeypatch.setattr(step_clock.time, "perf_counter", lambda: self.now)
        monkeypatch.setattr(thread_tuner, "cpu_jiffies", lambda: self.jiffies)


def tuner_trainer(tuner, *callbacks):
    """A trainer holding `tuner` (and `callbacks`) set up as a fit sets it up: with the shared step clock installed."""
    from lightning.pytorch import Trainer

    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[tuner, *callbacks], enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks))
    tuner.setup(trainer, None, "fit")
    return trainer


def run_iterations(trainer, clock: FakeClock, count: int) -> None:
    """`count` training iterations as the loop calls the callbacks: batch start, the step, batch end."""
    for _ in range(count):
        for callback in trainer.callbacks:
            callback.on_train_batch_start(trainer, None, None, 0)
        clock.step()
        for callback in trainer.callbacks:
            callback.on_train_batch_end(trainer, None, None, None, 0)


@pytest.mark.parametrize("proc_stat", ["readable", "unreadable"])
def test_tuner_keeps_the_fastest_count_and_retunes_when_the_load_changes(monkeypatch, proc_stat):
    """Where /proc/stat can be read, the idle core tells the busy process has ended, although 1 thread runs as fast
    beside it as without it (what a real run saw); where it cannot, 1 thread's own speed-up has to tell."""
    from genart_lightning.callbacks import thread_tuner

    threads = torch.get_num_threads()
    busy_1_thread = 0.20 if proc_stat == "readable" else 0.40
    clock = FakeClock({1: 0.20, 2: 0.12})  # idle: 2 threads win although the rule started at 1
    clock.install(monkeypatch)
    if proc_stat == "unreadable":
        monkeypatch.setattr(thread_tuner, "cpu_jiffies", lambda: None)
    trainer = tuner_trainer(thread_tuner.ThreadTuner([1, 2], start=1, min_gap=50))
    torch.set_num_threads(1)
    try:
        run_iterations(trainer, clock, 40)
        assert torch.get_num_threads() == 2
        clock.seconds_per_step, clock.idle_cores = {1: busy_1_thread, 2: 3.0}, 0.0  # a busy process arrives: 2 threads spin-wait
        run_iterations(trainer, clock, 80)
        assert torch.get_num_threads() == 1
        clock.seconds_per_step, clock.idle_cores = {1: 0.20, 2: 0.12}, 1.0  # it ends: the core is free again
        run_iterations(trainer, clock, 80)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_tuner_does_not_try_more_threads_when_no_core_is_idle(monkeypatch, capsys):
    from genart_lightning.callbacks import thread_tuner

    threads = torch.get_num_threads()
    clock = FakeClock({1: 0.20, 2: 3.0}, idle_cores=0.1)  # another process keeps the other core busy from the start
    clock.install(monkeypatch)
    used = []
    monkeypatch.setattr(thread_tuner.torch, "set_num_threads", used.append)
    tuner = thread_tuner.ThreadTuner([1, 2], start=1)
    trainer = tuner_trainer(tuner)
    try:
        run_iterations(trainer, clock, 20)
        assert tuner.tuned is not None and 2 not in used and list(tuner.times) == [1]
        assert "2 not tried: 0.10 cores idle" in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)


class SlowEvaluation(Callback):
    """Works for 20 s after every `every`-th batch, as a periodic evaluation does."""

    def __init__(self, clock: FakeClock, every: int = 4) -> None:
        super().__init__()
        self.clock, self.every, self.batches = clock, every, 0

    def on_train_batch_end(self, *args) -> None:
        self.batches += 1
        if self.batches % self.every == 0:
            self.clock.now += 20.0


class SlowCheckpoint(SlowEvaluation, ModelCheckpoint):
    """The same pauses from a checkpoint callback, which Lightning runs after every other one."""


def test_tuner_does_not_time_what_other_callbacks_run_between_batches(monkeypatch):
    from genart_lightning.callbacks import thread_tuner

    threads = torch.get_num_threads()
    clock = FakeClock({1: 0.20, 2: 0.12})
    clock.install(monkeypatch)
    tuner = thread_tuner.ThreadTuner([1, 2], start=1, min_gap=10)
    trainer = tuner_trainer(tuner, SlowCheckpoint(clock, every=3), SlowEvaluation(clock))
    torch.set_num_threads(1)
    try:
        run_iterations(trainer, clock, 60)  # the pauses after batches 3 and 4 fall in count 2's trial
        assert torch.get_num_threads() == 2 and tuner.tuned_at == 5  # tuned once, never re-tuned
    finally:
        torch.set_num_threads(threads)


def test_fit_tunes_unless_the_count_is_fixed(no_thread_settings, shapes_shards_16px, tmp_path, capsys, monkeypatch):
    from genart_lightning.callbacks import thread_tuner

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(thread_tuner, "cpu_jiffies", lambda: None)  # whatever else the suite runs, try both counts
    config = tiny_config(shapes_shards_16px, max_steps=12)
    config["trainer"]["default_root_dir"] = str(tmp_path / "run")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    entry(["fit", "--config", str(tmp_path / "config.yaml"), "--trainer.logger=false"])
    assert re.search(r"CPU threads: [12] for torch \(tuned at step \d+, median s/iteration 1: [\d.]+ s, 2: ", capsys.readouterr().out)
    entry(["fit", "--config", str(tmp_path / "config.yaml"), "--trainer.logger=false", "--threads", "1"])
    assert "tuned at step" not in capsys.readouterr().out
