"""`make bench-gpu` without a GPU: it must run cleanly and quickly, and say "not measured" for every row."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO

from benchmarks.bench_gpu import END, ROWS, START, kept_section


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script measures for minutes")
def test_bench_gpu_without_cuda_writes_not_measured_rows_quickly_and_make_bench_keeps_them(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nthe CPU rows\n")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_gpu", "--out", str(results)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\nthe CPU rows") and text.count(START) == text.count(END) == 1
    assert all(f"| {row} | not measured (no CUDA device on this machine) |" in text for row in ROWS)
    subprocess.run([sys.executable, "-m", "benchmarks.bench_gpu", "--out", str(results)], cwd=REPO, env=env, check=True,
                   capture_output=True, timeout=120)
    assert results.read_text().count(START) == 1  # a second run replaces its section
    assert kept_section(results).startswith(START) and "FSDP2 on one device" in kept_section(results)
