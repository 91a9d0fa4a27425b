"""LoRA adapters (Hu et al. 2021) on any backbone, through peft: low-rank updates beside chosen Linear / Conv2d
layers while every other weight stays frozen, and their merge back into plain layers for export.

peft does the injection and the merge; this module only turns the YAML settings into a `LoraConfig`, turns peft's
errors into one line, and unwraps merged layers (peft's own unload lives on its model wrappers, which would rename
every key of the network). peft is the optional extra `[diffusers]`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from genart_lightning import UserError

EXTRA_HINT = "pip install 'genart-lightning[diffusers]'"


@dataclass(frozen=True)
class LoRASettings:
    """`lora: {rank, alpha, target_modules, dropout, weights, text_encoder}`; alpha defaults to the rank (update scale
    alpha / rank = 1), target_modules to the backbone's attention projections; `weights` starts the adapters from a
    LoRA file (diffusers / peft or kohya format, `nn/lora_files.py`) instead of peft's init (B = 0);
    `text_encoder: true` adapts a pipeline's text encoder(s) too (their attention projections, same rank and alpha)."""

    rank: int = 8
    alpha: float | None = None
    target_modules: tuple[str, ...] | None = None
    dropout: float = 0.0
    weights: str | None = None
    text_encoder: bool = False

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LoRASettings:
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(config) - set(names))
        if unknown:
            raise ValueError(f"lora has no setting {', '.join(map(repr, unknown))}; its settings are {', '.join(names)}")
        settings = cls(**{k: tuple(v) if k == "target_modules" and v is not None else v for k, v in config.items()})
        if settings.rank < 1:
            raise ValueError(f"lora.rank must be at least 1, got {settings.rank}")
        return settings


def require_peft() -> Any:
    """The peft module, or one line naming the extra to install."""
    try:
        import peft
    except ImportError:
        raise UserError(f"lora needs peft, which is not installed: {EXTRA_HINT}") from None
    return peft


def inject_lora(net: nn.Module, settings: LoRASettings, default_targets: tuple[str, ...], what: str) -> set[str]:
    """Add adapters to `net` in place and freeze everything else; returns the names of the frozen parameters."""
    peft = require_peft()
    targets = list(settings.target_modules or default_targets)
    if not targets:
        raise ValueError(f"the {what} backbone has no default LoRA targets; set lora.target_modules to the names of its "
                         "Linear / Conv2d layers")
    config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha or settings.rank, lora_dropout=settings.dropout,
                             target_modules=targets)
    try:
        peft.inject_adapter_in_model(config, net)
    except ValueError as err:
        layers = sorted({name.rpartition(".")[2] for name, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))})
        raise ValueError(f"lora.target_modules {targets} match no layer of the {what} backbone ({str(err).splitlines()[0]}); "
                         f"its Linear / Conv2d layers are named {', '.join(layers[:12])}") from None
    return {name for name, p in net.named_parameters() if not p.requires_grad}


def merge_lora(net: nn.Module) -> nn.Module:
    """Fold every adapter of `net` into its base layer and put the plain layer back, in place; returns `net`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted = [(name, m) for name, m in net.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in adapted:
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent_name) if parent_name else net, child, layer.get_base_layer())
    return net
