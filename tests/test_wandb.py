"""W&B with one config switch: an offline run, driven the way a W&B sweep agent drives `genart fit`, read back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO, genart, tiny_config
from PIL import Image

from genart_lightning.sweeps.spec import load_yaml

EXPERIMENT = "experiments/vae_shapes.yaml"
"""The experiment the W&B sweep example trains; the test swaps in a tiny config of the same family."""


def agent_command(sweep: dict, values: dict) -> list[str]:
    """The command a W&B agent runs for one suggestion, with wandb's own `${args}` expansion (`--key=value`)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    args = create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})["args"]
    command = []
    for part in sweep["command"]:
        if part == "${args}":
            command += args
        elif part != "${env}":  # /usr/bin/env: not needed to run it here
            command.append(part)
    return command


def wandb_records(run_file: Path) -> list[dict]:
    """Every record of a run's .wandb log, decoded by wandb itself (`wandb leet inspect --json`)."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_file)],
                         capture_output=True, text=True, check=True, timeout=120)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


@pytest.mark.slow
def test_offline_wandb_run_holds_losses_config_provenance_grids_and_checkpoint(tmp_path: Path, shapes_shards_16px: dict) -> None:
    sweep = load_yaml(REPO / "experiments" / "sweeps" / "wandb_sweep.yaml")
    values = {"model.init_args.lr": 0.002, "model.init_args.beta": 1e-3, "seed_everything": 3}
    assert set(values) == set(sweep["parameters"])
    command = agent_command(sweep, values)
    assert command[:2] == ["genart", "fit"] and "--model.init_args.lr=0.002" in command and EXPERIMENT in command
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny_config(shapes_shards_16px, max_steps=8)))
    args = [str(tmp_path / "tiny.yaml") if a == EXPERIMENT else str(REPO / a) if a.endswith(".yaml") else a
            for a in command[1:]]
    wandb_home = tmp_path / "wandb_home"  # keep wandb's caches and settings out of the user's home
    env = {"WANDB_MODE": "offline", "WANDB_DATA_DIR": str(wandb_home), "WANDB_CACHE_DIR": str(wandb_home),
           "WANDB_CONFIG_DIR": str(wandb_home)}
    genart(*args, f"--trainer.logger.init_args.save_dir={tmp_path / 'wb'}", "--trainer.logger.init_args.log_model=true",
           "--sample_grid.every_n_steps=4", f"--trainer.default_root_dir={tmp_path}", "--trainer.limit_val_batches=1",
           "--trainer.val_check_interval=4", "--model.init_args.num_logged_reconstructions=2", cwd=tmp_path, env=env)

    (run_file,) = (tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    losses = [h["train/loss"] for h in history if "train/loss" in h]
    assert len(losses) == 8 and all(0 < v < 10 for v in losses)
    logged = set().union(*history)
    assert {"train/rec", "train/kl", "grad_norm", "lr-Adam", "throughput/images_per_sec",
            "throughput/images_per_sec_per_device"} <= logged
    assert [h["lr-Adam"] for h in history if "lr-Adam" in h][0] == pytest.approx(0.002)
    psnr = [h[sweep["metric"]["name"]] for h in history if sweep["metric"]["name"] in h]  # what the W&B sweep optimizes
    assert len(psnr) == 2 and all(0 < v < 60 for v in psnr)  # validation at steps 4 and 8 (dB)

    config = {}
    for r in records:
        if r["type"] == "config":
            config.update(r["config"]["update"])
    assert config["config"]["model"]["init_args"]["lr"] == 0.002  # the sweep's value, in the resolved config
    assert config["config"]["model"]["init_args"]["beta"] == 1e-3 and config["config"]["seed_everything"] == 3
    assert len(config["provenance"]["git"]["commit"]) == 40 and config["provenance"]["packages"]["torch"]

    grids = [h for h in history if "samples.filenames" in h]
    assert [g["trainer/global_step"] for g in grids] == [4, 8]
    image = Image.open(run_file.parent / "files" / grids[-1]["samples.filenames"][0])
    assert image.size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)  # 2x2 grid of 16px samples, 2px padding

    (artifact,) = [r["artifact"] for r in records if r["type"] == "artifact"]
    assert artifact["type"] == "model" and json.loads(artifact["metadata"])["original_filename"] == "last.ckpt"
