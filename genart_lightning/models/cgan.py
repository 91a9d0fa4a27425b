"""Text-conditional GAN: DCGAN nets conditioned on a frozen OpenCLIP caption embedding, matching-aware discriminator.

The discriminator scores (real image, its caption) as real and both (generated image, its caption) and (real image,
another sample's caption) as fake (GAN-CLS, Reed et al. 2016), so it must judge whether image and text match.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from genart_lightning.models.gan import DCGAN
from genart_lightning.text import TINY_MODEL, FrozenTextEncoder


class TextConditionalGAN(DCGAN):
    """DCGAN whose G gets noise plus the pooled caption embedding and whose D projects that embedding onto its features."""

    conditional = True

    def __init__(
        self,
        text_model: str = TINY_MODEL,
        text_pretrained: str | None = None,
        text_cache_dir: str | None = None,
        **kwargs,
    ) -> None:
        """`text_model`/`text_pretrained`: an OpenCLIP name and tag or local checkpoint path (None: random init)."""
        super().__init__(**kwargs)  # saves these arguments too (Lightning collects the whole __init__ chain)

    def condition_dim(self) -> int:
        hp = self.hparams
        self.text_encoder = FrozenTextEncoder(hp.text_model, hp.text_pretrained, hp.text_cache_dir)
        return self.text_encoder.pooled_dim

    def encode(self, captions: Sequence[str]) -> Tensor:
        """Pooled caption embeddings [B, E] in fp32, normalised to norm sqrt(E) (unit-scale entries, like the noise).

        CLIP embeddings are compared by direction; scaling them like the noise lets the caption weigh as much as z
        in G's first layer from the start instead of entering as a small perturbation.
        """
        pooled = self.text_encoder(list(captions)).pooled.float()
        return F.normalize(pooled, dim=-1) * pooled.shape[-1] ** 0.5

    def condition(self, batch: dict) -> Tensor:
        return self.encode(batch["caption"])

    def fake_logits(self, real: Tensor, fake: Tensor, cond: Tensor | None) -> list[Tensor]:
        # Shifting captions by one pairs every real image with another sample's caption (a mismatch).
        return [self.discriminator(fake, cond), self.discriminator(real, torch.roll(cond, 1, dims=0))]

    def sampling_condition(self, n: int, captions: Sequence[str] | None) -> Tensor:
        if captions is None or len(captions) != n:
            got = "none" if captions is None else len(captions)
            raise ValueError(
                f"{type(self).__name__}.sample needs one caption per image ({n}), got {got}; "
                "pass --prompt to `genart sample` or sample_grid.prompts in the config"
            )
        return self.encode(captions)
