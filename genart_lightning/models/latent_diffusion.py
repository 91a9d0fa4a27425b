"""Latent diffusion (Rombach et al. 2022): any process and backbone over a frozen first stage's scaled latents."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from genart_lightning.diffusion.process import Process
from genart_lightning.diffusion.vp import VP
from genart_lightning.models.base import FirstStage
from genart_lightning.models.diffusion import DiffusionModel
from genart_lightning.models.latent_cache import check_cache
from genart_lightning.models.loading import build_family, load_model
from genart_lightning.models.parts import build_part, part_config
from genart_lightning.nn.diffusers_parts import DiffusersAutoencoder

FIRST_STAGE_KEY = "genart_first_stage"
"""Checkpoint entry with the fingerprint of a pretrained first stage rebuilt from its path."""


class LatentDiffusion(DiffusionModel):
    """Diffuses `first_stage.encode(images)` (latents already multiplied by the VAE's latent scale).

    The first stage is either a genart VAE read once from `first_stage_ckpt` (a checkpoint written by `genart fit`;
    its family and hyperparameters are then kept in this model's hyperparameters and its weights in this model's
    state_dict, so sampling does not need the VAE checkpoint any more), or a pretrained part named by `first_stage`
    (`{class_path: genart_lightning.nn.diffusers_parts.DiffusersAutoencoder, init_args: {path: ...}}`), rebuilt
    from its path and fingerprinted in the checkpoint. Images are decoded only for grids and evaluation.
    The old `schedule` argument is the process's now: `process: {class_path: ...VP, init_args: {schedule: ...}}`.
    """

    def __init__(
        self,
        first_stage_ckpt: str = "",
        first_stage_family: str | None = None,
        first_stage_hparams: dict | None = None,
        first_stage: DiffusersAutoencoder | dict | None = None,
        **kwargs,
    ) -> None:
        """The first stage; for the rest (process, backbone, text, optimizer, sampling) see DiffusionModel.

        Args:
            first_stage_ckpt: a genart VAE checkpoint (written by `genart fit`) whose latents are diffused;
                read once, its weights then live in this model's checkpoints.
            first_stage_family: the VAE's class path, recorded from first_stage_ckpt so a checkpoint rebuilds
                its first stage without that file; not set by hand.
            first_stage_hparams: the VAE's hyperparameters, recorded with first_stage_family; not set by hand.
            first_stage: a pretrained first stage instead of first_stage_ckpt ({class_path:
                ...DiffusersAutoencoder, init_args: {path: ...}}), rebuilt from its path and fingerprinted;
                None: the pipeline's VAE, if any.
        """
        super().__init__(**kwargs)
        if self.pipeline is not None and first_stage is None and not first_stage_ckpt and first_stage_hparams is None:
            first_stage = self.pipeline.first_stage()
        if first_stage is not None:
            if first_stage_ckpt:
                raise ValueError("give either first_stage_ckpt (a genart VAE) or first_stage (a pretrained part), not both")
            first_stage = build_part(first_stage, DiffusersAutoencoder, DiffusersAutoencoder, "first_stage")
            self.hparams["first_stage"] = part_config(first_stage)
        elif first_stage_hparams is None:
            if not first_stage_ckpt:
                raise ValueError("LatentDiffusion needs first_stage_ckpt (--model.init_args.first_stage_ckpt=path/to/vae.ckpt)")
            first_stage = load_model(first_stage_ckpt)
            # recorded so the checkpoint rebuilds the first stage without the original file
            self.hparams["first_stage_family"] = f"{type(first_stage).__module__}.{type(first_stage).__qualname__}"
            self.hparams["first_stage_hparams"] = dict(first_stage.hparams)
        else:
            first_stage = build_family(first_stage_family, first_stage_hparams)  # weights come with our state_dict
        if not isinstance(first_stage, FirstStage):
            raise ValueError(
                f"first stage {type(first_stage).__name__} from {first_stage_ckpt or 'first_stage'!r} does not keep the "
                "FirstStage contract (encode, decode, latent_shape, scaling, image_channels); use a VAE"
            )
        self.first_stage = first_stage.eval().requires_grad_(False)
        self.latent_shape = tuple(first_stage.latent_shape(self.hparams.image_size))
        self.build_backbone(self.latent_shape[0])

    @staticmethod
    def default_process() -> Process:
        return VP(schedule="scaled_linear")  # LDM's schedule for unit-variance latents

    def train(self, mode: bool = True) -> LatentDiffusion:
        """Keep the frozen first stage in eval mode while the U-Net trains."""
        super().train(mode)
        self.first_stage.eval()
        return self

    def diffusion_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        if height is None and width is None:
            return self.latent_shape
        size = self.hparams.image_size
        return tuple(self.first_stage.latent_shape(size if height is None else height, size if width is None else width))

    def image_shape(self) -> tuple[int, int, int]:
        return (self.first_stage.image_channels, self.hparams.image_size, self.hparams.image_size)

    def frozen_fingerprints(self) -> dict[str, dict[str, str]]:
        """Also the pretrained first stage's, which is rebuilt from its path (a genart VAE is stored instead)."""
        out = super().frozen_fingerprints()
        if hasattr(self.first_stage, "fingerprint"):
            out[FIRST_STAGE_KEY] = self.first_stage.fingerprint()
        return out

    def check_latent_cache(self, cache: dict) -> None:
        """Latent shards must come from this first stage at this image size, and cached text states (read unless the
        text tower trains along) from this text encoder; else one line naming both."""
        reads_text = self.conditional and not self.learns_text and cache.get("text_encoder") is not None
        check_cache(cache, self.first_stage, self.text_encoder if reads_text else None, self.hparams.image_size)
        if cache.get("text_encoder") is not None and not reads_text:
            rank_zero_info("latent shards hold cached text states; this model encodes the captions instead"
                           + (" (its text tower trains along)" if self.conditional else " (it is unconditional)"))

    @torch.no_grad()
    def to_diffusion_space(self, images: Tensor) -> Tensor:
        return self.first_stage.encode(images)

    @torch.no_grad()
    def from_diffusion_space(self, x: Tensor, captions: Sequence[str] | None) -> Tensor:
        conditional_decoder = getattr(self.first_stage, "conditional", False)
        return self.first_stage.decode(x, captions) if conditional_decoder else self.first_stage.decode(x)
