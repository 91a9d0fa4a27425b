"""Diffusion families: the denoising objective and sampling over pixels (PixelDiffusion) or latents (LatentDiffusion)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from genart_lightning.diffusion.guidance import classifier_free_guidance
from genart_lightning.diffusion.parameterization import (
    check_prediction,
    min_snr_weight,
    q_sample,
    training_target,
)
from genart_lightning.diffusion.samplers import check_sampler, run_sampler, x0_denoiser
from genart_lightning.diffusion.schedules import make_schedule
from genart_lightning.models.base import GenerativeModel, check_nonfinite_mode
from genart_lightning.nn.ema import make_ema
from genart_lightning.nn.text_encoder import FrozenTextEncoder
from genart_lightning.nn.unet import UNet

VAL_SEED = 20_240_601
"""Seed of the validation noise: the same noise every validation, so val/loss is comparable across steps."""


class DiffusionModel(GenerativeModel):
    """Shared by the diffusion families: DDPM objective (Ho et al. 2020) with eps / v / x0 prediction,
    Min-SNR weighting, caption dropout for classifier-free guidance, EMA weights for sampling.

    `attention_block` None picks the kind by conditioning: "transformer" (self + cross attention + MLP, as in
    latent diffusion) with a text encoder, "plain" (DDPM's self-attention block) without one, as those papers'
    unconditional models do; set it to override.

    Subclasses say what the U-Net diffuses (`to_diffusion_space`, `from_diffusion_space`,
    `diffusion_shape`) and call `build_unet(channels)` at the end of their __init__.
    """

    RENAMED_ARGUMENTS = {"cond_drop_prob": "caption_dropout"}

    def __init__(
        self,
        image_size: int = 32,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_levels: Sequence[int] = (1, 2),
        head_channels: int = 32,
        attention_block: str | None = None,
        dropout: float = 0.0,
        schedule: str = "cosine",
        timesteps: int = 1000,
        zero_terminal_snr: bool = False,
        prediction: str = "eps",
        min_snr_gamma: float | None = 5.0,
        caption_dropout: float = 0.1,
        cond_drop_prob: float | None = None,
        text_encoder: str | None = "genart-tiny",
        text_pretrained: str | None = None,
        text_cache_dir: str | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        ema_decay: float = 0.999,
        sampler: str = "ddim",
        sample_steps: int = 50,
        guidance_scale: float = 4.0,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        channels_last: bool = False,
        nonfinite: str = "raise",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()  # also collects the subclass's own arguments
        check_nonfinite_mode(nonfinite)
        check_prediction(prediction)
        if zero_terminal_snr and prediction == "eps":
            raise ValueError("zero_terminal_snr=True cannot be used with prediction='eps' (x0 = (x - eps)/0 at the last step); use prediction='v'")
        check_sampler(sampler)
        self.register_buffer("alphas_cumprod", make_schedule(schedule, timesteps, zero_terminal_snr), persistent=False)
        self.text_encoder = FrozenTextEncoder(text_encoder, text_pretrained, text_cache_dir) if text_encoder else None
        self.conditional = self.text_encoder is not None
        # recorded resolved, so a checkpoint rebuilds the same net whatever the default becomes
        self.hparams["attention_block"] = attention_block or ("transformer" if self.conditional else "plain")

    def build_unet(self, channels: int) -> None:
        """Create the U-Net over `channels`-channel inputs, its EMA copy, and apply the large-model switches."""
        hp = self.hparams
        text = self.text_encoder
        self.unet = UNet(
            in_channels=channels,
            base_channels=hp.base_channels,
            channel_mult=tuple(hp.channel_mult),
            num_res_blocks=hp.num_res_blocks,
            attention_levels=tuple(hp.attention_levels),
            head_channels=hp.head_channels,
            attention_block=hp.attention_block,
            context_dim=text.token_dim if text else None,
            pooled_dim=text.pooled_dim if text else None,
            dropout=hp.dropout,
            gradient_checkpointing=hp.gradient_checkpointing,
        )
        if hp.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self.ema = make_ema(self.unet, hp.ema_decay)
        if hp.compile:
            self.unet.compile()  # in place: parameter names (and checkpoints) stay those of the plain module

    # ---- what the U-Net diffuses (pixels here; latents in LatentDiffusion) ----

    def diffusion_shape(self) -> tuple[int, int, int]:
        """Shape [C, H, W] of one diffused sample."""
        raise NotImplementedError

    def to_diffusion_space(self, images: Tensor) -> Tensor:
        """Batch images in [-1, 1] -> what the U-Net diffuses."""
        raise NotImplementedError

    def from_diffusion_space(self, x: Tensor, captions: Sequence[str] | None) -> Tensor:
        """Sampled tensors -> images in [-1, 1]."""
        raise NotImplementedError

    x0_clip: float | None = None
    """Bound of valid clean data, used to clamp x0 estimates while sampling (None: unbounded)."""

    # ---- conditioning ----

    def encode_text(self, captions: Sequence[str]) -> dict[str, Tensor]:
        """Captions -> the U-Net's conditioning inputs; "" is the unconditional input."""
        emb = self.text_encoder(captions)
        return {"context": emb.tokens, "context_mask": emb.mask, "pooled": emb.pooled}

    def _net(self, net: torch.nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor] | None) -> Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return net(x, t, **(cond or {}))

    # ---- training ----

    def diffusion_loss(self, x0: Tensor, noise: Tensor, t: Tensor, cond: dict[str, Tensor] | None, weighted: bool = True) -> Tensor:
        """Mean (Min-SNR weighted) squared error of the U-Net's prediction at timesteps t."""
        hp = self.hparams
        alpha_bar = self.alphas_cumprod[t]
        out = self._net(self.unet, q_sample(x0, alpha_bar, noise), t, cond)
        target = training_target(x0, noise, alpha_bar, hp.prediction)
        per_sample = F.mse_loss(out.float(), target.float(), reduction="none").flatten(1).mean(1)
        if weighted:
            per_sample = per_sample * min_snr_weight(alpha_bar, hp.prediction, hp.min_snr_gamma).to(per_sample.dtype)
        return per_sample.mean()

    def training_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        x0 = self.to_diffusion_space(batch["image"])
        cond = self.encode_text(self.drop_captions(batch["caption"])) if self.conditional else None
        noise = torch.randn_like(x0)  # global RNG: seeded per rank in on_fit_start, so ranks differ
        t = torch.randint(0, self.hparams.timesteps, (x0.shape[0],), device=x0.device)
        loss = self.diffusion_loss(x0, noise, t, cond)
        if self.skip_nonfinite(loss, self.hparams.nonfinite):
            return None
        self.log("train/loss", loss, prog_bar=True)
        return {"loss": loss, "noise": noise.detach(), "t": t}  # noise and t are for callbacks (per-timestep stats)

    def optimizer_step(self, *args, **kwargs) -> None:
        # here, not in on_train_batch_end: once per real step under gradient accumulation, and before
        # ModelCheckpoint (a callback, called first at batch end) saves, so a checkpoint's EMA matches its weights
        super().optimizer_step(*args, **kwargs)
        self.ema.update_parameters(self.unet)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x0 = self.to_diffusion_space(batch["image"])
        b = x0.shape[0]
        generator = torch.Generator(device=x0.device).manual_seed(VAL_SEED + batch_idx)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        # evenly spread timesteps: every validation covers the same noise levels
        t = ((torch.arange(b, device=x0.device) + 0.5) * self.hparams.timesteps / b).long()
        cond = self.encode_text(batch["caption"]) if self.conditional else None
        self.log("val/loss", self.diffusion_loss(x0, noise, t, cond, weighted=False), prog_bar=True, sync_dist=True, batch_size=b)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.unet.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, fused=self.fused_optimizer())
        warmup = max(1, hp.warmup_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---- sampling ----

    def sampling_settings(self, options: dict) -> dict:
        hp = self.hparams
        guidance = options.get("guidance")
        return {"sampler": options.get("sampler") or hp.sampler, "steps": options.get("steps") or hp.sample_steps,
                "guidance": (hp.guidance_scale if guidance is None else guidance) if self.conditional else None,
                "eta": options.get("eta") or 0.0}

    @torch.no_grad()
    def sample(
        self,
        n: int,
        captions: Sequence[str] | None = None,
        seed: int = 0,
        steps: int | None = None,
        sampler: str | None = None,
        guidance: float | None = None,
        eta: float = 0.0,
    ) -> Tensor:
        """Draw n images with the EMA U-Net; unset options fall back to the config (sampler, sample_steps, guidance_scale)."""
        hp = self.hparams
        settings = self.sampling_settings({"steps": steps, "sampler": sampler, "guidance": guidance, "eta": eta})
        steps, sampler, guidance = settings["steps"], settings["sampler"], settings["guidance"]
        if captions is not None and len(captions) != n:
            raise ValueError(f"got {len(captions)} captions for {n} samples; pass one caption per sample")
        net = self.ema.module
        was_training = net.training
        net.eval()
        generator = torch.Generator().manual_seed(seed)  # CPU generator: a seed gives the same grid on any device
        noise = torch.randn((n, *self.diffusion_shape()), generator=generator).to(self.device)
        cond = self.encode_text(list(captions) if captions else [""] * n) if self.conditional else None
        if cond is not None and captions and guidance != 1.0:
            model = classifier_free_guidance(lambda x, t, c: self._net(net, x, t, c), cond, self.encode_text([""] * n), guidance)
        else:
            model = lambda x, t: self._net(net, x, t, cond)  # noqa: E731
        denoise = x0_denoiser(model, self.alphas_cumprod, hp.prediction)
        if self.x0_clip is not None:
            bound = self.x0_clip
            unclipped = denoise
            denoise = lambda x, t: unclipped(x, t).clamp(-bound, bound)  # noqa: E731
        x = run_sampler(sampler, denoise, noise, self.alphas_cumprod, steps, eta, generator)
        net.train(was_training)
        return self.from_diffusion_space(x, captions)


class PixelDiffusion(DiffusionModel):
    """Pixel-space DDPM family (Ho et al. 2020; text conditioning as in Imagen/GLIDE via cross-attention)."""

    x0_clip = 1.0  # pixels live in [-1, 1]

    def __init__(self, channels: int = 3, **kwargs) -> None:
        super().__init__(**kwargs)
        self.build_unet(channels)

    def diffusion_shape(self) -> tuple[int, int, int]:
        return self.image_shape()

    def image_shape(self) -> tuple[int, int, int]:
        return (self.hparams.channels, self.hparams.image_size, self.hparams.image_size)

    def to_diffusion_space(self, images: Tensor) -> Tensor:
        return images

    def from_diffusion_space(self, x: Tensor, captions: Sequence[str] | None) -> Tensor:
        return x.clamp(-1, 1)
