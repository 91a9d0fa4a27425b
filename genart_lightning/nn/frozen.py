"""Frozen pretrained parts that are rebuilt from where they came from instead of being stored in every checkpoint.

A frozen OpenCLIP tower or a diffusers VAE costs nothing per checkpoint this way; the checkpoint keeps a
fingerprint of its weights instead, so a different file at the same path is refused rather than used silently.
"""

from __future__ import annotations

import hashlib
from functools import partial

import torch
from torch import nn


def keep_out_of_state_dict(module: nn.Module, names: set[str] | None = None) -> None:
    """Leave `module`'s tensors (or only those `names`, relative to it) out of every state dict it is part of, and
    do not report them missing on load."""
    module.register_state_dict_post_hook(partial(_drop_own_keys, names=names))
    module.register_load_state_dict_pre_hook(_note_load_prefix)
    module.register_load_state_dict_post_hook(partial(_ignore_own_missing_keys, names=names))


def weights_digest(module: nn.Module) -> str:
    """A short sha256 of `module`'s tensors by name (about a second per GB)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict(keep_vars=False).items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _is_own(key: str, prefix: str, names: set[str] | None) -> bool:
    return key.startswith(prefix) and (names is None or key[len(prefix):] in names)


def _drop_own_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, names: set[str] | None) -> None:
    for key in [k for k in state_dict if _is_own(k, prefix, names)]:
        del state_dict[key]


def _note_load_prefix(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    module._load_prefix = prefix  # where this module sits in the model being loaded, for the post hook


def _ignore_own_missing_keys(module: nn.Module, incompatible_keys, names: set[str] | None) -> None:
    prefix = module.__dict__.pop("_load_prefix", "")
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not _is_own(k, prefix, names)]
