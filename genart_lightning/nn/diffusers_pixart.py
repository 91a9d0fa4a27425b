"""A diffusers `PixArtTransformer2DModel` (PixArt-alpha / sigma's DiT with cross-attention to T5 states) as backbone.

PixArt predicts the noise and, in its other half of output channels, a learned variance (`out_channels = 2 x
in_channels`) that our samplers do not use: the backbone returns the noise half, so fine-tuning trains it alone and the
variance channels keep what they were (diffusers' PixArt pipelines discard them too). The T5 padding mask goes to
cross-attention, as PixArt was trained.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from genart_lightning.nn.backbone import Backbone
from genart_lightning.nn.diffusers_parts import pretrained_or_configured


class DiffusersPixArt(nn.Module):
    """`PixArtTransformer2DModel` behind the backbone call `net(x, t, context=, context_mask=, pooled=, size_ids=)`.

    PixArt-alpha at 1024px (`use_additional_conditions`) `reads_sizes`: its resolution and aspect-ratio embeddings get
    the target (h, w) of the size ids."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer
        self.reads_sizes = bool(getattr(transformer, "use_additional_conditions", False))
        self.learned_variance = transformer.config.out_channels == 2 * transformer.config.in_channels

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None,
                pooled: Tensor | None = None, size_ids: Tensor | None = None) -> Tensor:
        added = {"resolution": None, "aspect_ratio": None}
        if self.reads_sizes:
            target = size_ids[:, 4:6]
            added = {"resolution": target, "aspect_ratio": (target[:, 0] / target[:, 1])[:, None]}
        out = self.transformer(x, encoder_hidden_states=context, encoder_attention_mask=context_mask, timestep=t,
                               added_cond_kwargs=added, return_dict=False)[0]
        return out.chunk(2, dim=1)[0] if self.learned_variance else out


class PixArtBackbone(Backbone):
    """PixArt-alpha / sigma's transformer from a `save_pretrained` directory (`subfolder: transformer` of a pipeline);
    `config` is recorded at first build, as for `DiffusersUNetBackbone`, so checkpoints rebuild it without the files."""

    name = "pixart"
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")

    def __init__(self, path: str | None = None, subfolder: str | None = None, config: dict | None = None) -> None:
        """
        Args:
            path: a `PixArtTransformer2DModel` save_pretrained directory (or hub id where the network allows);
                its weights are read when the model is first built.
            subfolder: the folder of path that holds it (e.g. transformer of a pipeline directory).
            config: the network's diffusers config, recorded at first build so a checkpoint rebuilds the
                network without path; not set by hand.
        """
        if path is None and config is None:
            raise ValueError("PixArtBackbone needs path (a PixArtTransformer2DModel save_pretrained directory)")
        self.path, self.subfolder, self.config = path, subfolder, config

    def build(self, in_channels: int, context_dim: int | None, pooled_dim: int | None,
              gradient_checkpointing: bool = False) -> DiffusersPixArt:
        model, self.config = pretrained_or_configured("PixArtTransformer2DModel", self.path, self.subfolder, self.config)
        self._check_widths(model.config, in_channels, context_dim)
        if gradient_checkpointing:
            model.enable_gradient_checkpointing()
        return DiffusersPixArt(model)

    def pretrained_source(self) -> str | None:
        return self.path if self.config is None else None

    def size_multiple(self) -> int:
        return int(self.config["patch_size"]) if self.config else 1

    def size_rule(self) -> str:
        return f"({self.path}) cuts {self.size_multiple()}x{self.size_multiple()} patches"

    def _check_widths(self, config: Any, in_channels: int, context_dim: int | None) -> None:
        source = f"the PixArt transformer at {self.path}"
        if config.in_channels != in_channels:
            raise ValueError(f"{source} takes {config.in_channels} channels, but the diffused space has {in_channels}; "
                             f"use a first stage with {config.in_channels} latent channels")
        if context_dim != config.caption_channels:
            raise ValueError(f"{source} reads text tokens of width {config.caption_channels}, but the text encoder gives "
                             f"{context_dim or 'none'}; use the T5 encoder it was trained with and conditioning: tokens")
