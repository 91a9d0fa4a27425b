"""Training runs for the quality tables: one `genart fit` per config, skipped when its checkpoint exists, so a
cut-off table continues where it stopped (wall minutes are recorded beside the checkpoint); each table owns a marked
section of benchmarks/QUALITY.md."""

from __future__ import annotations

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
    timing = root / "fit_minutes.txt"
    if not ckpt.is_file():
        start = time.perf_counter()
        genart("fit", "--config", f"experiments/{config}.yaml", f"--trainer.max_steps={steps}",
               f"--trainer.default_root_dir={root}", "--trainer.logger=false", "--trainer.callbacks=[]",
               f"--checkpoint.dirpath={root / 'checkpoints'}", f"--checkpoint.every_n_train_steps={steps}",
               f"--data.init_args.train_urls={train_urls}", f"--data.init_args.val_urls={val_urls}",
               "--sample_grid.every_n_steps=0", *extra)
        timing.write_text(f"{(time.perf_counter() - start) / 60:.1f}")
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
