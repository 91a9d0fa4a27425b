"""diffusers models as parts: an `AutoencoderKL` as latent diffusion's first stage, a `UNet2DConditionModel` as backbone.

Both load with diffusers' own `from_pretrained` from a local `save_pretrained` directory (or a hub id where the
network allows), so the weights of Stable Diffusion, SDXL or Flux VAEs and SD U-Nets are read exactly as diffusers
reads them. The wrappers only translate calling conventions; each mismatch between parts is one line naming both
numbers. diffusers is the optional extra `[diffusers]`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from genart_lightning import UserError
from genart_lightning.nn.backbone import Backbone
from genart_lightning.nn.frozen import keep_out_of_state_dict, weights_digest

EXTRA_HINT = "pip install 'genart-lightning[diffusers]'"


class PretrainedWeightsError(UserError):
    """A pretrained directory is missing, of the wrong kind, or unreadable."""


def require_diffusers() -> Any:
    """The diffusers module, or one line naming the extra to install."""
    try:
        import diffusers
    except ImportError:
        raise UserError(f"diffusers parts need the diffusers extra, which is not installed: {EXTRA_HINT}") from None
    return diffusers


def load_pretrained(class_name: str, path: str, subfolder: str | None = None) -> nn.Module:
    """diffusers' `class_name.from_pretrained(path, subfolder=...)`, with each way it can fail as one line."""
    model_class = getattr(require_diffusers(), class_name)
    local = Path(path).expanduser()
    where = local / subfolder if subfolder else local
    if local.exists():
        config_file = where / "config.json"
        if not config_file.is_file():
            raise PretrainedWeightsError(
                f"{where} is not a diffusers save_pretrained directory (no config.json); point at the directory "
                f"holding config.json and diffusion_pytorch_model.safetensors{' (or set subfolder)' if not subfolder else ''}")
        saved_class = json.loads(config_file.read_text()).get("_class_name")
        if saved_class and saved_class != class_name:
            raise PretrainedWeightsError(f"{where} holds a diffusers {saved_class}, not a {class_name}; point at the "
                                         f"{class_name} directory (e.g. subfolder vae or unet of a pipeline)")
        source = str(local)
    elif looks_like_hub_id(path):
        source = path
    else:
        raise PretrainedWeightsError(f"pretrained weights directory not found: {path}; copy the save_pretrained "
                                     "directory there (an offline node needs the files, not a hub id)")
    try:
        return model_class.from_pretrained(source, subfolder=subfolder)
    except (OSError, ValueError, RuntimeError) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PretrainedWeightsError(f"cannot load {class_name} from {path}"
                                     f"{f' (subfolder {subfolder})' if subfolder else ''}: {detail}; on a node without "
                                     "network, copy its save_pretrained directory and give that path") from None


def looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "~"))


def pretrained_or_configured(class_name: str, path: str | None, subfolder: str | None,
                             config: dict | None) -> tuple[nn.Module, dict]:
    """A diffusers backbone and its config: pretrained from `path` when first built, else from the `config` a model
    recorded then (random weights: its checkpoint holds the trained ones)."""
    if config is None:
        model = load_pretrained(class_name, path, subfolder)
        return model, plain_config(model.config)
    return getattr(require_diffusers(), class_name).from_config(config), config


def plain_config(config: Any) -> dict:
    """A diffusers config as a JSON-able dict without its private `_` entries (kept in hyperparameters)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(config).items() if not k.startswith("_")}


class DiffusersAutoencoder(nn.Module):
    """A frozen diffusers `AutoencoderKL` keeping the `FirstStage` contract: latents are
    `(posterior mean or sample - shift_factor) * scaling_factor`, both factors read from its config.

    It is rebuilt from `path` rather than stored (an SDXL VAE would add 335 MB to every checkpoint); the checkpoint
    keeps a fingerprint of its weights and refuses a different VAE at that path.
    """

    def __init__(self, path: str, subfolder: str | None = None, sample_posterior: bool = False) -> None:
        """
        Args:
            path: an `AutoencoderKL` save_pretrained directory (or hub id where the network allows); read
                every time the model is built, as its weights are not in checkpoints.
            subfolder: the folder of path that holds it (e.g. vae of a pipeline directory).
            sample_posterior: encode to a sample of the posterior instead of its mean; the mean (default)
                gives the same latent for the same image every time.
        """
        super().__init__()
        self.path, self.subfolder, self.sample_posterior = path, subfolder, sample_posterior
        self.vae = load_pretrained("AutoencoderKL", path, subfolder).eval().requires_grad_(False)
        config = self.vae.config
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        self.image_channels: int = config.in_channels
        keep_out_of_state_dict(self)
        self._fingerprint: dict[str, str] | None = None

    @property
    def scaling(self) -> float:
        return self.scaling_factor

    def train(self, mode: bool = True) -> DiffusersAutoencoder:
        return super().train(False)  # frozen: always in eval mode

    def fingerprint(self) -> dict[str, str]:
        if self._fingerprint is None:
            self._fingerprint = {"path": self.path, "subfolder": str(self.subfolder), "sha256": weights_digest(self.vae)}
        return self._fingerprint

    def latent_shape(self, image_size: int, width: int | None = None) -> tuple[int, int, int]:
        """[C, h, w] of the latents of one image `image_size` high and `width` wide (square when width is None)."""
        width = image_size if width is None else width
        if image_size % self.downsample or width % self.downsample:
            size = str(image_size) if width == image_size else f"{image_size}x{width}"
            raise ValueError(f"image size {size} is not divisible by the VAE's downsampling factor {self.downsample} "
                             f"({self.path}); choose a multiple of {self.downsample}")
        return (self.vae.config.latent_channels, image_size // self.downsample, width // self.downsample)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        posterior = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        z = posterior.sample() if self.sample_posterior else posterior.mean
        # contiguous: the posterior mean is a strided view, and noise drawn "like" it would follow its memory order
        return ((z - self.shift_factor) * self.scaling_factor).float().contiguous()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        z = latents / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(self.vae.dtype)).sample.float().clamp(-1, 1)


class DiffusersUNet(nn.Module):
    """`UNet2DConditionModel` behind the backbone call `net(x, t, context=, context_mask=, pooled=, size_ids=)`.

    SDXL's U-Net (`addition_embed_type: text_time`) `reads_sizes`: the pooled text vector and the six size ids go in
    as its `added_cond_kwargs` (`text_embeds`, `time_ids`)."""

    def __init__(self, unet: nn.Module, attention_mask: bool) -> None:
        super().__init__()
        self.unet, self.attention_mask = unet, attention_mask
        self.reads_sizes = getattr(unet.config, "addition_embed_type", None) == "text_time"

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None,
                pooled: Tensor | None = None, size_ids: Tensor | None = None) -> Tensor:
        mask = context_mask if self.attention_mask and context is not None else None
        added = {"text_embeds": pooled, "time_ids": size_ids} if self.reads_sizes else None
        return self.unet(x, t, encoder_hidden_states=context, encoder_attention_mask=mask, added_cond_kwargs=added,
                         return_dict=False)[0]


class DiffusersUNetBackbone(Backbone):
    """A diffusers `UNet2DConditionModel` (e.g. Stable Diffusion 2's, whose text encoder is OpenCLIP ViT-H-14 read at
    its penultimate layer: `text_encoder: ViT-H-14, text_layer: penultimate, conditioning: tokens`).

    Pretrained weights come from `path` when the model is first built; `config` is then recorded, so a checkpoint
    rebuilds the network without the directory (its weights are in the checkpoint). `attention_mask` passes the
    caption's padding mask to cross-attention; Stable Diffusion was trained attending to all 77 positions, so off.
    """

    name = "diffusers_unet"
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections diffusers' LoRA scripts adapt

    def __init__(self, path: str | None = None, subfolder: str | None = None, attention_mask: bool = False,
                 config: dict | None = None) -> None:
        """
        Args:
            path: a `UNet2DConditionModel` save_pretrained directory (or hub id where the network allows); its
                weights are read when the model is first built.
            subfolder: the folder of path that holds it (e.g. unet of a pipeline directory).
            attention_mask: pass the caption's padding mask to cross-attention; off for Stable Diffusion,
                which was trained attending to all 77 positions.
            config: the network's diffusers config, recorded at first build so a checkpoint rebuilds the
                network without path; not set by hand.
        """
        if path is None and config is None:
            raise ValueError("DiffusersUNetBackbone needs path (a UNet2DConditionModel save_pretrained directory)")
        self.path, self.subfolder, self.attention_mask, self.config = path, subfolder, attention_mask, config

    def build(self, in_channels: int, context_dim: int | None, pooled_dim: int | None,
              gradient_checkpointing: bool = False) -> DiffusersUNet:
        unet, self.config = pretrained_or_configured("UNet2DConditionModel", self.path, self.subfolder, self.config)
        self._check_widths(unet.config, in_channels, context_dim, pooled_dim)
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        return DiffusersUNet(unet, self.attention_mask)

    def pretrained_source(self) -> str | None:
        return self.path if self.config is None else None  # with a recorded config, build makes random weights

    def size_multiple(self) -> int:
        # every down block but the last halves the input; unknown (1) until build has read the config
        return 2 ** (len(self.config["down_block_types"]) - 1) if self.config else 1

    def size_rule(self) -> str:
        return f"({self.path}) halves its input {len(self.config['down_block_types']) - 1} times"

    def _check_widths(self, config: Any, in_channels: int, context_dim: int | None, pooled_dim: int | None) -> None:
        source = f"the diffusers U-Net at {self.path}"
        if config.in_channels != in_channels or config.out_channels != in_channels:
            raise ValueError(f"{source} takes {config.in_channels} and returns {config.out_channels} channels, but the "
                             f"diffused space has {in_channels}; use a first stage with {config.in_channels} latent channels")
        if context_dim is None:
            raise ValueError(f"{source} cross-attends to text of width {config.cross_attention_dim}; give it a "
                             "text_encoder and conditioning: tokens")
        if config.cross_attention_dim != context_dim:
            raise ValueError(f"{source} cross-attends to width {config.cross_attention_dim}, but the text encoder gives "
                             f"tokens of width {context_dim}; use the text encoder it was trained with")
        if getattr(config, "addition_embed_type", None) == "text_time":  # SDXL: pooled text + 6 size ids, embedded
            expected = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            if pooled_dim != expected:
                raise ValueError(f"{source} reads a pooled text vector of width {expected} (SDXL), but the text encoder "
                                 f"gives {pooled_dim or 'none'}; set conditioning: both with the text encoders it was "
                                 "trained with")
        elif pooled_dim is not None:
            raise ValueError(f"{source} reads text tokens only, not a pooled vector; set conditioning: tokens")
