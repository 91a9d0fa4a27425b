"""Training runs for the quality tables: one `genart fit` per config, skipped when its checkpoint exists (and was
trained from the same config text and options, where recorded), so a cut-off table
continues where it stopped (wall minutes are recorded beside the checkpoint); each table owns a marked section of
benchmarks/QUALITY.md."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def genart(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "genart_lightning.cli", *args], cwd=REPO, check=True)


def fit(config: str, steps: int, root: Path, train_urls: str, val_urls: str, extra: tuple[str, ...] = ()) -> tuple[Path, float]:
    """Train experiments/`config`.yaml for `steps` into `root`; its last checkpoint and the minutes it took."""
    ckpt = root / "checkpoints" / "last.ckpt"
    timing, recipe_file = root / "fit_minutes.txt", root / "recipe.txt"
    args = ["fit", "--config", f"experiments/{config}.yaml", f"--trainer.max_steps={steps}",
            f"--trainer.default_root_dir={root}", "--trainer.logger=false", "--trainer.callbacks=[]",
            f"--checkpoint.dirpath={root / 'checkpoints'}", f"--checkpoint.every_n_train_steps={steps}",
            f"--data.init_args.train_urls={train_urls}", f"--data.init_args.val_urls={val_urls}",
            "--sample_grid.every_n_steps=0", *extra]
    # The config's text is part of the recipe: a kept run of an older config would pass for today's. Paths are not
    # (a work folder may be moved).
    recipe_text = "\n".join([(REPO / "experiments" / f"{config}.yaml").read_text(), str(steps), *extra])
    recipe = hashlib.sha256(recipe_text.encode()).hexdigest()
    if ckpt.is_file() and recipe_file.is_file() and recipe_file.read_text() != recipe:
        raise SystemExit(f"error: {root} holds a run of another recipe (experiments/{config}.yaml or its options "
                         "changed since); move it aside to train it again")
    if not ckpt.is_file():
        start = time.perf_counter()
        genart(*args)
        timing.write_text(f"{(time.perf_counter() - start) / 60:.1f}")
        recipe_file.write_text(recipe)
    return ckpt, float(timing.read_text())


def write_section(out: Path, lines: list[str], name: str) -> None:
    """Replace the section `name` of `out` (appended when absent), keeping the rest of the file."""
    text = out.read_text() if out.is_file() else ""
    begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
    section = "\n".join([begin, *lines, end])
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section + "\n"
    out.write_text(text)
