"""Diffusion families: one model = process x space x backbone (pixels here, latents in LatentDiffusion).

The process (vp, edm, flow; `diffusion/`) owns the noising, the training target and the sampling grid; the
backbone (U-Net, DiT; `nn/`) is the network; the space is what the subclass diffuses. Guidance, EMA, text
conditioning and the optimizer live here, once.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import TYPE_CHECKING

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from genart_lightning import UserError
from genart_lightning.diffusion.diffusers_schedulers import process_from_scheduler
from genart_lightning.diffusion.guidance import check_interval, classifier_free_guidance, limited_interval
from genart_lightning.diffusion.process import Process
from genart_lightning.diffusion.samplers import check_eta, check_sampler
from genart_lightning.diffusion.vp import VP
from genart_lightning.models.base import GenerativeModel, check_nonfinite_mode
from genart_lightning.models.init_weights import (
    InitReport,
    check_source_family,
    load_initial_weights,
    read_source_weights,
)
from genart_lightning.models.latent_cache import cached_conditioning
from genart_lightning.models.loading import build_family
from genart_lightning.models.parts import build_part, part_config
from genart_lightning.nn.backbone import Backbone
from genart_lightning.nn.compilation import compile_networks
from genart_lightning.nn.diffusers_parts import DiffusersUNet
from genart_lightning.nn.ema import make_ema
from genart_lightning.nn.frozen import keep_out_of_state_dict, weights_digest
from genart_lightning.nn.lora import LoRASettings, inject_lora, merge_lora
from genart_lightning.nn.lora_files import AdaptedPart, backbone_part, load_lora, text_parts
from genart_lightning.nn.pipelines import read_pipeline
from genart_lightning.nn.sharding import bf16_policy, shard_network
from genart_lightning.nn.text_encoder import FrozenTextEncoder
from genart_lightning.nn.unet import UNetBackbone

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

VAL_SEED = 20_240_601
"""Seed of the validation noise: the same noise every validation, so val/loss is comparable across steps."""

CONDITIONING = ("both", "tokens", "pooled")
"""What the backbone reads of a caption: token states (cross-attention), the pooled vector (added to time), or both."""

LORA_BASE_KEY = "genart_lora_base"
"""Checkpoint entry with the source and weights hash of the frozen base a LoRA checkpoint's adapters belong to."""

LEGACY_PROCESS_ARGUMENTS = ("schedule", "timesteps", "zero_terminal_snr", "prediction", "min_snr_gamma")
LEGACY_UNET_ARGUMENTS = ("base_channels", "channel_mult", "num_res_blocks", "attention_levels", "head_channels",
                         "attention_block", "dropout")
"""Flat arguments of checkpoints written before process and backbone were parts; folded into them on load."""


class DiffusionModel(GenerativeModel):
    """Shared by the diffusion families: a process's objective over a backbone, caption dropout for classifier-free
    guidance, EMA weights for sampling, optionally a text encoder trained along (`train_text_encoder`).

    Training the text tower matters most where it is random-init (offline, the tiny config): on 16px shapes after
    600 steps, guided samples showed the prompted colour in 0.73 of cases with it trained at 0.1x the learning
    rate, 0.19 at 1x, and 0.23 with it frozen (tests/test_flow_family.py and the note of the diffusion-core issue).

    `pipeline` names a diffusers pipeline directory (or hub id): the backbone, the text encoder (its transformers
    model and tokenizer; `text_encoder` / `text_pretrained` name OpenCLIP towers and are not read then), the
    process and sampler (from its scheduler config, so a fine-tune continues the model's own parameterisation) and,
    in LatentDiffusion, the first stage come from it, each unless the config names it; conditioning and text_layer
    default to what the pipeline's backbone reads (SDXL: both text encoders' penultimate states and the pooled one).

    A backbone that reads image sizes (SDXL's U-Net: `reads_sizes`) gets `size_ids` [B, 6] = original (h, w), crop
    top-left (top, left), target (h, w) in pixels: from an aspect-bucketed batch's `original_size` / `crop_top_left`
    and its own size (the image's size, and no crop, without buckets); at sampling `original_size = target = (H, W)`
    and crop (0, 0) unless given. Both guidance branches get the same ids, as diffusers' SDXL pipeline does.

    Validation logs `val/loss`, the unweighted training loss at evenly spread quantiles of the training levels, and
    per noise level `val/loss_logsnr_bin{i}` (`val_loss_bins` of them, 0: none): the unweighted loss at the centre of
    bin i of equal-width log-SNR bins over the central 99.73% of the process's training levels (`Process.log_snr_bins`;
    bin0 the noisiest; VP at the training timestep nearest the centre), so runs with other loss weights or training
    densities compare level by level. Every bin sees the batch with val/loss's noise (one more forward pass each). The
    edges are kept in the hyperparameters as `val_loss_bin_edges` (so in the checkpoint and every logger's
    hyperparameters, and a model rebuilt from them keeps its bins); set them in a config to compare processes on one
    set of bins.

    Subclasses say what is diffused (`to_diffusion_space`, `from_diffusion_space`, `diffusion_shape`) and call
    `build_backbone(channels)` at the end of their __init__.
    """

    RENAMED_ARGUMENTS = {"cond_drop_prob": "caption_dropout"}
    bounded_space: bool = False
    """True when clean data lies in [-1, 1] (pixels), so x0 estimates may be clamped while sampling."""

    def __init__(
        self,
        image_size: int = 32,
        process: Process | None = None,
        backbone: Backbone | None = None,
        conditioning: str | None = None,
        caption_dropout: float = 0.1,
        cond_drop_prob: float | None = None,
        text_encoder: str | None = "genart-tiny",
        text_pretrained: str | None = None,
        text_cache_dir: str | None = None,
        text_layer: str | None = None,
        train_text_encoder: bool = False,
        text_lr_multiplier: float = 0.1,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        ema_decay: float = 0.999,
        sampler: str | None = None,
        sample_steps: int = 50,
        guidance_scale: float = 4.0,
        guidance_interval: tuple[float, float] | None = None,
        clip_x0: bool | None = None,
        gradient_checkpointing: bool = False,
        compile: bool | str = False,
        channels_last: bool = False,
        nonfinite: str = "raise",
        init_from: str | None = None,
        init_strict: bool = False,
        init_partial: bool = False,
        lora: dict | None = None,
        pipeline: str | None = None,
        val_loss_bins: int = 5,
        val_loss_bin_edges: list[float] | None = None,
    ) -> None:
        """Settings of every diffusion family; for image_size, caption_dropout, ... see GenerativeModel.

        Args:
            process: the diffusion process (VP, EDM, Flow: `genart parts processes`), which owns noising,
                training target and sampling grid; None: VP (cosine schedule; scaled_linear in
                LatentDiffusion) or the pipeline's scheduler.
            backbone: the denoising network (UNetBackbone, DiTBackbone, ...: `genart parts backbones`); None:
                a UNetBackbone with its defaults, or the pipeline's.
            conditioning: what the backbone reads of a caption: "tokens" (cross-attention), "pooled" (added to
                the time embedding) or "both"; None: both, or what the pipeline's backbone reads.
            cond_drop_prob: deprecated name of caption_dropout (still read, with a warning).
            text_layer: the text layer whose token states the backbone reads, "final" or "penultimate" (SD 2.x
                and SDXL read the penultimate); None: final, or the pipeline's.
            train_text_encoder: train the text tower along with the backbone (then it is in checkpoints);
                helps most when the tower is random-init, as the tiny one is.
            text_lr_multiplier: the trained text tower's learning rate is lr times this (prompts were followed
                best at 0.1 in the tiny-config runs of the class docstring).
            lr: AdamW learning rate of the backbone, constant after warmup_steps.
            weight_decay: AdamW's decoupled weight decay (0: none).
            warmup_steps: optimizer steps over which the learning rate ramps up linearly to lr (0: none); a
                gentler start for large learning rates and fine-tunes.
            sampler: default sampler of `genart sample` and grids, one of the process's (VP: ddim, ddpm,
                dpmpp_2m, euler, heun; EDM: heun, euler, dpmpp_2m; Flow: euler, heun); None: the first of
                those.
            sample_steps: default number of sampling steps: more is slower and usually closer to the model's
                best.
            guidance_scale: default classifier-free guidance scale of captioned samples; 1 is the plain
                conditional model, higher follows the prompt more closely at the cost of variety.
            guidance_interval: default noise levels (LO, HI), as sigma / alpha, between which guidance applies
                (None: all); leaving out high noise keeps samples of a prompt varied and saves forward passes.
            clip_x0: clamp clean-data estimates to [-1, 1] while sampling; None: on in pixel space, off for
                latents (which are unbounded; True is refused there).
            channels_last: keep the backbone's weights and inputs in channels_last memory format; convolutions
                under mixed precision often run faster so on tensor-core GPUs (measure it).
            init_from: start from these weights only (a genart .ckpt, a `genart export` .safetensors or a
                diffusers U-Net directory): optimizer and step start fresh, unlike --ckpt_path; under lora,
                the frozen base.
            init_strict: with init_from, fail unless every tensor matches by name and shape (default: load the
                ones that match and report the rest).
            init_partial: with init_from, also accept weights of another family and load the tensors that
                match.
            lora: train LoRA adapters over frozen base weights instead of the whole backbone: {rank, alpha,
                target_modules, dropout, weights, text_encoder}; needs init_from or a pretrained backbone.
            pipeline: a diffusers pipeline directory (or hub id): backbone, text encoder(s), process, sampler
                and first stage come from it unless named here (text_encoder / text_pretrained are then
                unused); LatentDiffusion only.
            val_loss_bins: number of log-SNR bins with their own validation loss (val/loss_logsnr_bin{i}), to
                see which noise levels a change helps; each costs one forward pass per validation batch (0:
                none).
            val_loss_bin_edges: those bins' log-SNR edges, increasing; None: equal-width over the process's
                central 99.73% of training levels. Give the same edges to compare processes level by level.
        """
        super().__init__()
        self.save_hyperparameters()  # also collects the subclass's own arguments
        check_nonfinite_mode(nonfinite)
        check_bin_edges(val_loss_bins, val_loss_bin_edges)
        self.pipeline = read_pipeline(pipeline) if pipeline else None
        if self.pipeline is not None:
            process, sampler = self._pipeline_process(process, sampler)
            backbone = backbone or self.pipeline.backbone()
        self.hparams["conditioning"] = conditioning = conditioning or (
            "both" if self.pipeline is None or len(self.pipeline.text_parts) > 1 else "tokens")
        if conditioning not in CONDITIONING:
            raise ValueError(f"unknown conditioning {conditioning!r}; choose one of {', '.join(CONDITIONING)}")
        self.process = build_part(process, Process, self.default_process, "process")
        self.hparams["process"] = part_config(self.process)
        self.hparams["sampler"] = sampler = sampler or self.process.samplers[0]
        self.process.check_sampler(sampler)
        if clip_x0 and not self.bounded_space:
            raise ValueError(f"clip_x0=True clamps x0 estimates to [-1, 1], but {type(self).__name__} diffuses unbounded "
                             "latents; leave clip_x0 unset (it clamps in pixel space only)")
        self.clip_x0 = self.bounded_space if clip_x0 is None else clip_x0
        check_interval(guidance_interval)
        self.hparams["text_layer"] = text_layer = text_layer or (self.pipeline.text_layer if self.pipeline else "final")
        self.lora = LoRASettings.from_config(lora) if lora is not None else None
        text_lora = self.lora if self.lora is not None and self.lora.text_encoder else None
        if text_lora and self.pipeline is None:
            raise ValueError("lora.text_encoder adapts a pipeline's transformers text encoder(s); this model's text "
                             "encoder is OpenCLIP: set pipeline, or train it whole with train_text_encoder")
        if self.pipeline is not None:
            self.hparams["text_encoder"] = None  # the pipeline's own, not an OpenCLIP one
            self.text_encoder = self.pipeline.text_encoder(train_text_encoder, text_layer, text_lora)
        else:
            self.text_encoder = (FrozenTextEncoder(text_encoder, text_pretrained, text_cache_dir,
                                                   trainable=train_text_encoder, layer=text_layer)
                                 if text_encoder else None)
        if train_text_encoder and self.text_encoder is None:
            raise ValueError("train_text_encoder=True needs a text_encoder; name one or set train_text_encoder=False")
        self.conditional = self.text_encoder is not None
        self.backbone_spec = build_part(backbone, Backbone, UNetBackbone, "backbone")
        self.lora_base: dict[str, str] | None = None
        self.register_load_state_dict_pre_hook(_rename_unet_keys)

    @staticmethod
    def default_process() -> Process:
        return VP()

    @property
    def sampling_text_encoder(self) -> torch.nn.Module | None:
        """The text encoder samples are drawn with: the EMA copy of one that trains (whole or through adapters)."""
        return self.text_ema.module if self.text_ema is not None else self.text_encoder

    @property
    def learns_text(self) -> bool:
        """Whether training changes the text encoder: trained whole (`train_text_encoder`) or through LoRA adapters."""
        return bool(self.hparams.train_text_encoder or (self.lora and self.lora.text_encoder))

    def _pipeline_process(self, process: Process | dict | None, sampler: str | None) -> tuple[Process | dict, str]:
        """The process and sampler of the pipeline's scheduler config, unless the config names its own (a checkpoint
        of a fine-tune records what it trained with)."""
        reading = process_from_scheduler(self.pipeline.scheduler, f"{self.pipeline.path}/scheduler")
        if process is None and reading.note:
            rank_zero_info(reading.note)
        return (process or reading.process), (sampler or reading.sampler)

    def build_backbone(self, channels: int) -> None:
        """Create the backbone over `channels`-channel inputs (with LoRA adapters over its base weights when `lora`
        is set), its EMA copy, and apply the large-model switches."""
        hp, text, spec = self.hparams, self.text_encoder, self.backbone_spec
        spec.check_input((channels, *self.diffusion_shape()[1:]))
        self.record_val_loss_bins()
        tokens = text is not None and hp.conditioning in ("both", "tokens")
        pooled = text is not None and hp.conditioning in ("both", "pooled")
        settings, pretrained = part_config(spec), spec.pretrained_source()  # before build records a config
        self.backbone = spec.build(channels, text.token_dim if tokens else None, text.pooled_dim if pooled else None,
                                   hp.gradient_checkpointing)
        # a LoRA base is rebuilt from its source every time, not from a config recorded by the first build
        self.hparams["backbone"] = settings if self.lora else part_config(spec)
        frozen = self.attach_lora(pretrained) if self.lora else None
        if hp.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self.reads_sizes = bool(getattr(self.backbone, "reads_sizes", False))
        self.ema = make_ema(self.backbone, hp.ema_decay)
        if frozen:  # only the adapters are checkpointed; the base is rebuilt from its source (fingerprinted)
            keep_out_of_state_dict(self.backbone, frozen)
            keep_out_of_state_dict(self.ema.module, frozen)
        # the text tower's buffers are constants (its causal mask holds -inf): average its parameters only
        self.text_ema = make_ema(text, hp.ema_decay, average_buffers=False) if self.learns_text else None
        compile_networks([self.backbone], hp.compile)

    def record_val_loss_bins(self) -> None:
        """The log-SNR bin edges of validation's per-level loss, as given or equal-width over the process's range at the
        trained size (the flow's resolution shift depends on it), recorded; and the levels at their centres."""
        bins, edges, shape = self.hparams.val_loss_bins, self.hparams.val_loss_bin_edges, (1, *self.diffusion_shape())
        if not bins:
            edges = []
        elif edges is None:
            edges = [round(edge, 6) for edge in self.process.log_snr_bins(bins, shape)]  # readable in dashboards
        self.hparams["val_loss_bins"], self.hparams["val_loss_bin_edges"] = max(len(edges) - 1, 0), list(edges)
        self.val_loss_levels = [(low + high) / 2 for low, high in pairwise(edges)]
        levels = torch.tensor(self.val_loss_levels, dtype=torch.float64)
        reached = self.process.log_snr(self.process.quantile(levels, shape), shape).tolist()
        outside = [f"bin{i} ({low:.3g}, {high:.3g}) at {level:.3g}" for i, ((low, high), level)
                   in enumerate(zip(pairwise(edges), reached, strict=True)) if not low <= level <= high]
        if outside:  # VP trains at its timesteps only; EDM and flow stop at quantiles 1e-6 of their densities
            rank_zero_warn(f"val_loss_bin_edges: the {self.process.name} process trains at no level inside "
                           f"{', '.join(outside)}; val/loss_logsnr_bin* there is at its nearest level")

    def shard(self, mesh: DeviceMesh) -> None:
        """FSDP2: the backbone and its EMA copy, sharded alike unit by unit (`nn/sharding.py`), so the EMA update runs
        shard by shard; the frozen text encoder and first stage stay whole on every rank (no gradients to reduce).
        Under `bf16-mixed` the weights are gathered in bf16 and gradients reduced in fp32 (`bf16_policy`)."""
        hp = self.hparams
        for switch, why in (("lora", "its adapters are small: replicate them"), ("train_text_encoder", "the text tower "
                            "is not sharded"), ("compile", "compiling sharded blocks is not tested here")):
            if hp.get(switch):
                raise ValueError(f"{switch} is not supported under --trainer.strategy fsdp2 ({why}); use "
                                 f"--trainer.strategy ddp, or turn {switch} off")
        policy = bf16_policy() if "bf16" in str(self.trainer.precision) else None  # bf16-mixed: gather in bf16
        shard_network(self.backbone, mesh, policy)
        shard_network(self.ema.module, mesh, policy)

    def attach_lora(self, pretrained: str | None) -> set[str]:
        """Load the base weights (`init_from`, else the backbone's own `pretrained` ones), fingerprint them, then add
        adapters and freeze the rest; returns the frozen parameter names. The base is the source's sampling (EMA)
        weights where it has them: what it generates with is what the adapters adapt. `lora.weights` sets the
        adapters from a LoRA file (diffusers or kohya format) to continue training it."""
        hp, spec = self.hparams, self.backbone_spec
        source = hp.init_from or pretrained
        if source is None:
            raise ValueError(f"lora trains adapters over pretrained weights, but the {spec.name} backbone is random-init; "
                             "set init_from: PATH (a genart .ckpt, a `genart export` .safetensors or a diffusers directory)")
        if hp.init_from:
            weights = self.read_initial_weights(hp.init_from)
            base = "ema.module." if any(k.startswith("ema.module.") for k in weights) else "backbone."
            report = load_initial_weights(self.backbone, {k.removeprefix(base): v for k, v in weights.items()
                                                          if k.startswith(base)}, hp.init_strict, hp.init_from)
            rank_zero_info(report.summary(hp.init_from) + f" (LoRA base: the source's {base.rstrip('.')} weights)")
        self.lora_base = {"source": source, "sha256": weights_digest(self.backbone)}
        frozen = inject_lora(self.backbone, self.lora, spec.lora_targets, spec.name)
        if self.lora.weights:
            layers = load_lora(self.lora_parts(), self.lora.weights, self.lora.alpha or self.lora.rank, self.lora.rank)
            rank_zero_info(f"LoRA adapters of {layers} layers start from {self.lora.weights}")
            self.hparams["lora"] = dict(self.hparams["lora"], weights=None)  # checkpoints hold the adapters from here on
        return frozen

    def lora_parts(self, sampling: bool = False) -> list[AdaptedPart]:
        """The networks holding LoRA adapters, backbone first, then adapted text encoders; their EMA copies (what
        sampling reads) when `sampling`."""
        spec = self.backbone_spec
        parts = [backbone_part(self.ema.module if sampling else self.backbone, self.lora.target_modules or spec.lora_targets)]
        if self.lora.text_encoder:
            parts += text_parts((self.sampling_text_encoder if sampling else self.text_encoder).encoders())
        return parts

    def without_lora(self) -> DiffusionModel:
        """A plain copy of this LoRA model with its adapters merged into the base weights (live and EMA; the text
        encoder's as sampled with, where it has adapters), for export."""
        hp = dict(self.hparams) | {"lora": None, "init_from": None, "backbone": part_config(self.backbone_spec)}
        plain = build_family(f"{type(self).__module__}.{type(self).__qualname__}", hp)
        plain.load_state_dict(self.state_dict(), strict=False)  # what is not the backbone (a trained text tower, ...)
        pairs = [(self.backbone, plain.backbone), (self.ema.module, plain.ema.module)]
        if self.lora.text_encoder:  # the text encoder as sampled with (its EMA), adapters folded in
            pairs.append((self.sampling_text_encoder, plain.text_encoder))
        for adapted, target in pairs:
            merged = merge_lora(copy.deepcopy(adapted))  # a copy: the live and EMA networks share one base
            # by name, not state_dict(): the copy keeps the hook that leaves the base out of checkpoints
            missing = target.load_state_dict(dict(merged.named_parameters()) | dict(merged.named_buffers()),
                                             strict=False).missing_keys
            if missing:
                raise RuntimeError(f"merging LoRA left {len(missing)} tensors unset ({', '.join(missing[:3])})")
        return plain.eval()

    def frozen_fingerprints(self) -> dict[str, dict[str, str]]:
        return super().frozen_fingerprints() | ({LORA_BASE_KEY: self.lora_base} if self.lora_base else {})

    def setup(self, stage: str) -> None:
        """`init_from`: weights only, before Lightning restores a `ckpt_path` (which then wins, so a resumed
        fine-tuning run continues from its own checkpoint, not from the source again). Under LoRA the source is the
        frozen base, loaded when the model is built; here the rest (a text tower trained along) loads as without it.
        Latent shards are checked against this model before its first step (`check_latent_cache`)."""
        if stage == "fit" and self.hparams.get("init_from"):
            self.initialise_from(self.hparams.init_from, self.hparams.init_strict)
        cache = getattr(getattr(self._trainer, "datamodule", None), "latent_cache", None)  # no trainer: called by hand
        if cache is not None:
            self.check_latent_cache(cache)

    def read_initial_weights(self, path: str) -> dict[str, Tensor]:
        """The source's tensors keyed as in this model (a diffusers directory's as this diffusers backbone's); a
        source of another family is refused unless `init_partial`."""
        if not self.hparams.get("init_partial"):
            check_source_family(path, type(self))
        return read_source_weights(path, "backbone.unet." if isinstance(self.backbone, DiffusersUNet) else None)

    def initialise_from(self, path: str, strict: bool = False) -> InitReport:
        """Load weights from a genart .ckpt, a `genart export` .safetensors or a diffusers U-Net directory; the
        optimizer and step start fresh. Where the source has no EMA weights, the EMA starts at the loaded ones."""
        weights = dict(self.read_initial_weights(path))
        base = ("backbone.", "ema.") if self.lora else ()  # the LoRA base is loaded (and fingerprinted) at build
        if not base and not any(k.startswith("ema.") for k in weights):
            weights |= {"ema.module." + k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")}
            weights["ema.n_averaged"] = torch.zeros_like(self.ema.n_averaged)  # the first update copies the weights
        report = load_initial_weights(self, weights, strict, path, ignore=base)
        rank_zero_info(report.summary(path) + (" (besides the LoRA base)" if base else ""))
        return report

    @classmethod
    def upgrade_hparams(cls, hyper_parameters: dict) -> dict:
        """Also folds the flat process and U-Net arguments of older checkpoints into `process` and `backbone`."""
        out = super().upgrade_hparams(hyper_parameters)
        if "process" not in out:
            vp = {k: out.pop(k) for k in LEGACY_PROCESS_ARGUMENTS if k in out}
            out["process"] = {"class_path": f"{VP.__module__}.VP", "init_args": vp}
            unet = {k: out.pop(k) for k in LEGACY_UNET_ARGUMENTS if k in out}
            out["backbone"] = {"class_path": f"{UNetBackbone.__module__}.UNetBackbone", "init_args": unet}
        return out

    # ---- what is diffused (pixels here; latents in LatentDiffusion) ----

    def diffusion_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """Shape [C, H, W] of one diffused sample of a `height` x `width` pixel image (unset: the trained image_size)."""
        raise NotImplementedError

    def to_diffusion_space(self, images: Tensor) -> Tensor:
        """Batch images in [-1, 1] -> what the backbone diffuses."""
        raise NotImplementedError

    def from_diffusion_space(self, x: Tensor, captions: Sequence[str] | None) -> Tensor:
        """Sampled tensors -> images in [-1, 1]."""
        raise NotImplementedError

    # ---- conditioning ----

    def encode_text(self, captions: Sequence[str], encoder: FrozenTextEncoder | None = None) -> dict[str, Tensor]:
        """Captions -> the backbone's conditioning inputs; "" is the unconditional input."""
        emb = (encoder or self.text_encoder)(captions)
        kind = self.hparams.conditioning
        cond = {}
        if kind in ("both", "tokens"):
            cond |= {"context": emb.tokens, "context_mask": emb.mask}
        if kind in ("both", "pooled"):
            cond["pooled"] = emb.pooled
        return cond

    def _net(self, net: torch.nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor] | None) -> Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return net(x, t, **(cond or {}))

    def _bound(self, net: torch.nn.Module, cond: dict[str, Tensor] | None) -> Callable[[Tensor, Tensor], Tensor]:
        return lambda x, t: self._net(net, x, t, cond)

    # ---- training ----

    def diffusion_input(self, batch: dict) -> Tensor:
        """What is diffused of a batch: its cached latents (latent shards), else its images taken to diffusion space."""
        return batch["latent"] if "latent" in batch else self.to_diffusion_space(batch["image"])

    def reads_cached_text(self, batch: dict) -> bool:
        """Whether the batch's cached text states stand in for the text encoder (a tower trained along reads captions)."""
        return self.conditional and "text_tokens" in batch and not self.learns_text

    def batch_conditioning(self, batch: dict, drop: bool) -> dict[str, Tensor] | None:
        """The backbone's conditioning for a batch, with caption dropout when `drop`: from its cached text states
        where it has them, else by encoding its captions."""
        if not self.conditional:
            return None
        keep = self.keep_captions(len(batch["caption"])) if drop else torch.ones(len(batch["caption"]), dtype=torch.bool)
        if self.reads_cached_text(batch):
            cond = cached_conditioning(batch, keep, self.unconditional_text(), self.hparams.conditioning)
        else:
            cond = self.encode_text([c if k else "" for c, k in zip(batch["caption"], keep.tolist(), strict=True)])
        return cond | ({"size_ids": self.batch_size_ids(batch)} if self.reads_sizes else {})

    def batch_size_ids(self, batch: dict) -> Tensor:
        """[B, 6] original (h, w), crop top-left, target (h, w) in pixels of a batch (see the class docstring)."""
        x = batch["latent"] if "latent" in batch else batch["image"]
        scale = self.hparams.image_size // self.diffusion_shape()[-1] if "latent" in batch else 1
        target = torch.tensor([x.shape[-2] * scale, x.shape[-1] * scale], device=x.device).expand(x.shape[0], 2)
        original = batch["original_size"].to(x.device) if "original_size" in batch else target
        crop = batch["crop_top_left"].to(x.device) if "crop_top_left" in batch else torch.zeros_like(target)
        return torch.cat([original, crop, target], dim=1).to(x.dtype)

    def unconditional_text(self) -> dict[str, Tensor]:
        """The conditioning of the empty caption, encoded once per device (the text encoder is frozen)."""
        device = self.device
        if getattr(self, "_unconditional", (None, None))[0] != device:
            with torch.no_grad():
                self._unconditional = (device, self.encode_text([""]))
        return self._unconditional[1]

    def check_latent_cache(self, cache: dict) -> None:
        """Called when the datamodule reads latent shards; pixel-space diffusion cannot use them."""
        raise ValueError(f"{type(self).__name__} diffuses pixels, but the datamodule reads latent shards "
                         "(--data.kind=latents); train LatentDiffusion on them, or set --data.kind=images")

    def training_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor] | None:
        x0 = self.diffusion_input(batch)
        cond = self.batch_conditioning(batch, drop=True)
        noise = torch.randn_like(x0)  # global RNG: seeded per rank in on_fit_start, so ranks differ
        u = torch.rand(x0.shape[0], device=x0.device, dtype=torch.float64)  # quantile of the process's noise level
        loss = self.process.loss(self._bound(self.backbone, cond), x0, noise, u).mean()
        if self.skip_nonfinite(loss, self.hparams.nonfinite):
            return None
        self.log("train/loss", loss, prog_bar=True)
        return {"loss": loss, "noise": noise.detach(), "u": u}  # noise and u are for callbacks (per-level stats)

    def on_train_start(self) -> None:
        """The validation loss bins' edges to every logger: as hyperparameters (Lightning logs the arguments as given; the
        edges exist once the model is built), and as text on TensorBoard, whose HParams view shows Lightning's only."""
        edges = self.hparams.val_loss_bin_edges
        if not edges or not self.trainer.is_global_zero:
            return
        text = "; ".join(f"val/loss_logsnr_bin{i}: log-SNR {low:g} to {high:g}"
                         for i, (low, high) in enumerate(pairwise(edges)))
        for logger in self.loggers:
            logger.log_hyperparams({"val_loss_bin_edges": edges})
            if hasattr(logger.experiment, "add_text"):  # TensorBoard's SummaryWriter
                logger.experiment.add_text("val_loss_bin_edges", text, global_step=self.global_step)

    def optimizer_step(self, *args, **kwargs) -> None:
        # here, not in on_train_batch_end: once per real step under gradient accumulation, and before
        # ModelCheckpoint (a callback, called first at batch end) saves, so a checkpoint's EMA matches its weights
        super().optimizer_step(*args, **kwargs)
        self.ema.update_parameters(self.backbone)
        if self.text_ema is not None:
            self.text_ema.update_parameters(self.text_encoder)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x0 = self.diffusion_input(batch)
        b = x0.shape[0]
        generator = torch.Generator(device=x0.device).manual_seed(VAL_SEED + batch_idx)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        u = (torch.arange(b, device=x0.device, dtype=torch.float64) + 0.5) / b  # the same levels every validation
        cond = self.batch_conditioning(batch, drop=False)
        net = self._bound(self.backbone, cond)
        loss = self.process.loss(net, x0, noise, u, weighted=False).mean()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=b)
        for i, level in enumerate(self.val_loss_levels):  # the same noise, every sample at the bin's centre level
            at_level = self.process.quantile(torch.full((b,), level, dtype=torch.float64), tuple(x0.shape))
            self.log(f"val/loss_logsnr_bin{i}", self.process.loss(net, x0, noise, at_level.to(x0.device), weighted=False)
                     .mean(), sync_dist=True, batch_size=b)

    def configure_optimizers(self):
        hp = self.hparams
        groups = [{"params": [p for p in self.backbone.parameters() if p.requires_grad], "lr": hp.lr}]  # LoRA: adapters
        if self.learns_text:  # all of it, or its adapters
            groups.append({"params": [p for p in self.text_encoder.parameters() if p.requires_grad],
                           "lr": hp.lr * hp.text_lr_multiplier})
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay, fused=self.fused_optimizer())
        warmup = max(1, hp.warmup_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---- sampling ----

    def sampling_settings(self, options: dict) -> dict:
        hp = self.hparams
        guidance = options.get("guidance")
        interval = check_interval(options.get("guidance_interval") or hp.get("guidance_interval"))
        height, width = (hp.image_size if options.get(k) is None else options[k] for k in ("height", "width"))
        self.sampling_shape(height, width)  # a size the backbone cannot take fails here, before any sampling
        return {"sampler": options.get("sampler") or hp.sampler, "steps": options.get("steps") or hp.sample_steps,
                "guidance": (hp.guidance_scale if guidance is None else guidance) if self.conditional else None,
                "guidance_interval": interval if self.conditional else None,
                "eta": options.get("eta") or 0.0, "height": height, "width": width}

    def sampling_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """The diffused shape [C, h, w] of `height` x `width` pixel samples, judged by the backbone's `check_input`;
        a size that cannot work is one line naming it, the backbone and the nearest sizes that do."""
        if (height, width) == (self.hparams.image_size,) * 2:
            return self.diffusion_shape()  # the trained size, checked when the backbone was built
        spec, shape = self.backbone_spec, None
        if min(height, width) >= 1:
            try:
                shape = self.diffusion_shape(height, width)  # the first stage may refuse it (its downsampling)
                spec.check_input(shape)
            except ValueError:
                shape = None
        if shape is not None:
            return shape
        downsampling = self.hparams.image_size // self.diffusion_shape()[-1]  # pixels per diffused position
        step = spec.size_multiple() * downsampling
        why = (f" (the backbone's {spec.size_multiple()} x the first stage's downsampling {downsampling})"
               if downsampling > 1 else "")
        nearest = [f"{h}x{w}" for h in _nearest_multiples(height, step) for w in _nearest_multiples(width, step)]
        raise UserError(f"cannot sample {height}x{width} (height x width) with the {spec.name} backbone of this "
                        f"{type(self).__name__}: height and width must be multiples of {step}{why}; nearest sizes "
                        f"that work: {', '.join(nearest)}")

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
        guidance_interval: tuple[float, float] | None = None,
        height: int | None = None,
        width: int | None = None,
        original_size: tuple[int, int] | None = None,
        crop_top_left: tuple[int, int] = (0, 0),
    ) -> Tensor:
        """Draw n images with the EMA weights; unset options fall back to the config (sampler, sample_steps,
        guidance_scale, guidance_interval: the noise levels sigma / alpha where guidance applies, all when None;
        height and width in pixels: image_size, and any other size the backbone and first stage can take;
        original_size (default (height, width)) and crop_top_left: what a size-reading backbone is told)."""
        settings = self.sampling_settings({"steps": steps, "sampler": sampler, "guidance": guidance, "eta": eta,
                                           "guidance_interval": guidance_interval, "height": height, "width": width})
        steps, sampler, guidance = settings["steps"], settings["sampler"], settings["guidance"]
        if captions is not None and len(captions) != n:
            raise ValueError(f"got {len(captions)} captions for {n} samples; pass one caption per sample")
        check_eta(sampler, settings["eta"])
        shape = self.sampling_shape(settings["height"], settings["width"])
        grid = self.process.grid(sampler, steps, shape)
        net = self.ema.module
        was_training = net.training
        net.eval()
        text = self.sampling_text_encoder
        generator = torch.Generator().manual_seed(seed)  # CPU generator: a seed gives the same grid on any device
        noise = torch.randn((n, *shape), generator=generator).to(self.device)
        noise = noise * self.process.initial_noise_scale(grid)
        sizes = {}
        if (original_size is not None or tuple(crop_top_left) != (0, 0)) and not self.reads_sizes:
            raise ValueError(f"the {self.backbone_spec.name} backbone reads no image sizes (SDXL's U-Net does); drop "
                             "original_size / crop_top_left")
        if self.reads_sizes:
            height, width = settings["height"], settings["width"]
            ids = [*(original_size or (height, width)), *crop_top_left, height, width]
            sizes = {"size_ids": torch.tensor([ids] * n, dtype=torch.float32, device=self.device)}
        cond = (self.encode_text(list(captions) if captions else [""] * n, text) | sizes) if self.conditional else None
        denoise = self.process.denoiser(self._bound(net, cond or sizes or None))
        if cond is not None and captions and guidance != 1.0:
            guided = self.process.denoiser(classifier_free_guidance(lambda x, t, c: self._net(net, x, t, c), cond,
                                                                    self.encode_text([""] * n, text) | sizes, guidance))
            interval = settings["guidance_interval"]
            denoise = guided if interval is None else limited_interval(guided, denoise, interval)
        if self.clip_x0:
            unclipped = denoise
            denoise = lambda x, level: unclipped(x, level).clamp(-1, 1)  # noqa: E731
        x = check_sampler(sampler)(denoise, noise, grid, eta=settings["eta"], generator=generator)
        net.train(was_training)
        return self.from_diffusion_space(x, captions)


def check_bin_edges(bins: int, edges: list[float] | None) -> None:
    """One line when the validation loss bins cannot work."""
    if bins < 0:
        raise ValueError(f"val_loss_bins={bins} is out of range; use 0 (no per-level validation loss) or more")
    if bins and edges is not None and not (len(edges) >= 2 and all(math.isfinite(e) for e in edges)
                                           and all(a < b for a, b in pairwise(edges))):
        raise ValueError(f"val_loss_bin_edges={list(edges)} are not bin edges; give at least 2 finite log-SNR values in "
                         "increasing order, or leave them unset for equal-width bins over the process's range")


def _nearest_multiples(size: int, step: int) -> list[int]:
    """`size` when `step` divides it, else the positive multiples of `step` just below and above it."""
    if size > 0 and size % step == 0:
        return [size]
    below = size // step * step
    return [m for m in (below, below + step) if m > 0] or [step]


def _rename_unet_keys(module: torch.nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """Checkpoints from before backbones were parts call the network `unet`; it is `backbone` now."""
    old = prefix + "unet."
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[prefix + "backbone." + key[len(old):]] = state_dict.pop(key)


class PixelDiffusion(DiffusionModel):
    """Pixel-space diffusion (Ho et al. 2020; text conditioning as in Imagen/GLIDE via cross-attention)."""

    bounded_space = True  # pixels live in [-1, 1]

    def __init__(self, channels: int = 3, **kwargs) -> None:
        if kwargs.get("pipeline"):
            raise ValueError("a diffusers pipeline diffuses latents; use genart_lightning.models.LatentDiffusion "
                             "with pipeline: PATH")
        super().__init__(**kwargs)
        self.build_backbone(channels)

    def diffusion_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        size = self.hparams.image_size
        return (self.hparams.channels, size if height is None else height, size if width is None else width)

    def image_shape(self) -> tuple[int, int, int]:
        return (self.hparams.channels, self.hparams.image_size, self.hparams.image_size)

    def to_diffusion_space(self, images: Tensor) -> Tensor:
        return images

    def from_diffusion_space(self, x: Tensor, captions: Sequence[str] | None) -> Tensor:
        return x.clamp(-1, 1)
