"""A diffusers pipeline directory (`model_index.json`) as a source of parts: which backbone, first stage, text encoder
and scheduler it holds, each checked before anything is loaded, so a directory of an unsupported kind is one line.

The parts themselves load with diffusers' and transformers' own `from_pretrained` from the directory's subfolders
(`nn/diffusers_parts.py`, `nn/transformers_text.py`); a hub id is first downloaded to the hub cache, where the
network allows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genart_lightning import UserError
from genart_lightning.nn.backbone import Backbone
from genart_lightning.nn.diffusers_parts import (
    DiffusersAutoencoder,
    DiffusersUNetBackbone,
    PretrainedWeightsError,
    looks_like_hub_id,
    require_diffusers,
)
from genart_lightning.nn.diffusers_pixart import PixArtBackbone
from genart_lightning.nn.lora import LoRASettings
from genart_lightning.nn.transformers_text import (
    TextEncoderPair,
    TransformersTextEncoder,
    pipeline_text_encoder,
)

READ_PIPELINES = {"StableDiffusionPipeline": "unet", "StableDiffusionXLPipeline": "unet",
                  "PixArtAlphaPipeline": "transformer", "PixArtSigmaPipeline": "transformer"}
"""Pipeline classes read as a whole, and the subfolder of their backbone."""
TEXT_MAX_LENGTH = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}
"""Caption tokens the T5 pipelines read (their `max_sequence_length`; T5's tokenizer sets no length of its own)."""
TEXT_PARTS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
"""(encoder, tokenizer) subfolders a pipeline may hold, in the order their token states are concatenated."""
PENULTIMATE_PIPELINES = ("StableDiffusionXLPipeline",)
"""Pipelines that read their text encoders' last-but-one hidden states (SDXL's `hidden_states[-2]`)."""


@dataclass(frozen=True)
class PipelineIndex:
    """What a pipeline directory holds: its class, each component's (library, class), its own options
    (`force_zeros_for_empty_prompt`, ...), the scheduler's config."""

    path: str
    class_name: str
    components: dict[str, tuple[str | None, str | None]]
    options: dict[str, Any]
    scheduler: dict[str, Any]

    @property
    def backbone_subfolder(self) -> str:
        return READ_PIPELINES[self.class_name]

    def has(self, component: str) -> bool:
        return self.components.get(component, (None, None))[1] is not None

    @property
    def text_parts(self) -> list[tuple[str, str]]:
        """The (encoder, tokenizer) subfolders this pipeline holds."""
        return [(encoder, tokenizer) for encoder, tokenizer in TEXT_PARTS if self.has(encoder)]

    @property
    def text_layer(self) -> str:
        """The hidden state its backbone was trained on: SDXL's penultimate, else the final one."""
        return "penultimate" if self.class_name in PENULTIMATE_PIPELINES else "final"

    @property
    def zeros_for_empty_prompt(self) -> bool:
        """SDXL's `force_zeros_for_empty_prompt`: the empty caption's text states are zeros, not its encoding."""
        return bool(self.options.get("force_zeros_for_empty_prompt", False))

    def text_encoder(self, trainable: bool = False, layer: str | None = None,
                     lora: LoRASettings | None = None) -> TransformersTextEncoder | TextEncoderPair:
        """Its text encoder (SDXL: both, as a pair), read at `layer` (default: the one its backbone was trained on),
        with LoRA adapters where `lora` is given."""
        return pipeline_text_encoder(self.path, self.text_parts, trainable, layer or self.text_layer,
                                     self.zeros_for_empty_prompt, TEXT_MAX_LENGTH.get(self.class_name), lora)

    def backbone(self) -> Backbone:
        """Its backbone's settings: the U-Net of SD / SDXL, the transformer of PixArt."""
        if self.backbone_subfolder == "transformer":
            return PixArtBackbone(path=self.path, subfolder="transformer")
        return DiffusersUNetBackbone(path=self.path, subfolder="unet")

    def first_stage(self) -> DiffusersAutoencoder:
        """Its VAE, frozen."""
        return DiffusersAutoencoder(self.path, subfolder="vae").eval()


def local_pipeline_dir(source: str) -> Path:
    """`source` as a local directory: itself, or a hub id's snapshot in the hub cache (downloaded where allowed)."""
    local = Path(source).expanduser()
    if local.exists():
        return local
    if not looks_like_hub_id(source):
        raise PretrainedWeightsError(f"pipeline directory not found: {source}; copy the pipeline's directory (the one "
                                     "holding model_index.json) there, or give a hub id")
    try:
        return Path(require_diffusers().DiffusionPipeline.download(source))
    except (OSError, ValueError) as err:
        raise PretrainedWeightsError(f"cannot fetch pipeline {source}: {str(err).splitlines()[0]}; on a node without "
                                     "network, copy the pipeline directory and give its path") from None


def read_pipeline(source: str) -> PipelineIndex:
    """The index of the pipeline at `source` (a directory or hub id), or one line saying why it cannot be read."""
    root = local_pipeline_dir(source)
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise PretrainedWeightsError(f"{root} is not a diffusers pipeline directory (no model_index.json); for a single "
                                     "model's save_pretrained directory use backbone or first_stage instead of pipeline")
    index = json.loads(index_file.read_text())
    class_name = index.get("_class_name", "")
    if class_name not in READ_PIPELINES:
        raise UserError(f"{root} holds a {class_name or 'pipeline of unknown class'}, which genart does not "
                        f"read as a whole yet; readable: {', '.join(READ_PIPELINES)}. Its parts can be named one by "
                        "one (backbone, first_stage)")
    components = {k: tuple(v) for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2}
    options = {k: v for k, v in index.items() if not k.startswith("_") and k not in components}
    scheduler_file = root / "scheduler" / "scheduler_config.json"
    if not scheduler_file.is_file():
        raise PretrainedWeightsError(f"{root} has no scheduler/scheduler_config.json; the pipeline's noise schedule "
                                     "and prediction type come from it")
    return PipelineIndex(str(root), class_name, components, options, json.loads(scheduler_file.read_text()))
