"""genart-lightning: train generative image models on clusters with PyTorch Lightning."""

__version__ = "0.1.0"
