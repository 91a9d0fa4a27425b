"""Frozen OpenCLIP text encoder: the one way conditional families read captions."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import Tensor, nn

from genart_lightning.nn.frozen import keep_out_of_state_dict, weights_digest

TEXT_LAYERS = ("final", "penultimate")
"""Which transformer layer's token states the backbone reads: SD 1.x reads the final, SD 2.x and SDXL the penultimate."""

CONTRASTIVE_ONLY = ("logit_scale", "logit_bias")
"""CLIP parameters of the image-text loss only (temperature, SigLIP bias): frozen even in a trained tower."""

TINY_MODEL = "genart-tiny"
"""A random-init OpenCLIP config that ships with the package: offline runs and tests."""

open_clip.add_model_config(Path(__file__).parent / "openclip_configs")


class WeightsNotFoundError(RuntimeError):
    """Pretrained weights are neither cached nor at the given path."""


@dataclass
class TextEmbedding:
    """Per-token states for cross-attention and one pooled vector per caption."""

    tokens: Tensor  # [B, L, D] token states of the chosen layer, after the final layer norm
    pooled: Tensor  # [B, E] projected embedding (what CLIP compares with images)
    mask: Tensor  # [B, L] True where a real token (incl. start/end) stands


def create_openclip(
    model_name: str = TINY_MODEL,
    pretrained: str | None = None,
    cache_dir: str | None = None,
    seed: int = 0,
) -> tuple[nn.Module, open_clip.tokenizer.SimpleTokenizer]:
    """Build an OpenCLIP model and tokenizer; random init is seeded so it is the same in every process.

    `pretrained` is an OpenCLIP tag (e.g. "laion2b_s32b_b79k", fetched into `cache_dir` or the
    hub cache) or a path to a local checkpoint file; None means random init.
    """
    if pretrained and not Path(pretrained).is_file() and ("/" in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors"))):
        raise WeightsNotFoundError(
            f"OpenCLIP weights not found: {pretrained}; copy the file there, or pass an OpenCLIP tag "
            f"(see open_clip.list_pretrained_tags_by_model('{model_name}'))"
        )
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown OpenCLIP model {model_name!r}; choose one of open_clip.list_models() or {TINY_MODEL!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            with _quiet_random_init(pretrained is None):
                model = open_clip.create_model(model_name, pretrained=pretrained, cache_dir=cache_dir)
        except Exception as err:  # hub/network failures come in many types; give one clear line
            if pretrained and not Path(pretrained).is_file():
                where = cache_dir or os.environ.get("HF_HOME", "~/.cache/huggingface")
                raise WeightsNotFoundError(
                    f"OpenCLIP weights {model_name}/{pretrained} are not cached in {where} and cannot be downloaded "
                    f"here ({type(err).__name__}); on a login node run: python -c \"import open_clip; "
                    f"open_clip.create_model('{model_name}', pretrained='{pretrained}', cache_dir='{where}')\""
                ) from err
            raise
    return model.eval(), open_clip.get_tokenizer(model_name)


class _NoRandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextmanager
def _quiet_random_init(asked_for: bool) -> Iterator[None]:
    """Hide open_clip's "No pretrained weights loaded ... initialized randomly" when random init is what was asked for
    (every `genart sample` of a tiny-encoder checkpoint printed it); a failed pretrained load still warns."""
    if not asked_for:
        yield
        return
    notice = _NoRandomInitNotice()
    root = logging.getLogger()
    root.addFilter(notice)
    try:
        yield
    finally:
        root.removeFilter(notice)


class FrozenTextEncoder(nn.Module):
    """OpenCLIP text tower, frozen unless `trainable`; a frozen one stays out of checkpoints and is rebuilt from its name.

    Keeping it out is what makes a 350M-parameter encoder cost nothing per checkpoint; the tiny config is seeded,
    so it rebuilds to the same weights. `trainable=True` (diffusers' `--train_text_encoder`) trains it with the
    model: its weights then are in the state dict like any other. `layer="penultimate"` gives the token states of
    the last-but-one block (through the final layer norm, as Stable Diffusion 2 reads OpenCLIP ViT-H-14); the pooled
    vector always comes from the final block.
    """

    def __init__(self, model_name: str = TINY_MODEL, pretrained: str | None = None, cache_dir: str | None = None,
                 trainable: bool = False, layer: str = "final") -> None:
        super().__init__()
        if layer not in TEXT_LAYERS:
            raise ValueError(f"unknown text layer {layer!r} (from --model.init_args.text_layer); choose final or penultimate")
        self.layer = layer
        clip, self.tokenizer = create_openclip(model_name, pretrained, cache_dir)
        clip.visual = None  # the image tower is not needed to read captions
        self.model_name, self.pretrained, self.trainable = model_name, pretrained, trainable
        self._fingerprint: dict[str, str] | None = None
        self.clip = clip.requires_grad_(trainable)
        for name in CONTRASTIVE_ONLY:  # no caption embedding reads them; DDP refuses trainable weights without gradients
            if isinstance(getattr(clip, name, None), nn.Parameter):
                getattr(clip, name).requires_grad_(False)
        self.context_length: int = clip.context_length
        self.token_dim: int = clip.transformer.width
        self.pooled_dim: int = clip.text_projection.shape[-1] if clip.text_projection is not None else self.token_dim
        if not trainable:
            keep_out_of_state_dict(self)

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        """A frozen encoder stays in eval mode: dropout must not act."""
        return super().train(mode and self.trainable)

    def fingerprint(self) -> dict[str, str]:
        """What this encoder is: config name, pretrained tag or file, and a hash of its weights as built.

        A frozen encoder is rebuilt from its name, so a checkpoint keeps this to refuse a different one (another
        tag or file, or a random init that changed with an open_clip upgrade). Hashed once per process: about a
        second per GB of weights.
        """
        if self._fingerprint is None:
            self._fingerprint = {"model": self.model_name, "pretrained": str(self.pretrained or "random init"),
                                 "sha256": weights_digest(self.clip)}
        return self._fingerprint

    def tokenize(self, captions: Sequence[str]) -> Tensor:
        """Token ids [B, context_length]; longer captions are truncated (the end token is kept)."""
        return self.tokenizer(list(captions), context_length=self.context_length)

    def forward(self, captions: Sequence[str]) -> TextEmbedding:
        """Encode captions; an empty caption is the unconditional input for guidance."""
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            return self._encode(captions)

    def _encode(self, captions: Sequence[str]) -> TextEmbedding:
        device = self.clip.token_embedding.weight.device
        ids = self.tokenize(captions).to(device)
        clip = self.clip
        x = clip.token_embedding(ids) + clip.positional_embedding
        if self.layer == "final":
            x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))
            tokens = x
        else:
            tokens, x = self._penultimate_and_final(x)
        pooled = open_clip.transformer.text_global_pool(x, ids, clip.text_pool_type)
        if isinstance(pooled, tuple):
            pooled = pooled[0]
        if clip.text_projection is not None:
            pooled = clip.text_projection(pooled) if isinstance(clip.text_projection, nn.Linear) else pooled @ clip.text_projection
        return TextEmbedding(tokens=tokens, pooled=pooled, mask=ids != 0)

    def _penultimate_and_final(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Layer-normed states after the last-but-one and after the last block (one pass through the tower)."""
        transformer, mask = self.clip.transformer, self.clip.attn_mask
        if not transformer.batch_first:
            x = x.transpose(0, 1)
        *body, last = transformer.resblocks
        for block in body:
            x = block(x, attn_mask=mask)
        penultimate, final = x, last(x, attn_mask=mask)
        if not transformer.batch_first:
            penultimate, final = penultimate.transpose(0, 1), final.transpose(0, 1)
        return self.clip.ln_final(penultimate), self.clip.ln_final(final)
