"""Rebuild any family from its checkpoint without trusting pickled code."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from genart_lightning.models.base import FAMILY_KEY, GenerativeModel


def family_class(dotted: str) -> type[GenerativeModel]:
    """Resolve a family name; only classes under genart_lightning.models are accepted."""
    module_name, _, class_name = dotted.rpartition(".")
    if not module_name.startswith("genart_lightning.models."):
        raise ValueError(f"checkpoint names family {dotted!r}, which is not a genart_lightning.models class")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, GenerativeModel)):
        raise ValueError(f"checkpoint family {dotted!r} is not a GenerativeModel subclass")
    return cls


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> GenerativeModel:
    """Load a Lightning checkpoint of any family (weights_only: nothing in it is executed) in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}; pass a .ckpt written by `genart fit`")
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    if FAMILY_KEY not in checkpoint:
        raise ValueError(f"{path} has no '{FAMILY_KEY}' entry: it was not written by a genart family")
    cls = family_class(checkpoint[FAMILY_KEY])
    model = cls(**checkpoint.get("hyper_parameters", {}))
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()
