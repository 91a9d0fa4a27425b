"""A restarted run (requeued SLURM job) picks up its newest checkpoint and its tracking run by itself."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.fabric.plugins.environments import SLURMEnvironment

from genart_lightning import describe
from genart_lightning.models.loading import checkpoint_metadata
from genart_lightning.run.cluster import PREEMPTED_CKPT
from genart_lightning.run.csv_logger import ContinuedCSVLogger
from genart_lightning.run.provenance import TRACKING_FILE

RESUME_MODES = ("auto", "always", "never")
"""auto: resume inside a SLURM job (a requeue restarts the same script); always: also outside SLURM; never."""

# Logger class -> the init argument that names its run (so the resumed run writes to the same one).
RUN_ID_ARGUMENT = {"TensorBoardLogger": "version", "CSVLogger": "version", "WandbLogger": "id"}


def run_checkpoint_dir(fit_config: Namespace) -> Path:
    """`--checkpoint.dirpath`, or `<trainer.default_root_dir>/checkpoints` (the run's fixed place to resume from)."""
    if fit_config.checkpoint.dirpath:
        return Path(fit_config.checkpoint.dirpath)
    return Path(fit_config.trainer.default_root_dir or os.getcwd()) / "checkpoints"


def newest_checkpoint(directory: Path) -> Path | None:
    """The most recently written loadable one of `last*.ckpt` and `preempted.ckpt` (the run's latest training state;
    files, or directories of a sharded FSDP checkpoint); an unreadable (truncated, corrupt) newer one is skipped with
    a line saying so."""
    if not directory.is_dir():
        return None
    candidates = [p for p in directory.glob("*.ckpt") if p.name == PREEMPTED_CKPT or p.name.startswith("last")]
    for ckpt in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        problem = unreadable(ckpt)
        if problem is None:
            return ckpt
        print(f"[genart] skipping unreadable checkpoint {ckpt} ({problem}); trying the next newest", file=sys.stderr, flush=True)
    return None


def unreadable(ckpt: Path) -> str | None:
    """Why a checkpoint cannot be loaded (None: it can); memory-mapped, so the tensors are not read."""
    try:
        checkpoint_metadata(ckpt)
    except Exception as err:  # truncated zips, bad pickles and foreign files all fail differently
        return describe(err)
    return None


def should_resume(mode: str) -> bool:
    """Whether `--resume=mode` resumes in this process (auto: only inside a SLURM batch job, like Lightning's hpc)."""
    if mode not in RESUME_MODES:
        raise ValueError(f"--resume={mode!r}: choose one of {', '.join(RESUME_MODES)}")
    return mode == "always" or (mode == "auto" and SLURMEnvironment.detect())


def apply_resume(fit_config: Namespace, mode: str) -> Path | None:
    """Fix the checkpoint dir; when resuming, set ckpt_path and pin the loggers to the checkpoint's runs."""
    ckpt_dir = run_checkpoint_dir(fit_config)
    fit_config.checkpoint.dirpath = str(ckpt_dir)
    if fit_config.ckpt_path or not should_resume(mode):
        return None
    ckpt = newest_checkpoint(ckpt_dir)
    if ckpt is None:
        return None
    fit_config.ckpt_path = str(ckpt)
    tracking = ckpt_dir / TRACKING_FILE
    if tracking.is_file():
        step = logged_step(ckpt)
        fit_config.trainer.logger = pin_loggers(fit_config.trainer.logger, json.loads(tracking.read_text()), fit_config, step)
    print(
        f"[genart] resuming from {ckpt} (--resume={mode}); pass --resume=never or another "
        "--trainer.default_root_dir to start afresh",
        file=sys.stderr,
        flush=True,
    )
    return ckpt


def logged_step(ckpt: Path) -> int:
    """The step loggers had reached when the checkpoint was saved (memory-mapped: the weights are not read).

    Loggers count batches that stepped, not `global_step` (which counts every optimizer's steps).
    """
    loops = checkpoint_metadata(ckpt)["loops"]
    return int(loops["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"])


def pin_loggers(logger: Any, saved: list[dict[str, str]], fit_config: Namespace, resumed_step: int) -> Any:
    """Logger config with each logger's version / run id set to the one saved, unless the user set it.

    The logs continue where the checkpoint was saved: TensorBoard hides the events logged after `resumed_step`
    (work the checkpoint does not hold, done again now) and CSV keeps metrics.csv up to that step.
    """
    if logger is None or logger is True:
        # Lightning's default logger is a TensorBoardLogger in default_root_dir: make it explicit to pin it.
        if not any(s["class"] == "TensorBoardLogger" for s in saved):
            return logger
        root = fit_config.trainer.default_root_dir or os.getcwd()
        logger = Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger", init_args=Namespace(save_dir=root))
    entries = logger if isinstance(logger, list) else [logger]
    remaining = list(saved)
    for entry in entries:
        if not isinstance(entry, Namespace) or "class_path" not in entry:
            continue
        name = entry.class_path.rpartition(".")[2]
        match = next((s for s in remaining if s["class"] == name), None)
        key = RUN_ID_ARGUMENT.get(name)
        if match is None or key is None:
            continue
        remaining.remove(match)
        init_args = entry.get("init_args") or Namespace()
        if init_args.get("version") is None and init_args.get("id") is None:
            init_args[key] = match["version"]
        if name == "TensorBoardLogger" and init_args.get("purge_step") is None:
            init_args["purge_step"] = resumed_step + 1
        if name == "CSVLogger":
            entry.class_path = f"{ContinuedCSVLogger.__module__}.{ContinuedCSVLogger.__name__}"
            init_args["resumed_step"] = resumed_step
        entry.init_args = init_args
    return logger
