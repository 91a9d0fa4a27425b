"""Rebuild any family from its checkpoint without trusting pickled code."""

from __future__ import annotations

import contextvars
import importlib
import json
from pathlib import Path

import torch

from genart_lightning import describe
from genart_lightning.models.base import FAMILY_KEY, GenerativeModel
from genart_lightning.models.moved import current_name


def _family_class(dotted: str) -> type[GenerativeModel]:
    """Resolve a family name (following moves); only classes under genart_lightning.models are accepted."""
    module_name, _, class_name = current_name(dotted).rpartition(".")
    if not module_name.startswith("genart_lightning.models."):
        raise ValueError(f"checkpoint names family {dotted!r}, which is not a genart_lightning.models class")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, GenerativeModel)):
        raise ValueError(f"checkpoint family {dotted!r} is not a GenerativeModel subclass")
    return cls


def build_family(dotted: str, hyper_parameters: dict) -> GenerativeModel:
    """A family instance from its name and saved hyperparameters, with random weights.

    Built in an empty context: inside LightningCLI's instantiation, `save_hyperparameters` of any module
    would otherwise record the outer model's arguments (a VAE built by LatentDiffusion got the LDM's).
    LightningCLI's own `_class_path` / `_instantiator` entries are not init arguments and are dropped; arguments saved
    under a deprecated name are renamed (`RENAMED_ARGUMENTS`).
    """
    cls = _family_class(dotted)
    arguments = cls.upgrade_hparams({k: v for k, v in hyper_parameters.items() if not k.startswith("_")})
    return contextvars.Context().run(cls, **arguments)


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> GenerativeModel:
    """Load any family from a `genart fit` .ckpt or a `genart export` .safetensors (nothing in either is executed)."""
    path = Path(path)
    if not (path.is_file() or is_sharded_checkpoint(path)):
        raise FileNotFoundError(f"checkpoint not found: {path}; pass a .ckpt written by `genart fit` or a `genart export` file")
    global_step = None
    if path.suffix == ".safetensors":
        family, hyper_parameters, state_dict = read_export(path, map_location)
    else:
        checkpoint = read_checkpoint(path, map_location)
        if FAMILY_KEY not in checkpoint:
            raise ValueError(f"{path} has no '{FAMILY_KEY}' entry: it was not written by a genart family")
        family, hyper_parameters, state_dict = (
            checkpoint[FAMILY_KEY], checkpoint.get("hyper_parameters", {}), checkpoint["state_dict"]
        )
        global_step = checkpoint.get("global_step")
    model = build_family(family, hyper_parameters)
    if path.suffix != ".safetensors":
        model.check_frozen_parts(checkpoint, f"checkpoint {path}")
    model.load_state_dict(state_dict)
    model.loaded_from = {"path": str(path.resolve()), "global_step": global_step if path.suffix != ".safetensors" else None,
                         "git_commit": run_commit(path)}
    return model.eval()


SHARDED_METADATA = "meta.pt"
"""What Lightning writes beside the per-rank shards of a sharded (FSDP `save_distributed_checkpoint`) checkpoint."""


def is_sharded_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / SHARDED_METADATA).is_file()


def checkpoint_metadata(path: Path) -> dict:
    """A checkpoint's contents without reading its weights (loops, hyperparameters): a .ckpt memory-mapped, or the
    metadata file of a sharded checkpoint directory."""
    return torch.load(path / SHARDED_METADATA if path.is_dir() else path, map_location="cpu", weights_only=True,
                      mmap=not path.is_dir())


def read_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """A .ckpt's contents (a sharded checkpoint directory's, gathered into full tensors in this one process), loaded
    without unpickling code; a truncated or corrupt file is one line."""
    try:
        if is_sharded_checkpoint(path):
            from lightning.fabric.utilities.load import _load_distributed_checkpoint

            return _load_distributed_checkpoint(path)
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated or corrupt files fail as OSError, RuntimeError, EOFError, pickle errors
        raise ValueError(f"checkpoint {path} is unreadable (truncated or corrupt: {describe(err)}); "
                         "use an earlier checkpoint of the run") from None


def run_commit(path: Path) -> str | None:
    """The git commit of the run that wrote a checkpoint, from the provenance.json `genart fit` puts beside it."""
    provenance = path.parent / "provenance.json"
    try:
        return json.loads(provenance.read_text())["git"]["commit"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def written_family(path: Path) -> str | None:
    """The class name of the family that wrote a `genart fit` checkpoint (file or sharded directory) or a `genart
    export` .safetensors, None when it records none; raises as the metadata readers do for an unreadable file."""
    metadata = export_metadata(path) if path.suffix == ".safetensors" else checkpoint_metadata(path)
    family = metadata.get(FAMILY_KEY) if isinstance(metadata, dict) else None
    return str(family).rpartition(".")[2] if family else None


def export_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file (family and hyperparameters of a `genart export`), without its tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as err:  # safetensors' own error type for a bad header, OSError for a short file
        raise ValueError(f"{path} is not a readable safetensors file ({describe(err)}); write it again with `genart export`") from None


def read_export(path: Path, map_location: str | torch.device = "cpu") -> tuple[str, dict, dict[str, torch.Tensor]]:
    """Family name, hyperparameters and weights of a `genart export` safetensors file."""
    from safetensors.torch import load_file

    metadata = export_metadata(path)
    if FAMILY_KEY not in metadata or "hyper_parameters" not in metadata:
        raise ValueError(f"{path} lacks genart metadata ({FAMILY_KEY}, hyper_parameters); write it with `genart export`")
    device = str(map_location) if isinstance(map_location, torch.device) else map_location
    return metadata[FAMILY_KEY], json.loads(metadata["hyper_parameters"]), load_file(str(path), device=device)
