"""The last lines of a completed fit: where its results are and the commands that use them next."""

from __future__ import annotations

import shlex
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from genart_lightning.callbacks.preemption import stopped_by_preemption
from genart_lightning.callbacks.run_summary import RunSummary
from genart_lightning.callbacks.sample_grid import SampleGrid


def first_of(trainer: L.Trainer, kind: type) -> L.Callback | None:
    return next((c for c in trainer.callbacks if isinstance(c, kind)), None)


def shown(path: str | Path) -> Path:
    """`path` relative to the working directory when it lies below it (as the user typed the run folder)."""
    path = Path(path)
    return path.relative_to(Path.cwd()) if path.is_absolute() and path.is_relative_to(Path.cwd()) else path


def fit_report(trainer: L.Trainer, log_dir: str | None) -> list[str]:
    """Checkpoint, last sample grid, metrics.json, logger folder, then `genart sample` / `genart eval` lines for them."""
    checkpoint, grid, summary = first_of(trainer, ModelCheckpoint), first_of(trainer, SampleGrid), first_of(trainer, RunSummary)
    ckpt = shown(checkpoint.last_model_path) if checkpoint and checkpoint.last_model_path else None
    lines = [f"[genart] fit finished at step {trainer.global_step}"]
    for label, path in (("checkpoint", ckpt), ("sample grid", grid.last_path if grid else None),
                        ("metrics", summary.written if summary else None)):
        if path is not None:
            lines.append(f"  {label + ':':13}{shown(path)}")
    if log_dir:
        lines.append(f"  {'logs:':13}{shown(log_dir)}  (tensorboard --logdir {shlex.quote(str(shown(trainer.default_root_dir)))})")
    if ckpt is None:
        return lines
    prompt = grid.prompts[0] if grid and grid.prompts and trainer.lightning_module.conditional else None
    sample = ["genart", "sample", "--ckpt", str(ckpt), *(["--prompt", prompt] if prompt else []), "--num", "16",
              "--out", str(ckpt.parent.parent / "grid.png")]
    lines.append(f"  {'next:':13}{shlex.join(sample)}")
    hparams = getattr(trainer.datamodule, "hparams", {}) or {}
    data = hparams.get("val_urls") or hparams.get("train_urls")
    if data:
        evaluate = ["genart", "eval", "--ckpt", str(ckpt), "--data", str(data), "--out", str(ckpt.parent.parent / "eval.json")]
        lines.append(f"  {'':13}{shlex.join(evaluate)}")
    return lines


class FitReport(L.Callback):
    """Rank 0 prints `fit_report` when a fit completes (not when preemption stopped it: the requeued job goes on)."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask, not rank 0 alone
        if trainer.is_global_zero and not stopped_by_preemption(trainer):
            print("\n".join(fit_report(trainer, log_dir)), flush=True)
