"""A user's mistake, through the `genart` entry point: exit code 2, one line on stderr naming the thing and the fix,
no traceback, no run directory left behind; `--debug` shows the traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, PicklePayload, genart_in_process

from genart_lightning.cli import entry

CKPT = REPO / "tests" / "fixtures" / "legacy" / "PixelDiffusion.ckpt"


def genart(*args: str, cwd: Path) -> tuple[int, str]:
    """(exit code, stderr) of `genart ARGS`, run in-process (the console script's own test is below)."""
    code, _, err = genart_in_process(*args, cwd=cwd)
    return code, err


def fit_args(tmp_path: Path, *extra: str) -> list[str]:
    run = tmp_path / "run"
    return ["fit", "--config", str(REPO / "experiments" / "dcgan_shapes.yaml"), f"--trainer.default_root_dir={run}", *extra]


def one_line(result: tuple[int, str]) -> str:
    code, stderr = result
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr[-2000:]
    assert len(lines) == 1, stderr[-2000:]
    assert lines[0].startswith("error: ") and "Traceback" not in stderr
    return lines[0]


@pytest.mark.slow
def test_fit_mistakes_are_one_line_and_leave_no_run_dir(tmp_path, shapes_shards):
    line = one_line(genart(*fit_args(tmp_path, "--data.init_args.train_urls=nowhere/train-{000000..000003}.tar"), cwd=tmp_path))
    assert "shard not found: nowhere/train-000000.tar (from --data.train_urls)" in line and "brace pattern" in line
    line = one_line(genart(*fit_args(tmp_path, "--model.init_args.lrr=1"), cwd=tmp_path))
    assert "model" in line and "'lrr' is not accepted" in line and "genart fit --help" in line
    data = [f"--data.init_args.train_urls={shapes_shards['train_urls']}", f"--data.init_args.val_urls={shapes_shards['val_urls']}"]
    line = one_line(genart(*fit_args(tmp_path, *data, "--ckpt_path=missing.ckpt"), cwd=tmp_path))
    assert "checkpoint not found: missing.ckpt (from --ckpt_path)" in line
    assert not (tmp_path / "run").exists()


def test_sample_and_eval_mistakes_are_one_line(tmp_path, shapes_shards):
    line = one_line(genart("sample", "--ckpt", "runs/none/last.ckpt", cwd=tmp_path))
    assert "checkpoint not found: runs/none/last.ckpt (from --ckpt)" in line
    line = one_line(genart("eval", "--ckpt", "none.ckpt", "--data", shapes_shards["val_urls"], cwd=tmp_path))
    assert "checkpoint not found: none.ckpt" in line
    line = one_line(genart("sample", "--ckpt", str(CKPT), "--sampler", "eulr", cwd=tmp_path))
    assert "unknown sampler 'eulr'" in line and "ddim" in line
    line = one_line(genart("sample", "--ckpt", str(CKPT), "--sampler", "euler", "--eta", "0.5", cwd=tmp_path))
    assert "--eta 0.5 has no effect with the euler sampler" in line and "--sampler ddim" in line
    line = one_line(genart("sample", "--ckpt", str(CKPT), "--guidance-interval", "5,0.3", cwd=tmp_path))
    assert "--guidance-interval '5,0.3' is not LO,HI" in line and "e.g. 0.3,5" in line
    line = one_line(genart("shards", "info", str(tmp_path / "missing-{000000..000001}.tar"), cwd=tmp_path))
    assert "shard not found" in line
    assert not (tmp_path / "grid.png").exists()


def test_sizes_a_family_cannot_sample_are_one_line(tmp_path, shapes_shards):
    gan, latent = CKPT.with_name("DCGAN.ckpt"), CKPT.with_name("LatentDiffusion.ckpt")
    refusal = "DCGAN cannot change its sample size: it draws 16x16 images only (its trained size); drop --height/--width"
    assert refusal in one_line(genart("sample", "--ckpt", str(gan), "--height", "24", cwd=tmp_path))
    assert refusal in one_line(genart("eval", "--ckpt", str(gan), "--data", shapes_shards["val_urls"], "--width", "24",
                                      "--num-samples", "4", "--fid-features", "judge", cwd=tmp_path))
    line = one_line(genart("eval", "--ckpt", str(latent), "--data", shapes_shards["val_urls"], "--height", "17",
                           "--num-samples", "4", "--fid-features", "judge", cwd=tmp_path))
    assert ("cannot sample 17x16 (height x width) with the unet backbone of this LatentDiffusion: height and width must "
            "be multiples of 2 (the backbone's 1 x the first stage's downsampling 2); nearest sizes that work: 16x16, 18x16"
            in line)
    assert not list(tmp_path.iterdir())  # refused before anything was sampled or written


def test_the_console_script_exits_2_with_one_line_and_debug_shows_the_traceback(tmp_path):
    # The real `genart` process once: exit status 2 and one stderr line. --debug in-process: the traceback.
    result = subprocess.run([sys.executable, "-m", "genart_lightning.cli", "sample", "--ckpt", str(CKPT), "--sampler", "eulr"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "GENART_DEBUG": ""})
    assert "unknown sampler 'eulr'" in one_line((result.returncode, result.stderr))
    with pytest.raises(FileNotFoundError, match="shard not found: nowhere.tar"):
        entry(fit_args(tmp_path, "--data.init_args.train_urls=nowhere.tar") + ["--debug"])


@pytest.mark.slow
def test_size_family_and_checkpoint_mistakes_are_one_line_and_leave_no_run_dir(tmp_path, shapes_shards):
    data = [f"--data.init_args.train_urls={shapes_shards['train_urls']}", f"--data.init_args.val_urls={shapes_shards['val_urls']}"]
    line = one_line(genart(*fit_args(tmp_path, *data, "--model.init_args.image_size=16"), cwd=tmp_path))
    assert "--model.image_size=16 and --data.image_size=32 differ" in line
    # Resuming another family's checkpoint: Lightning would switch the model to the checkpoint's, silently.
    line = one_line(genart(*fit_args(tmp_path, *data, f"--ckpt_path={CKPT}"), cwd=tmp_path))
    assert "is a PixelDiffusion checkpoint, but the config trains DCGAN" in line and "init_from" in line
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "payload": PicklePayload(tmp_path / "ran")}, pickled)
    line = one_line(genart(*fit_args(tmp_path, *data, f"--ckpt_path={pickled}"), cwd=tmp_path))
    assert "holds objects other than tensors" in line and not (tmp_path / "ran").exists()
    # init_from: a checkpoint of another family matches almost nothing; a corrupt .safetensors is not read.
    ddpm = ["fit", "--config", str(REPO / "experiments" / "ddpm_shapes.yaml"), f"--trainer.default_root_dir={tmp_path / 'run'}",
            *data, "--trainer.max_steps=1", "--data.init_args.num_workers=0"]
    line = one_line(genart(*ddpm, f"--model.init_args.init_from={CKPT.with_name('DCGAN.ckpt')}", cwd=tmp_path))
    assert "is a DCGAN checkpoint, but this model is PixelDiffusion" in line and "init_partial: true" in line
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    line = one_line(genart(*ddpm, f"--model.init_args.init_from={corrupt}", cwd=tmp_path))
    assert f"{corrupt} is not a readable safetensors file" in line
    assert not (tmp_path / "run").exists()
