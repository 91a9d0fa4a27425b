"""Variational autoencoder family: an image model of its own and the first stage of latent diffusion."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor
from torch.func import functional_call
from torch.nn import functional as F
from torchmetrics import MetricCollection
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from genart_lightning.models.base import GenerativeModel, check_nonfinite_mode
from genart_lightning.models.grids import images_to_grid, publish_grid
from genart_lightning.nn.autoencoder import (
    Decoder,
    Encoder,
    FlatBottleneck,
    PatchDiscriminator,
    diagonal_gaussian_kl,
    reparameterize,
)
from genart_lightning.nn.compilation import compile_networks
from genart_lightning.nn.text_encoder import FrozenTextEncoder


def reconstruction_metrics() -> MetricCollection:
    """PSNR and SSIM on images mapped to [0, 1] (the range published numbers use); PSNR averaged per image."""
    return MetricCollection(
        {
            "psnr": PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3)),
            "ssim": StructuralSimilarityIndexMeasure(data_range=1.0),
        }
    )


class VAE(GenerativeModel):
    """Gaussian-latent VAE (Kingma & Welling 2014) trained on the beta-weighted ELBO, optionally with a patch GAN term.

    Loss per image, divided by the number of pixel values: reconstruction error summed over pixels
    (L1 = Laplace, L2 = Gaussian likelihood) + beta * KL(q(z|x) || N(0, I)), with beta ramped up
    linearly over `kl_warmup_steps` optimizer steps. With `adv_weight` > 0 a patch discriminator is
    trained with the hinge loss from the first step and its term enters the autoencoder loss from
    `adv_start_step` on. A perceptual (LPIPS) term is not offered: it needs pretrained VGG weights,
    which offline runs do not have, and random-weight features would only pretend to be perceptual.

    `latent="spatial"` gives a latent map [latent_channels, H/f, W/f] (f = 2 ** (len(channel_mults) - 1)),
    the latent-diffusion first stage; `latent="flat"` a vector of `latent_dim` behind a fully connected
    bottleneck (a plain VAE, not a first stage).

    First-stage interface (`FirstStage`): `encode`, `decode`, `scaling`, `latent_shape`. The scale is
    1 / std of posterior-mean latents, tracked during training as an exponential moving average of
    the first two moments of every training batch's latents (all-reduced over ranks, bias-corrected
    at the start) and stored in the `_latent_scale` buffer at every step. Updating it each step rather
    than at validation means any checkpoint, whenever written (step-based, SLURM requeue, end of
    fit), holds the scale of the weights it holds, whatever the validation schedule.

    `gradient_checkpointing` recomputes each encoder and decoder block in backward instead of keeping its
    activations: the memory of one block for a second forward pass, for large images and batches.
    """

    reconstructs = True

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 3,
        latent: Literal["spatial", "flat"] = "spatial",
        latent_channels: int = 4,
        latent_dim: int = 64,
        base_channels: int = 32,
        channel_mults: Sequence[int] = (1, 2, 4),
        num_res_blocks: int = 1,
        recon_loss: Literal["l1", "l2"] = "l1",
        beta: float = 1e-4,
        kl_warmup_steps: int = 0,
        adv_weight: float = 0.0,
        adv_start_step: int = 0,
        disc_channels: int = 32,
        disc_layers: int = 2,
        text_encoder: str | None = None,
        text_pretrained: str | None = None,
        caption_dropout: float = 0.1,
        lr: float = 2e-4,
        latent_scale_decay: float = 0.99,
        num_logged_reconstructions: int = 8,
        nonfinite: str = "raise",
        gradient_checkpointing: bool = False,
        compile: bool | str = False,
    ) -> None:
        """For the settings shared with other families (image_size, text_encoder, ...) see GenerativeModel.

        Args:
            in_channels: channels of the images encoded and decoded; 3, as TextImageDataModule gives RGB.
            latent: "spatial": a latent map [latent_channels, H/f, W/f], usable as latent diffusion's first
                stage; "flat": a vector of latent_dim behind a fully connected bottleneck (a plain VAE, not a
                first stage).
            latent_channels: channels of the latent map (4, as Stable Diffusion's VAE); with latent="flat",
                those of the map the bottleneck flattens.
            latent_dim: length of the latent vector with latent="flat" (unused for "spatial").
            base_channels: encoder and decoder width at full resolution; level i has base_channels x
                channel_mults[i].
            channel_mults: width multiplier per level; each level after the first halves the resolution, so
                the downsampling f is 2 ** (len - 1) and image_size must be a multiple of it.
            num_res_blocks: residual blocks per level in encoder and decoder.
            recon_loss: reconstruction error summed over pixels, "l1" (Laplace likelihood) or "l2" (Gaussian).
            beta: weight of the KL term; small (the default) keeps reconstructions sharp for a first stage; 1
                is the plain ELBO, whose samples from the prior are better and reconstructions blurrier.
            kl_warmup_steps: optimizer steps over which beta ramps up linearly from 0 (0: full from the
                start), so the encoder learns to reconstruct before the KL pulls its latents towards the
                prior.
            adv_weight: weight of the patch-GAN term in the autoencoder loss (0: no discriminator is built);
                it sharpens textures that a pixel loss blurs.
            adv_start_step: optimizer step from which the adversarial term enters the autoencoder loss (the
                discriminator trains from the first step); lets reconstructions settle first.
            disc_channels: the patch discriminator's first width, doubled per further layer.
            disc_layers: stride-2 conv layers of the patch discriminator; more see larger patches.
            lr: Adam learning rate (betas 0.5, 0.9) of the autoencoder and its discriminator.
            latent_scale_decay: decay of the moving average of the latents' moments behind `scaling` (updated
                every step); nearer 1 averages over more batches.
            num_logged_reconstructions: images of the first validation batch shown beside their
                reconstructions.
        """
        super().__init__()
        check_nonfinite_mode(nonfinite)
        if latent not in ("spatial", "flat"):
            raise ValueError(f"VAE latent={latent!r} is not known (--model.init_args.latent); use 'spatial' or 'flat'")
        if recon_loss not in ("l1", "l2"):
            raise ValueError(f"VAE recon_loss={recon_loss!r} is not known (--model.init_args.recon_loss); use 'l1' or 'l2'")
        self.downsample = 2 ** (len(channel_mults) - 1)
        if image_size % self.downsample:
            raise ValueError(
                f"VAE image_size={image_size} is not divisible by the downsampling factor {self.downsample} "
                f"of channel_mults={list(channel_mults)}; change --model.init_args.image_size or channel_mults"
            )
        self.save_hyperparameters()
        cond_dim = 0
        self.text_encoder: FrozenTextEncoder | None = None
        if text_encoder is not None:
            self.text_encoder = FrozenTextEncoder(text_encoder, pretrained=text_pretrained)
            cond_dim = self.text_encoder.pooled_dim
        self.conditional = self.text_encoder is not None
        spatial = latent == "spatial"
        self.encoder = Encoder(in_channels, 2 * latent_channels if spatial else latent_channels, base_channels, channel_mults,
                               num_res_blocks, gradient_checkpointing)
        self.decoder = Decoder(latent_channels, in_channels, base_channels, channel_mults, num_res_blocks, cond_dim,
                               gradient_checkpointing)
        side = image_size // self.downsample
        self.bottleneck = None if spatial else FlatBottleneck((latent_channels, side, side), latent_dim)
        self.discriminator = PatchDiscriminator(in_channels, disc_channels, disc_layers) if adv_weight > 0 else None
        self.register_buffer("_latent_scale", torch.tensor(1.0))
        self.register_buffer("_latent_moments", torch.tensor([0.0, 1.0]))  # EMA of E[z], E[z^2]
        self.val_metrics = reconstruction_metrics().clone(prefix="val/")
        compile_networks([self.encoder, self.decoder], compile)

    # ---- first-stage interface (used by latent diffusion) ----

    @property
    def scaling(self) -> float:
        """Factor that gives posterior-mean latents unit variance; `encode` applies it, `decode` undoes it."""
        return float(self._latent_scale)

    @property
    def image_channels(self) -> int:
        return self.hparams.in_channels

    def image_shape(self) -> tuple[int, int, int]:
        return (self.hparams.in_channels, self.hparams.image_size, self.hparams.image_size)

    def latent_shape(self, image_size: int, width: int | None = None) -> tuple[int, int, int]:
        """Shape [C, h, w] of the latents of one image `image_size` high and `width` wide (square when width is None)."""
        self._require_spatial("latent_shape")
        width = image_size if width is None else width
        if image_size % self.downsample or width % self.downsample:
            size = f"image_size={image_size}" if width == image_size else f"image size {image_size}x{width}"
            raise ValueError(f"{size} is not divisible by this VAE's downsampling factor {self.downsample}")
        return (self.hparams.latent_channels, image_size // self.downsample, width // self.downsample)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] -> scaled latents; the posterior mean (no sampling), so the same image always gives the same latent."""
        self._require_spatial("encode")
        mean, _ = self._moments(images)
        return mean * self._latent_scale

    @torch.no_grad()
    def decode(self, latents: Tensor, captions: Sequence[str] | None = None) -> Tensor:
        """Scaled latents (as `encode` returns them) -> images in [-1, 1]."""
        self._require_spatial("decode")
        return self._decode(latents / self._latent_scale, self._cond(captions, latents.shape[0])).clamp(-1, 1)

    # ---- family contract ----

    @torch.no_grad()
    def sample(self, n: int, captions: Sequence[str] | None = None, seed: int = 0) -> Tensor:
        """Decode `n` draws from the prior N(0, I); captions condition the decoder when it is text-conditioned."""
        generator = torch.Generator().manual_seed(seed)
        side = self.hparams.image_size // self.downsample
        shape = (self.hparams.latent_channels, side, side) if self.bottleneck is None else (self.hparams.latent_dim,)
        z = torch.randn((n, *shape), generator=generator).to(self.device)
        return self._decode(z, self._cond(captions, n)).clamp(-1, 1)

    @torch.no_grad()
    def reconstruct(self, images: Tensor, captions: Sequence[str] | None = None) -> Tensor:
        """Deterministic reconstruction (decoded posterior mean) in [-1, 1]."""
        mean, _ = self._moments(images)
        return self._decode(mean, self._cond(captions, images.shape[0])).clamp(-1, 1)

    @torch.no_grad()
    def reconstruction_metrics(self, batches: Iterable[dict], max_batches: int | None = None) -> dict[str, float]:
        """PSNR / SSIM of reconstructions over batches of the batch contract (what `genart eval` reports for a VAE)."""
        metrics = reconstruction_metrics().to(self.device)
        for index, batch in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            images = batch["image"].to(self.device)
            recon = self.reconstruct(images, batch.get("caption") if self.conditional else None)
            metrics.update(recon * 0.5 + 0.5, images * 0.5 + 0.5)
        if not metrics["psnr"].update_called:
            raise ValueError("VAE.reconstruction_metrics got no batches; check the evaluation data urls")
        return {name: float(value) for name, value in metrics.compute().items()}

    # ---- training ----

    def kl_weight(self) -> float:
        """beta, ramped linearly from 0 over the first `kl_warmup_steps` optimizer steps."""
        warmup = self.hparams.kl_warmup_steps
        return self.hparams.beta * (min(1.0, self.global_step / warmup) if warmup > 0 else 1.0)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        images = batch["image"]
        cond = self._cond(self.drop_captions(batch["caption"]), images.shape[0]) if self.conditional else None
        mean, logvar = self._moments(images)
        recon = self._decode(reparameterize(mean, logvar), cond)
        error = (recon - images).abs() if self.hparams.recon_loss == "l1" else (recon - images).pow(2)
        rec = error.flatten(1).sum(1)
        kl = diagonal_gaussian_kl(mean, logvar)
        beta = self.kl_weight()
        pixels = images[0].numel()  # per-pixel scale keeps the learning rate independent of image size
        loss = (rec + beta * kl).mean() / pixels
        self.log_dict({"train/rec": rec.mean() / pixels, "train/kl": kl.mean() / pixels, "train/beta": beta})
        if self.discriminator is not None:
            loss = loss + self._adversarial_terms(images, recon)
        if self.skip_nonfinite(loss, self.hparams.nonfinite):
            return None
        self._track_latent_scale(mean.detach())
        self.log_dict({"train/loss": loss, "train/latent_scale": self._latent_scale}, prog_bar=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        # trainer.log_dir is a DDP broadcast: every rank asks here, not rank 0 alone inside validation_step
        self._image_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "reconstructions"

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images = batch["image"]
        recon = self.reconstruct(images, batch["caption"] if self.conditional else None)
        self.val_metrics.update(recon * 0.5 + 0.5, images * 0.5 + 0.5)
        self.log_dict(self.val_metrics, prog_bar=True)
        if batch_idx == 0 and self.trainer.is_global_zero:
            self._log_reconstructions(images, recon)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # one optimizer for autoencoder and discriminator: _adversarial_terms keeps their gradients apart
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.hparams.lr, betas=(0.5, 0.9), fused=self.fused_optimizer())

    # ---- internals ----

    def _require_spatial(self, what: str) -> None:
        if self.bottleneck is not None:
            raise ValueError(
                f"VAE.{what}: this VAE has a flat latent (latent='flat') and cannot be a latent-diffusion first stage; "
                "train one with --model.init_args.latent=spatial"
            )

    def _moments(self, images: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encoder(images)
        if self.bottleneck is not None:
            h = self.bottleneck.moments(h)
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # bounds keep exp(logvar) finite early in training

    def _decode(self, z: Tensor, cond: Tensor | None) -> Tensor:
        if self.bottleneck is not None:
            z = self.bottleneck.expand(z)
        return self.decoder(z, cond)

    def _cond(self, captions: Sequence[str] | None, n: int) -> Tensor | None:
        if self.text_encoder is None:
            return None
        captions = [""] * n if captions is None else list(captions)
        if len(captions) != n:
            raise ValueError(f"VAE got {len(captions)} captions for {n} images; pass one caption per image")
        return self.text_encoder(captions).pooled

    def _adversarial_terms(self, images: Tensor, recon: Tensor) -> Tensor:
        """Hinge discriminator loss + (after adv_start_step) the autoencoder's adversarial term.

        The autoencoder term sees the discriminator through detached weights, so one backward pass
        gives each network only its own gradients (no optimizer toggling, no unused DDP parameters).
        """
        disc = self.discriminator
        d_loss = F.relu(1.0 - disc(images)).mean() + F.relu(1.0 + disc(recon.detach())).mean()
        self.log("train/d_loss", d_loss)
        if self.global_step < self.hparams.adv_start_step:
            return d_loss
        frozen = {name: p.detach() for name, p in disc.named_parameters()}
        g_adv = -functional_call(disc, frozen, (recon,)).mean()
        self.log("train/g_adv", g_adv)
        return d_loss + self.hparams.adv_weight * g_adv

    @torch.no_grad()
    def _track_latent_scale(self, mean: Tensor) -> None:
        moments = torch.stack([mean.mean(), mean.pow(2).mean()]).float()
        moments = self.trainer.strategy.reduce(moments, reduce_op="mean")  # every rank calls: training_step runs on all
        weight = max(1.0 - self.hparams.latent_scale_decay, 1.0 / (self.global_step + 1))
        self._latent_moments.lerp_(moments, weight)
        variance = self._latent_moments[1] - self._latent_moments[0].square()
        self._latent_scale.copy_(variance.clamp_min(1e-12).rsqrt())

    def _log_reconstructions(self, images: Tensor, recon: Tensor) -> None:
        k = min(self.hparams.num_logged_reconstructions, images.shape[0])
        pairs = torch.stack([images[:k], recon[:k]], dim=1).flatten(0, 1)  # input, reconstruction, input, ...
        step = self.global_step
        publish_grid(self.trainer, "val/reconstructions", images_to_grid(pairs, nrow=8), step,
                     self._image_dir / f"step{step:08d}.png")
