"""Checkpoint writes that a kill, preemption or full disk cannot tear."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH

from genart_lightning import UserError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write `<name>.tmp-<pid>` beside the target, fsync it, then `os.replace` it over the target.

    Lightning's own transaction stages local files in the system temp dir and moves them afterwards,
    which becomes a non-atomic copy when /tmp is another filesystem; a rename within one directory
    never leaves a half-written checkpoint under the real name. Remote (fsspec) paths keep Lightning's
    behaviour.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Save `checkpoint` to `path` so that readers see either the old file or the complete new one."""
        fs, local_path = url_to_fs(str(path))
        if not isinstance(fs, LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options; drop them from save_checkpoint")
        atomic_torch_save(checkpoint, Path(local_path))


class DiskFullError(UserError, OSError):
    """A checkpoint write ran out of space (or quota); the previous checkpoint under that name is intact."""


def _is_disk_full(err: BaseException) -> bool:
    """ENOSPC / EDQUOT, raised as is by Python's writes or wrapped in a RuntimeError by torch's zip writer."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(err, RuntimeError) and ("No space left" in str(err) or "quota exceeded" in str(err).lower())


def atomic_torch_save(obj: Any, path: Path) -> None:
    """`torch.save` through a temporary file in the same directory, fsynced, then renamed over `path`.

    A full disk is one line naming the path (DiskFullError); the temporary is removed and the previous file stays.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if _is_disk_full(err):
            raise DiskFullError(f"disk full: checkpoint {path} was not written (the previous one there is intact); "
                                f"free space on the filesystem of {path.parent} or point the run elsewhere") from None
        raise
    _fsync_dir(path.parent)
    # Temporaries of writers killed before their rename (SIGKILL skips the cleanup above).
    for stale in path.parent.glob(f"{path.name}.tmp-*"):
        stale.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself: without it a power loss can forget the new directory entry."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
