"""genart-lightning: train generative image models on clusters with PyTorch Lightning."""

__version__ = "0.1.0"


def describe(err: BaseException) -> str:
    """An exception as `Type: its first line` (just `Type` when it has no message), for one-line errors."""
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class UserError(Exception):
    """A user's mistake (a path, a name, a setting): `genart` prints its message as one line and exits with code 2."""
