"""What produced a checkpoint: resolved config, code version, packages, shards, written beside it."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback

from genart_lightning.run.cluster import checkpoint_dir, cluster_environment_name, slurm_job_id

PACKAGES = ("torch", "torchvision", "lightning", "torchmetrics", "webdataset", "open_clip_torch", "numpy", "genart-lightning")
TRACKING_FILE = "tracking.json"
"""Logger versions / run ids of the run, read back on resume so the same tracking run continues."""


def git_state(source_dir: Path) -> dict[str, Any]:
    """Commit of the code that runs, whether it has uncommitted changes, and the diff of those changes."""

    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(["git", "-C", str(source_dir), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return result.stdout if result.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None, "diff": "", "note": f"{source_dir} is not a git checkout"}
    diff = git("diff", "HEAD") or ""
    untracked = (git("ls-files", "--others", "--exclude-standard") or "").split()
    return {"commit": commit.strip(), "dirty": bool(diff or untracked), "diff": diff, "untracked": untracked}


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that decide a run's numbers."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def shard_list(datamodule: L.LightningDataModule | None) -> dict[str, list[str]]:
    """Every shard URL the datamodule reads, brace patterns expanded, per split."""
    from datamodules.shards import expand_urls

    hparams = getattr(datamodule, "hparams", {}) or {}
    return {key: expand_urls(hparams[key]) for key in ("train_urls", "val_urls") if hparams.get(key)}


def tracking_ids(trainer: L.Trainer) -> list[dict[str, str]]:
    """Class and version (W&B: run id) of each logger, in config order; integer versions as their dir names."""
    ids = []
    for lg in trainer.loggers:
        if lg.version is not None:
            ids.append({"class": type(lg).__name__, "version": lg.version if isinstance(lg.version, str) else f"version_{lg.version}"})
    return ids


def write_provenance(directory: Path, trainer: L.Trainer, config_yaml: str) -> None:
    """Write config.yaml, provenance.json, git.diff (when dirty), shards.txt and tracking.json into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    source_dir = Path(__file__).resolve().parents[2]  # the repository (or site-packages) holding the package
    git = git_state(source_dir)
    shards = shard_list(trainer.datamodule)
    record = {
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": sys.argv,
        "git": {k: v for k, v in git.items() if k != "diff"},
        "packages": package_versions(),
        "host": socket.gethostname(),
        "world_size": trainer.world_size,
        "num_nodes": trainer.num_nodes,
        "cluster_environment": cluster_environment_name(trainer),
        "slurm_job_id": slurm_job_id(),
        "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
        "num_shards": {split: len(urls) for split, urls in shards.items()},
    }
    (directory / "config.yaml").write_text(config_yaml)
    (directory / "provenance.json").write_text(json.dumps(record, indent=2) + "\n")
    if git["diff"]:
        (directory / "git.diff").write_text(git["diff"])
    (directory / "shards.txt").write_text("".join(f"{split}\t{u}\n" for split, urls in shards.items() for u in urls))
    (directory / TRACKING_FILE).write_text(json.dumps(tracking_ids(trainer), indent=2) + "\n")


class RunRecord(SaveConfigCallback):
    """LightningCLI's config saving, plus the run's provenance in the checkpoint directory (rank 0, at fit setup)."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        config_yaml = self.parser.dump(self.config, skip_none=False)
        write_provenance(checkpoint_dir(trainer), trainer, config_yaml)
