"""SIGUSR1 -> checkpoint at a step boundary -> resume loses nothing (in-process, no SLURM needed)."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from cluster_helpers import PaceSteps, dcgan_config, diffusion_config, load_checkpoint, write_config
from helpers import REPO
from jsonargparse import Namespace
from lightning.pytorch.loggers import CSVLogger

from datamodules.webdataset import TextImageDataModule
from genart_lightning.callbacks.rank_state import RankState
from genart_lightning.models.base import GenerativeModel
from genart_lightning.models.loading import load_model
from genart_lightning.run.checkpoint_io import AtomicCheckpointIO
from genart_lightning.run.cluster import PREEMPTED_CKPT
from genart_lightning.run.csv_logger import ContinuedCSVLogger
from genart_lightning.run.lightning_cli import GenartCLI
from genart_lightning.run.provenance import git_state
from genart_lightning.run.resume import newest_checkpoint, pin_loggers, should_resume

MAX_STEPS = 40  # 20 DCGAN iterations
SIGNAL_AFTER_BATCH = 7
CHECK_EVERY = 4  # batches between the ranks' agreements on the flag: the save comes at batch 8


class SignalAt(L.Callback):
    """Sends this process a signal at the end of one training batch, as `scancel -s USR1` (or, for SIGTERM,
    `scontrol requeue` and preemption) would."""

    def __init__(self, batch: int, signum: int = signal.SIGUSR1) -> None:
        self.batch, self.signum, self.seen = batch, signum, 0

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        self.seen += 1
        if self.seen == self.batch:
            os.kill(os.getpid(), self.signum)


def fit(config: Path, *args: str, callbacks: tuple[L.Callback, ...] = ()) -> L.Trainer:
    """`genart fit --config CONFIG ARGS` in this process (extra callbacks as LightningCLI trainer defaults)."""
    cli = GenartCLI(
        GenerativeModel,
        TextImageDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": list(callbacks)},
        args=["fit", "--config", str(config), *args],
    )
    return cli.trainer


@pytest.fixture(scope="module")
def runs(shapes_shards_16px: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An uninterrupted run, and the same run stopped by SIGUSR1 then resumed (--resume=always: no SLURM here)."""
    tmp = tmp_path_factory.mktemp("preemption")
    ref_root, run_root = tmp / "reference", tmp / "interrupted"
    reference = fit(write_config(dcgan_config(shapes_shards_16px, ref_root, MAX_STEPS), tmp / "ref.yaml"))
    run_config = write_config(dcgan_config(shapes_shards_16px, run_root, MAX_STEPS), tmp / "run.yaml")
    stopped = fit(run_config, f"--preemption.check_every_n_steps={CHECK_EVERY}", callbacks=(SignalAt(SIGNAL_AFTER_BATCH),))
    preempted = load_checkpoint(run_root / "checkpoints" / PREEMPTED_CKPT)
    resumed = fit(run_config, "--resume=always")
    return {"reference": reference, "ref_root": ref_root, "stopped": stopped, "preempted": preempted,
            "resumed": resumed, "run_root": run_root}


@pytest.mark.slow
def test_sigusr1_stops_after_a_whole_gan_iteration_and_saves(runs: dict) -> None:
    stopped, preempted = runs["stopped"], runs["preempted"]
    step = preempted["global_step"]
    assert 0 < step < MAX_STEPS and stopped.global_step == step  # stopped right after the save, not at max_steps
    # The signal lands after batch 7; the save waits for the next agreement, after batch 8's D and G updates.
    assert step == 2 * CHECK_EVERY * -(-SIGNAL_AFTER_BATCH // CHECK_EVERY)
    counters = preempted["adversarial_counters"]
    assert counters["d_steps"] == counters["g_steps"] == step // 2
    assert preempted["callbacks"]["Preemption"]["history"]["preempted_at"] == [step]
    assert preempted["optimizer_states"] and preempted["loops"]  # full training state, not just weights


@pytest.mark.slow
def test_resumed_run_continues_from_the_saved_step_and_ends_where_an_uninterrupted_run_does(runs: dict) -> None:
    reference, resumed = runs["reference"], runs["resumed"]
    step = runs["preempted"]["global_step"]
    assert Path(resumed.ckpt_path).name == PREEMPTED_CKPT
    assert resumed.global_step == reference.global_step == MAX_STEPS
    final = load_checkpoint(runs["run_root"] / "checkpoints" / "last.ckpt")
    assert final["global_step"] == MAX_STEPS
    assert final["callbacks"]["Preemption"]["history"] == {"preempted_at": [step], "resumed_at": [step]}
    # Weights, optimizer moments, EMA, data position and RNG streams all came back: the interrupted run's
    # final weights are those of the run that was never interrupted.
    ref_weights, run_weights = reference.lightning_module.state_dict(), resumed.lightning_module.state_dict()
    assert ref_weights.keys() == run_weights.keys() and any(k.startswith("ema.") for k in ref_weights)
    different = [k for k in ref_weights if not torch.equal(ref_weights[k], run_weights[k])]
    assert not different, f"differ after resume: {different[:5]}"
    # The same logger run continued (one CSV version dir), instead of a new one per restart, and its metrics.csv
    # holds each step once, before and after the preemption: those of the uninterrupted run, plus the row Lightning
    # logs when a run stops.
    assert sorted(p.name for p in (runs["run_root"] / "lightning_logs").iterdir()) == ["version_0"]
    reference_steps, steps = (logged_steps(root / "lightning_logs" / "version_0" / "metrics.csv")
                              for root in (runs["ref_root"], runs["run_root"]))
    stop_row = runs["preempted"]["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"]
    assert steps == sorted(set(steps)) == sorted({*reference_steps, stop_row})
    assert min(steps) < stop_row < max(steps)


@pytest.mark.slow
def test_diffusion_resumed_at_an_epoch_end_before_validation_ends_bit_identical(shapes_shards_16px: dict,
                                                                                tmp_path: Path) -> None:
    # 28 batches per epoch here; validation every 14 steps. The signal after batch 26 is acted on at batch 28: the
    # checkpoint is written before that step's validation and the next epoch's loader start, which the uninterrupted
    # run does before its step 29. Neither may touch the training noise (both used to draw from the global RNG).
    epoch, steps = 28, 36
    reference = fit(write_config(diffusion_config(shapes_shards_16px, tmp_path / "reference", steps, epoch // 2),
                                 tmp_path / "reference.yaml"))
    config = write_config(diffusion_config(shapes_shards_16px, tmp_path / "run", steps, epoch // 2), tmp_path / "run.yaml")
    fit(config, f"--preemption.check_every_n_steps={CHECK_EVERY}", callbacks=(SignalAt(epoch - 2),))
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / PREEMPTED_CKPT)["global_step"] == epoch
    resumed = fit(config, "--resume=always")
    assert_resumed_to_the_reference(resumed, reference, steps)


@pytest.mark.slow
def test_sigterm_inside_an_accumulation_group_saves_at_its_end_without_requeue_and_resumes_exactly(
        shapes_shards_16px: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    requeued = []
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # inside a job: SLURM requeues after SIGTERM itself, the callback must not
    monkeypatch.setattr("genart_lightning.callbacks.preemption.requeue", requeued.append)
    accumulate, steps, signal_after = 4, 10, 14  # optimizer steps at batches 4, 8, 12, 16, ...: batch 14 is inside one

    def config(name: str) -> Path:
        settings = diffusion_config(shapes_shards_16px, tmp_path / name, steps, 14)
        settings["trainer"]["accumulate_grad_batches"] = accumulate
        return write_config(settings, tmp_path / f"{name}.yaml")

    reference = fit(config("reference"))
    run = config("run")
    stopped = fit(run, "--preemption.check_every_n_steps=1", callbacks=(SignalAt(signal_after, signal.SIGTERM),))
    preempted = load_checkpoint(tmp_path / "run" / "checkpoints" / PREEMPTED_CKPT)
    assert preempted["global_step"] == stopped.global_step == -(-signal_after // accumulate)  # the group's end: batch 16
    assert preempted["callbacks"]["Preemption"]["steps"] == preempted["global_step"]  # the callback's counters are saved
    assert requeued == []
    resumed = fit(run, "--resume=always")
    assert_resumed_to_the_reference(resumed, reference, steps)


@pytest.mark.slow
def test_agreement_interval_shrinks_on_slow_steps_so_the_save_comes_within_the_bound(shapes_shards_16px: dict,
                                                                                      tmp_path: Path) -> None:
    # 0.2 s per DCGAN iteration and agree_within_s 0.5: the ranks agree every 2 iterations, not every 50
    config = dcgan_config(shapes_shards_16px, tmp_path / "run", MAX_STEPS)
    config["trainer"]["logger"] = False
    signal_after = 6
    fit(write_config(config, tmp_path / "run.yaml"), "--preemption.check_every_n_steps=50",
        "--preemption.agree_within_s=0.5", callbacks=(PaceSteps(0.2), SignalAt(signal_after)))
    preempted = load_checkpoint(tmp_path / "run" / "checkpoints" / PREEMPTED_CKPT)
    iterations = preempted["global_step"] // 2
    assert signal_after <= iterations <= signal_after + 2, iterations
    assert preempted["callbacks"]["Preemption"]["interval"] in (1, 2)  # 1 where a slower machine takes > 0.25 s


def assert_resumed_to_the_reference(resumed: L.Trainer, reference: L.Trainer, steps: int) -> None:
    """The resumed run ended at the reference's step with bit-identical weights (EMA and text tower included)."""
    assert resumed.global_step == reference.global_step == steps
    ref_weights, run_weights = reference.lightning_module.state_dict(), resumed.lightning_module.state_dict()
    different = [k for k in ref_weights if not torch.equal(ref_weights[k], run_weights[k])]
    assert not different, f"{len(different)} of {len(ref_weights)} tensors differ after resume: {different[:3]}"


def logged_steps(metrics_csv: Path) -> list[int]:
    """The step of every row of a CSVLogger metrics.csv that has a training loss."""
    with metrics_csv.open(newline="") as file:
        return [int(row["step"]) for row in csv.DictReader(file) if row.get("train/d_loss")]


@pytest.mark.slow
def test_checkpoints_load_weights_only_and_carry_provenance(runs: dict, shapes_shards_16px: dict) -> None:
    ckpt_dir = runs["ref_root"] / "checkpoints"
    checkpoint = load_checkpoint(ckpt_dir / "last.ckpt")  # raises if anything in it needs pickle
    assert checkpoint["hyper_parameters"]["g_channels"] == 8
    model = load_model(ckpt_dir / "last.ckpt")
    assert model.sample(2, seed=0).shape == (2, 3, 16, 16)
    assert type(runs["reference"].strategy.checkpoint_io) is AtomicCheckpointIO
    config = (ckpt_dir / "config.yaml").read_text()
    assert "genart_lightning.models.gan.DCGAN" in config and f"max_steps: {MAX_STEPS}" in config
    provenance = json.loads((ckpt_dir / "provenance.json").read_text())
    commit = provenance["git"]["commit"]
    assert subprocess.run(["git", "-C", str(REPO), "merge-base", "--is-ancestor", commit, "HEAD"]).returncode == 0
    assert provenance["packages"]["torch"] == torch.__version__.split("+")[0]
    assert provenance["packages"]["lightning"] == L.__version__
    listed = [line.split("\t")[1] for line in (ckpt_dir / "shards.txt").read_text().splitlines()]
    assert listed == shapes_shards_16px["train_shards"]


def test_git_state_records_commit_and_the_uncommitted_diff(tmp_path: Path) -> None:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), *args], capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    (tmp_path / "train.py").write_text("lr = 1\n")
    git("add", "train.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    clean = git_state(tmp_path)
    assert clean["commit"] == git("rev-parse", "HEAD").strip() and clean["dirty"] is False and clean["diff"] == ""
    (tmp_path / "train.py").write_text("lr = 2\n")
    (tmp_path / "notes.txt").write_text("new\n")
    dirty = git_state(tmp_path)
    assert dirty["dirty"] is True and "+lr = 2" in dirty["diff"] and dirty["untracked"] == ["notes.txt"]
    assert git_state(tmp_path / "missing")["commit"] is None


def test_each_rank_gets_its_own_rng_streams_and_data_position_back() -> None:
    def checkpoint(position: int) -> dict:
        return {"callbacks": {}, "loops": {"fit_loop": {"state_dict": {"combined_loader": [{"position": position}]}}}}

    saved = checkpoint(5)
    RankState().on_save_checkpoint(SimpleNamespace(), None, saved)
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    # As Lightning writes it from rank 0 under DDP: rank 1's position and streams beside rank 0's.
    state = saved["callbacks"]["RankState"]
    rank1 = {"rng": state["ranks"][0]["rng"], "loaders": [{"position": 7}]}
    two_ranks = {"ranks": [{"rng": state["ranks"][0]["rng"], "loaders": [{"position": 9}]}, rank1]}
    torch.manual_seed(123), np.random.seed(123), random.seed(123)  # what a restarted rank's on_fit_start does
    callback, loaded = RankState(), checkpoint(9)
    loaded["callbacks"]["RankState"] = two_ranks
    callback.on_load_checkpoint(SimpleNamespace(world_size=2, global_rank=1), None, loaded)
    assert loaded["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"position": 7}]
    callback.on_train_batch_start(SimpleNamespace(), None, {}, 0)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]
    mismatched = checkpoint(9)
    mismatched["callbacks"]["RankState"] = two_ranks
    with pytest.warns(UserWarning, match="2 ranks but this run has 4"):
        RankState().on_load_checkpoint(SimpleNamespace(world_size=4, global_rank=3), None, mismatched)
    assert mismatched["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"position": 9}]


def test_resume_picks_the_newest_checkpoint_and_only_inside_slurm_by_default(tmp_path: Path, monkeypatch) -> None:
    assert newest_checkpoint(tmp_path / "missing") is None
    torch.save({}, tmp_path / "last.ckpt")  # loadable: newest_checkpoint skips unreadable files
    torch.save({}, tmp_path / "epoch=0-step=10.ckpt")  # a top-k checkpoint is not a resume point
    os.utime(tmp_path / "last.ckpt", (1, 1))
    torch.save({}, tmp_path / PREEMPTED_CKPT)
    assert newest_checkpoint(tmp_path).name == PREEMPTED_CKPT
    os.utime(tmp_path / PREEMPTED_CKPT, (0, 0))
    assert newest_checkpoint(tmp_path).name == "last.ckpt"
    for var in ("SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(var, raising=False)
    assert not should_resume("auto") and should_resume("always") and not should_resume("never")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_NAME", "genart")
    assert should_resume("auto")
    with pytest.raises(ValueError, match="--resume='sometimes'"):
        should_resume("sometimes")


def test_resume_pins_each_logger_to_its_saved_run() -> None:
    saved = [{"class": "WandbLogger", "version": "abc123"}, {"class": "CSVLogger", "version": "version_3"}]
    loggers = [
        Namespace(class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace(save_dir="runs", version=None)),
        Namespace(class_path="lightning.pytorch.loggers.WandbLogger", init_args=Namespace(project="p", id=None, version=None)),
    ]
    pinned = pin_loggers(loggers, saved, Namespace(trainer=Namespace(default_root_dir="runs")), 20)
    assert pinned[0].init_args.version == "version_3" and pinned[1].init_args.id == "abc123"
    assert pinned[0].class_path.endswith("ContinuedCSVLogger") and pinned[0].init_args.resumed_step == 20
    user_set = [Namespace(class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace(version="mine"))]
    assert pin_loggers(user_set, saved, Namespace(trainer=Namespace(default_root_dir="runs")), 20)[0].init_args.version == "mine"
    default = pin_loggers(None, [{"class": "TensorBoardLogger", "version": "version_0"}],
                          Namespace(trainer=Namespace(default_root_dir="runs/x")), 20)
    assert default.class_path.endswith("TensorBoardLogger") and default.init_args.version == "version_0"
    assert default.init_args.save_dir == "runs/x" and default.init_args.purge_step == 21  # later events: redone


def test_continued_csv_logger_keeps_rows_up_to_the_resumed_step_and_appends(tmp_path: Path) -> None:
    first = CSVLogger(tmp_path, version="version_0")
    for step in (4, 9, 14):  # 14: logged after the checkpoint at 9, by work the resumed run does again
        first.log_metrics({"train/loss": float(step)}, step=step)
    first.save()
    resumed = ContinuedCSVLogger(tmp_path, version="version_0", resumed_step=9)
    resumed.log_metrics({"train/loss": 14.5, "val/fid": 3.0}, step=14)  # a new column too
    resumed.save()
    with (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(r["step"], r["train/loss"], r["val/fid"]) for r in rows] == [("4", "4.0", ""), ("9", "9.0", ""), ("14", "14.5", "3.0")]
