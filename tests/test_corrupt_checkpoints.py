"""A truncated checkpoint: one line naming the file for `genart sample`, and `--resume=auto` resumes from the newest
loadable one instead."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from genart_lightning.models.loading import load_model
from genart_lightning.run.resume import newest_checkpoint

GOOD = Path(__file__).parent / "fixtures" / "legacy" / "DCGAN.ckpt"


def test_a_truncated_checkpoint_is_named_in_one_line(tmp_path):
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(GOOD.read_bytes()[: GOOD.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"checkpoint {bad} is unreadable \\(truncated or corrupt") as err:
        load_model(bad)
    assert "\n" not in str(err.value)


def test_resume_skips_a_truncated_newest_checkpoint(tmp_path, capsys):
    good = tmp_path / "last.ckpt"
    shutil.copy(GOOD, good)
    bad = tmp_path / "preempted.ckpt"
    bad.write_bytes(GOOD.read_bytes()[:1000])
    os.utime(good, (1_000, 1_000))  # the truncated one is newer
    assert newest_checkpoint(tmp_path) == good
    assert f"skipping unreadable checkpoint {bad}" in capsys.readouterr().err
    bad.unlink()
    assert newest_checkpoint(tmp_path) == good
    good.write_bytes(b"")
    assert newest_checkpoint(tmp_path) is None  # nothing loadable: a fresh start, said on stderr
