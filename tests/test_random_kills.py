"""SIGKILL at random moments while checkpoints are written: a loadable checkpoint always remains, each restart
continues from it, and a killed `genart fit` resumes to its end."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cluster_helpers import dcgan_config, load_checkpoint, write_config
from helpers import REPO

from genart_lightning.run.resume import newest_checkpoint

KILLS = 20

# Imports torch once, then per line on stdin forks a child that resumes from the newest loadable checkpoint (as
# `--resume` does) and writes a 4 MB checkpoint per step through the training path's AtomicCheckpointIO, alternating
# last.ckpt and preempted.ckpt, until the test kills it. Forking spares each restart the imports.
WRITER = """
import os, sys, torch
from genart_lightning.run.checkpoint_io import AtomicCheckpointIO
from genart_lightning.run.resume import newest_checkpoint
directory = sys.argv[1]
io = AtomicCheckpointIO()
child = None
for _ in sys.stdin:
    if child is not None:
        os.waitpid(child, 0)
    child = os.fork()
    if child == 0:
        from pathlib import Path
        newest = newest_checkpoint(Path(directory))
        step = torch.load(newest, weights_only=True)["global_step"] if newest else 0
        while True:
            step += 1
            name = "preempted.ckpt" if step % 3 == 0 else "last.ckpt"
            io.save_checkpoint({"global_step": step, "state_dict": {"w": torch.full((1 << 20,), float(step))}},
                               os.path.join(directory, name))
    print(child, flush=True)
"""


def _newest_step(directory: Path) -> int:
    newest = newest_checkpoint(directory)
    return load_checkpoint(newest)["global_step"] if newest else 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_twenty_random_kills_during_writes_always_leave_a_loadable_checkpoint_to_continue_from(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(directory)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    rng, steps, torn = random.Random(0), [0], 0
    try:
        for _ in range(KILLS):
            writer.stdin.write("go\n")
            writer.stdin.flush()
            child = int(writer.stdout.readline())
            deadline = time.monotonic() + 60  # by progress, not by the clock: this restart has saved a step of its own
            while _newest_step(directory) <= steps[-1] and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.05))  # then a random point of its next writes
            subprocess.run(["kill", "-KILL", str(child)], check=True)
            time.sleep(0.05)  # the kill lands before the directory is read
            torn += bool(list(directory.glob("*.tmp-*")))  # killed mid-file: its temporary is still there
            newest = newest_checkpoint(directory)
            assert newest is not None, "no loadable checkpoint left after a kill"
            checkpoint = load_checkpoint(newest)
            step = checkpoint["global_step"]
            assert torch.equal(checkpoint["state_dict"]["w"], torch.full((1 << 20,), float(step)))  # complete
            assert step >= steps[-1], f"the newest loadable checkpoint went back from step {steps[-1]} to {step}"
            steps.append(step)
    finally:
        writer.kill()
        writer.wait()
    assert steps[-1] > KILLS  # every restart continued from where the previous one was killed and wrote more
    assert torn >= KILLS // 4, f"only {torn} of {KILLS} kills hit a write in progress"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_killed_fit_resumes_to_its_end(shapes_shards_16px: dict, tmp_path: Path) -> None:
    config = dcgan_config(shapes_shards_16px, tmp_path / "run", 60)
    config["checkpoint"]["every_n_train_steps"] = 2  # a write every iteration: the kill lands near or inside one
    config["trainer"]["logger"] = False
    path = write_config(config, tmp_path / "dcgan.yaml")
    command = [sys.executable, "-m", "genart_lightning.cli", "fit", "--config", str(path)]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    fit = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not last.exists() and fit.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(random.Random(1).uniform(0.0, 0.5))
    finally:
        fit.send_signal(signal.SIGKILL)
        fit.wait()
    killed_at = load_checkpoint(newest_checkpoint(last.parent))["global_step"]
    assert 0 < killed_at < 60
    resumed = subprocess.run([*command, "--resume=always"], cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed at global step {killed_at}" in resumed.stderr
    assert load_checkpoint(last)["global_step"] == 60
