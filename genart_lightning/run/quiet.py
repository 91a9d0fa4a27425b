"""What every Lightning run prints that nobody acts on, filtered out once per process."""

from __future__ import annotations

import logging
import warnings

from lightning.fabric.utilities.warnings import PossibleUserWarning

NOISE_WARNINGS = (
    # torch >= 2.9 deprecates the LeafSpec check inside Lightning's own pytree helper, not in anything a user wrote
    (r".*isinstance\(treespec, LeafSpec\)", FutureWarning),
    # frozen text encoders and first stages are in eval mode on purpose
    (r"Found \d+ module\(s\) in eval mode at the start of training", PossibleUserWarning),
)


class DropTips(logging.Filter):
    """Lightning's advertisements for its cloud products (the litlogger / litmodels tips)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_lightning() -> None:
    for message, category in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropTips) for f in logger.filters):
            logger.addFilter(DropTips())
