"""Atomic checkpoint writes: a writer killed (or failing) mid-file leaves the previous checkpoint loadable."""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from genart_lightning import UserError
from genart_lightning.run import checkpoint_io
from genart_lightning.run.checkpoint_io import AtomicCheckpointIO

# Writes a second checkpoint over argv[1] through AtomicCheckpointIO, with torch.save slowed down so the
# test can kill it when half of the bytes are in the file: it prints "half" then waits forever.
KILLED_WRITER = """
import io, sys, threading, torch
import genart_lightning.run.checkpoint_io as checkpoint_io

real_save = torch.save

def save_half_then_hang(obj, f):
    buffer = io.BytesIO()
    real_save(obj, buffer)
    data = buffer.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    print("half", flush=True)
    threading.Event().wait()

checkpoint_io.torch.save = save_half_then_hang
checkpoint_io.AtomicCheckpointIO().save_checkpoint({"step": 2, "weights": torch.full((1 << 18,), 2.0)}, sys.argv[1])
"""


def checkpoint(step: int) -> dict:
    return {"step": step, "weights": torch.full((1 << 18,), float(step))}


def test_kill_during_write_leaves_the_previous_checkpoint_loadable(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(checkpoint(1), path)
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "half", "writer ended before reaching the middle of the file"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    torn = list(path.parent.glob("last.ckpt.tmp-*"))
    assert len(torn) == 1 and torn[0].stat().st_size > 0  # the kill really hit a half-written file ...
    with pytest.raises(RuntimeError, match="zip archive|central directory"):  # the archive is cut off
        torch.load(torn[0], weights_only=True)
    previous = torch.load(path, weights_only=True)  # ... and it was not the checkpoint under the real name
    assert previous["step"] == 1 and torch.equal(previous["weights"], checkpoint(1)["weights"])
    io.save_checkpoint(checkpoint(3), path)  # the next save succeeds and sweeps away the torn temporary
    assert torch.load(path, weights_only=True)["step"] == 3
    assert list(path.parent.iterdir()) == [path]


def test_failed_write_keeps_the_previous_checkpoint_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(checkpoint(1), path)
    with pytest.raises(TypeError, match="pickle"):  # torch.save refuses a lock, as a full disk would fail the write
        io.save_checkpoint({"step": 2, "weights": torch.zeros(4), "lock": threading.Lock()}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: No space left on device")])
def test_a_full_disk_keeps_the_previous_checkpoint_and_says_disk_full_with_the_path(tmp_path: Path, monkeypatch, failure) -> None:
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(checkpoint(1), path)

    def write_then_fail(obj, f):
        f.write(b"the first bytes of a checkpoint")
        raise failure

    monkeypatch.setattr(checkpoint_io.torch, "save", write_then_fail)
    with pytest.raises(UserError, match=f"^disk full: checkpoint {path} was not written \\(the previous one there is intact\\)"):
        AtomicCheckpointIO().save_checkpoint(checkpoint(2), path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1 and list(tmp_path.iterdir()) == [path]


def test_storage_options_are_refused_and_file_urls_write_atomically(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="storage_options"):
        AtomicCheckpointIO().save_checkpoint(checkpoint(1), tmp_path / "x.ckpt", storage_options={"a": 1})
    AtomicCheckpointIO().save_checkpoint(checkpoint(1), f"file://{tmp_path}/y.ckpt")  # an fsspec URL of a local file
    assert torch.load(tmp_path / "y.ckpt", weights_only=True)["step"] == 1
