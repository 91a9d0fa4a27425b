"""Unconditional DCGAN family (Radford et al. 2016): DCGAN nets trained with the shared adversarial step."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from genart_lightning.models.adversarial import AdversarialModel
from genart_lightning.nn.compilation import compile_networks
from genart_lightning.nn.dcgan import DCGANDiscriminator, DCGANGenerator, Norm


class DCGAN(AdversarialModel):
    """DCGAN generator and discriminator; objective, regularisers and optimizer settings go to AdversarialModel."""

    conditional = False

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 3,
        z_dim: int = 64,
        g_channels: int = 64,
        d_channels: int = 64,
        g_norm: Norm = "batch",
        d_norm: Norm = "none",
        spectral_norm: bool = False,
        gradient_checkpointing: bool = False,
        compile: bool | str = False,
        **kwargs,
    ) -> None:
        """Net sizes here; `loss`, `r1_gamma`, `n_critic`, `lr_g`, `lr_d`, `ema_decay`, ... see AdversarialModel.
        `gradient_checkpointing` recomputes each generator and discriminator stage in backward (BatchNorm statistics
        and spectral norm updated once, as without it); `compile` compiles both nets (true: inductor, or a backend
        name), not with `r1_gamma` > 0: torch.compile cannot take R1's gradient of a gradient.

        Args:
            image_size: side in pixels of the square images: 8, 16, 32, 64, 128 or 256 (4x4, doubled per G
                block).
            z_dim: length of G's input noise vector.
            g_channels: G's width at its last, full-resolution block, doubled per block towards the 4x4 start;
                the main lever on G's size.
            d_channels: D's width at its first conv, doubled at each further stride-2 conv.
            g_norm: G's normalisation, "batch" or "none"; a conditional G needs "batch" (the caption sets its
                gains).
            d_norm: D's normalisation after every conv but the first, "none" or "batch".
            spectral_norm: spectral normalisation of D's layers (Miyato et al. 2018): bounds how sharply D's
                output can change with its input, which steadies training that diverges.
        """
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if compile and self.r1_gamma > 0:
            raise ValueError("compile with r1_gamma > 0: the R1 penalty differentiates D's gradient, which a compiled "
                             "graph does not support; set compile: false or r1_gamma: 0")
        self.z_dim = z_dim
        cond_dim = self.condition_dim()
        self.generator = DCGANGenerator(
            z_dim=z_dim, cond_dim=cond_dim, image_size=image_size, channels=channels, base_channels=g_channels, norm=g_norm,
            gradient_checkpointing=gradient_checkpointing,
        )
        self.discriminator = DCGANDiscriminator(
            image_size=image_size,
            channels=channels,
            base_channels=d_channels,
            cond_dim=cond_dim,
            spectral_norm=spectral_norm,
            norm=d_norm,
            gradient_checkpointing=gradient_checkpointing,
        )
        self.finish_init()
        compile_networks([self.generator, self.discriminator], compile)

    def condition_dim(self) -> int:
        """Width of the condition vector the nets take (0: unconditional); conditional subclasses build their encoder here."""
        return 0

    def sampling_condition(self, n: int, captions: Sequence[str] | None) -> Tensor | None:
        """Condition for `sample`; unconditional families ignore captions."""
        return None

    @torch.no_grad()
    def sample(self, n: int, captions: Sequence[str] | None = None, seed: int = 0) -> Tensor:
        """`n` images in [-1, 1] from the EMA generator; the same seed (and captions) give the same images."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        z = torch.randn(n, self.z_dim, generator=generator, device=self.device)
        return self.ema.module(z, self.sampling_condition(n, captions)).float()

    def image_shape(self) -> tuple[int, int, int]:
        return (self.hparams.channels, self.hparams.image_size, self.hparams.image_size)
