"""`genart` subcommands beside LightningCLI's fit/validate/test/predict; one module each.

Each module exposes `register(subparsers) -> None`, adding its parser with `func=run`.
"""

from pathlib import Path


def require_checkpoint(path: str) -> None:
    """One line (before torch loads) when the checkpoint a command reads is not there."""
    if not Path(path).is_file():
        raise SystemExit(
            f"error: checkpoint not found: {path} (from --ckpt); pass a .ckpt written by `genart fit` or a `genart export` file"
        )
