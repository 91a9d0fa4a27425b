"""CLI answer time for a user's mistake: `genart sample --ckpt MISSING` vs importing torch and Lightning, which the
command paid before it reported the missing file (13 s on this machine before the check moved ahead of the imports).

Wall clock of whole processes: what the user waits for.
"""

from __future__ import annotations

import subprocess
import sys
import time

from benchmarks.common import Comparison, alternate


def _wall(cmd: list[str], expect: int) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != expect:
        raise RuntimeError(f"{cmd} exited {result.returncode}, expected {expect}: {result.stderr[-500:]}")
    return elapsed


def main(quick: bool = False) -> list[Comparison]:
    """Alternate the mistake and the import baseline, each as a fresh process."""
    mistake = [sys.executable, "-m", "genart_lightning.cli", "sample", "--ckpt", "runs/missing/last.ckpt"]
    imports = [sys.executable, "-c", "import torch, lightning"]
    times = alternate({"ours": lambda: _wall(mistake, 2), "baseline": lambda: _wall(imports, 0)}, rounds=3 if quick else 5)
    result = Comparison(
        section="CLI: one-line error for a missing checkpoint",
        metric="s (wall) until the process exits",
        ours_label="genart sample --ckpt MISSING (exit 2, one line)",
        baseline_label="python -c 'import torch, lightning'",
        ours=times["ours"], baseline=times["baseline"], higher_is_better=False,
        goal=0.5, goal_text="answers in under half the time of importing torch + Lightning (issue: under 2 s)",
        setup="fresh interpreter per call, wall clock",
    )
    result.extra["ours, median seconds"] = f"{result.ours_median:.2f} s (goal < 2 s)"
    return [result]
