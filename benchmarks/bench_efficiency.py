"""What the efficiency panel costs: `genart fit` steps/s with the panel at its default cadence vs the same run without.

Both sides are real `genart fit` runs of experiments/ddpm_shapes.yaml in fresh processes (`fit_steps_per_second`),
timed from the first step, so the step the panel counts FLOPs on (global step 1, under torch's FlopCounterMode) is
inside the timing; the panel's matmul peak runs at the start of training, before it. Fixed at 1 torch thread, so the
thread tuner's trials do not add their own noise to a 2% goal.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks.common import Comparison, alternate, fit_steps_per_second
from datamodules.synthetic import write_shapes_shards

CONFIG = "experiments/ddpm_shapes.yaml"


def main(quick: bool = False) -> list[Comparison]:
    steps, rounds = (40, 1) if quick else (100, 3)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_shapes_shards(Path(tmp) / "shapes", 700, image_size=32, samples_per_shard=100)

        def rate(name: str, every: int) -> float:
            return fit_steps_per_second(CONFIG, data, Path(tmp) / name, steps, 0,
                                        ["--threads", "1", f"--efficiency.every_n_steps={every}"])

        # no warm-up round: every run is a fresh process, and the median of 3 drops a cold first run
        runs = alternate({"panel": lambda: rate("panel", 50), "off": lambda: rate("off", 0)}, rounds, warmup=0)
    return [Comparison(
        "efficiency panel: genart fit with the panel every 50 steps vs without", "steps/s",
        "--efficiency.every_n_steps 50 (the default)", "--efficiency.every_n_steps 0", runs["panel"], runs["off"],
        higher_is_better=True, goal=0.98, goal_text="panel on >= 0.98x off (at most 2% slower)",
        setup=f"{CONFIG} (32px, batch 32, 2 loader workers, 1 torch thread), {steps} steps timed from the first, "
              "wall clock, fresh process per run",
    )]


if __name__ == "__main__":  # python -m benchmarks.bench_efficiency [--quick]
    import sys

    for result in main(quick="--quick" in sys.argv):
        print(result.line())
