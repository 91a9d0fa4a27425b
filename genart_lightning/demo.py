"""`make demo`: the whole path from data to numbers on CPU, as the `genart` commands a user would type."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

DATA = Path("data/shapes")
RUN = Path("runs/demo_cgan")
OUT = Path("runs/demo")
PROMPTS = [
    "a large red circle in the centre, black background",
    "a large green square in the centre, white background",
    "a large blue triangle in the centre, yellow background",
    "a large yellow circle in the centre, purple background",
]
TRAIN_STEPS = int(os.environ.get("DEMO_STEPS", "3000"))
"""Optimizer steps of both nets (a GAN iteration counts 2): 1500 generator steps, under 3 minutes on 2 idle CPU cores."""


def genart(*args: str) -> None:
    """Print and run one `genart` command; stop the demo on the first failure."""
    print(f"\n$ genart {shlex.join(args)}", flush=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "genart_lightning.cli", *args], check=True)
    print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)


def main() -> None:
    """Build shapes shards, train the text-conditional GAN, draw prompted grids, evaluate, say where it all is."""
    if not (DATA / "val-000000.tar").exists():
        genart("shards", "shapes", "--out", str(DATA), "--num-samples", "6000", "--image-size", "32", "--seed", "0")
    shutil.rmtree(RUN, ignore_errors=True)  # a rerun starts fresh (else Lightning writes last-v1.ckpt beside the old one)
    genart(
        "fit", "--config", "experiments/cgan_shapes.yaml",
        f"--trainer.max_steps={TRAIN_STEPS}", f"--trainer.default_root_dir={RUN}",
        f"--checkpoint.every_n_train_steps={TRAIN_STEPS // 2}",
    )
    ckpt = RUN / "checkpoints" / "last.ckpt"
    grid = OUT / "cgan_prompts.png"
    genart("sample", "--ckpt", str(ckpt), *[a for p in PROMPTS for a in ("--prompt", p)], "--num", "16",
           "--seed", "0", "--out", str(grid))
    metrics = OUT / "cgan_metrics.json"
    genart("eval", "--ckpt", str(ckpt), "--data", str(DATA / "val-000000.tar"), "--num-samples", "600",
           "--fid-features", "judge", "--out", str(metrics))
    summary = json.loads(metrics.read_text())
    print("\nDemo finished.")
    print(f"  data:          {DATA}/ (train-*.tar, val-*.tar; inspect with `genart shards info '{DATA}/val-000000.tar'`)")
    print(f"  checkpoint:    {ckpt}")
    print(f"  prompt grid:   {grid}  (one column per prompt, its caption underneath)")
    print(f"  training grids: {RUN}/lightning_logs/version_*/samples/   dashboard: tensorboard --logdir {RUN}")
    print(f"  metrics:       {metrics}")
    for key, value in summary.items():
        if isinstance(value, float):
            print(f"    {key}: {value:.4g}")
        elif isinstance(value, dict) and value and all(isinstance(v, float) for v in value.values()):
            print(f"    {key}: " + ", ".join(f"{k} {v:.3g}" for k, v in value.items()))
    print(reading(summary["attribute_accuracy"]))


def reading(accuracy: float) -> str:
    """What the attribute accuracy says, against what guessing would score."""
    from genart_lightning.shapes.judge import ATTRIBUTES

    chance = sum(1 / len(classes) for classes in ATTRIBUTES.values()) / len(ATTRIBUTES)
    return (f"  reading: a judge trained on the dataset's own pictures reads the prompted {', '.join(ATTRIBUTES)} back from "
            f"{accuracy:.0%} of the samples' attributes (guessing: {chance:.0%}; 100%: every sample shows its prompt)")


if __name__ == "__main__":
    main()
