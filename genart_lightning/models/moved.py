"""Dotted names of classes that moved, so configs and checkpoints written before a move get the new name.

Kept free of heavy imports: `genart fit` checks a config against it before torch and Lightning load.
"""

from __future__ import annotations

MOVED_CLASSES: dict[str, str] = {
    "genart_lightning.callbacks.evaluation.PeriodicEvaluation": "genart_lightning.callbacks.periodic_evaluation.PeriodicEvaluation",
    "genart_lightning.callbacks.checkpoint.RunCheckpoint": "genart_lightning.callbacks.run_checkpoint.RunCheckpoint",
    "genart_lightning.checkpoint_io.AtomicCheckpointIO": "genart_lightning.run.checkpoint_io.AtomicCheckpointIO",
    "genart_lightning.continued_csv_logger.ContinuedCSVLogger": "genart_lightning.run.csv_logger.ContinuedCSVLogger",
    "genart_lightning.text.FrozenTextEncoder": "genart_lightning.nn.text_encoder.FrozenTextEncoder",
}
"""Old dotted class name -> the current one (for `class_path` in configs and family names in checkpoints)."""


def moved_class_hint(dotted: str, where: str) -> str | None:
    """One line naming the new class path when `dotted` is an old one, else None."""
    new = MOVED_CLASSES.get(dotted)
    if new is None:
        return None
    return f"{dotted} (in {where}) has moved: write class_path: {new}"


def current_name(dotted: str) -> str:
    """The current dotted name of a class, following moves."""
    return MOVED_CLASSES.get(dotted, dotted)
