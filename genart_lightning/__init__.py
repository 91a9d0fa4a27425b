"""genart-lightning: train generative image models on clusters with PyTorch Lightning."""

__version__ = "0.1.0"


class UserError(Exception):
    """A user's mistake (a path, a name, a setting): `genart` prints its message as one line and exits with code 2."""
