"""A transformers text encoder and its tokenizer, as a pipeline directory holds them (CLIPTextModel for SD 1.x/2.x,
CLIPTextModelWithProjection as SDXL's second, T5EncoderModel for PixArt): the same interface as the OpenCLIP
`FrozenTextEncoder`, so every diffusion model reads captions through either.

Captions are read as diffusers' pipelines read them (padded to the tokenizer's `model_max_length`; CLIP without an
attention mask unless its config asks for one, T5 with it), so a model fine-tuned here and exported back conditions
on exactly what the pipeline computes. transformers is the optional extra `[diffusers]`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from genart_lightning import UserError
from genart_lightning.nn.frozen import keep_out_of_state_dict, weights_digest
from genart_lightning.nn.lora import LoRASettings, inject_lora
from genart_lightning.nn.text_encoder import TEXT_LAYERS, TextEmbedding

EXTRA_HINT = "pip install 'genart-lightning[diffusers]'"
ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")
TEXT_LORA_TARGETS = {"clip": ("q_proj", "k_proj", "v_proj", "out_proj"), "t5": ("q", "k", "v", "o")}
"""The attention projections LoRA adapts in a text encoder, as diffusers' and kohya's scripts choose them."""


def require_transformers() -> Any:
    """The transformers module, or one line naming the extra to install."""
    try:
        import transformers
    except ImportError:
        raise UserError(f"pipeline text encoders need transformers, which is not installed: {EXTRA_HINT}") from None
    return transformers


class TransformersTextEncoder(nn.Module):
    """`subfolder` (a transformers text model) and `tokenizer_subfolder` of the pipeline directory `path`.

    Frozen unless `trainable`; a frozen one stays out of checkpoints and is rebuilt from `path`, fingerprinted like
    the OpenCLIP tower. `layer`: "final" reads the last hidden state (through CLIP's final layer norm: SD 1.x, and
    SD 2.x, whose saved encoder already ends at the penultimate block); "penultimate" reads `hidden_states[-2]`
    without the final norm, as SDXL's pipeline does. The pooled vector is CLIP's pooled (end-token) state, projected
    when the model has a projection (`text_embeds`); T5 has none, so it is the masked mean of the token states.
    `max_length` is the caption length in tokens (default: the tokenizer's; T5 pipelines name theirs).

    `lora` adds LoRA adapters to its attention projections (CLIP's q/k/v/out_proj, T5's q/k/v/o) and trains those
    only: the base stays frozen and out of checkpoints (fingerprinted as without adapters), the adapters are in them.
    """

    def __init__(self, path: str, subfolder: str = "text_encoder", tokenizer_subfolder: str = "tokenizer",
                 trainable: bool = False, layer: str = "final", max_length: int | None = None,
                 lora: LoRASettings | None = None) -> None:
        super().__init__()
        if layer not in TEXT_LAYERS:
            raise ValueError(f"unknown text layer {layer!r} (from --model.init_args.text_layer); choose final or penultimate")
        transformers = require_transformers()
        self.path, self.subfolder, self.tokenizer_subfolder = path, subfolder, tokenizer_subfolder
        self.trainable, self.layer = trainable, layer
        where = Path(path) / subfolder
        config_file = where / "config.json"
        if not config_file.is_file():
            raise UserError(f"{where} holds no transformers text encoder (no config.json); point at a pipeline directory")
        architecture = (json.loads(config_file.read_text()).get("architectures") or [""])[0]
        if architecture not in ENCODER_CLASSES:
            raise UserError(f"{where} holds a {architecture or 'model without architectures'}; text encoders read "
                            f"here are {', '.join(ENCODER_CLASSES)}")
        self.model = getattr(transformers, architecture).from_pretrained(path, subfolder=subfolder).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, subfolder=tokenizer_subfolder)
        self.model.requires_grad_(trainable)
        config = self.model.config
        self.is_t5 = architecture == "T5EncoderModel"
        self.use_mask = self.is_t5 or bool(getattr(config, "use_attention_mask", False))
        self.context_length: int = int(max_length or self.tokenizer.model_max_length)
        if self.context_length > 4096:  # transformers' "no limit" (T5's tokenizer): a pipeline names its own
            raise UserError(f"{path}/{tokenizer_subfolder} sets no caption length; give the pipeline's max length")
        self.token_dim: int = config.d_model if self.is_t5 else config.hidden_size
        self.pooled_dim: int = getattr(config, "projection_dim", None) if architecture.endswith("WithProjection") else self.token_dim
        self._fingerprint: dict[str, str] | None = None
        self.adapted = lora is not None
        self.lora_targets = TEXT_LORA_TARGETS["t5" if self.is_t5 else "clip"]
        if trainable and self.adapted:
            raise ValueError("train_text_encoder trains the whole text encoder and lora.text_encoder its adapters; "
                             "choose one")
        if self.adapted:
            self.fingerprint()  # of the base, before adapters are added
            # the backbone's target_modules are not its own
            frozen = inject_lora(self.model, dataclasses.replace(lora, target_modules=None), self.lora_targets,
                                 "text encoder")
            keep_out_of_state_dict(self, {f"model.{name}" for name in frozen})
        elif not trainable:
            keep_out_of_state_dict(self)

    @property
    def learns(self) -> bool:
        """Whether training changes it: trained whole, or through LoRA adapters."""
        return self.trainable or self.adapted

    def encoders(self) -> list[TransformersTextEncoder]:
        """The transformers encoders it reads captions with: itself (SDXL's pair: both)."""
        return [self]

    def train(self, mode: bool = True) -> TransformersTextEncoder:
        """A frozen encoder stays in eval mode: dropout must not act."""
        return super().train(mode and self.trainable)

    def fingerprint(self) -> dict[str, str]:
        """Its class, subfolder and a hash of its weights, for checkpoints and latent caches to refuse another one
        (not the directory's path: a pipeline copied elsewhere is the same encoder)."""
        if self._fingerprint is None:
            self._fingerprint = {"model": f"{type(self.model).__name__} ({self.subfolder})",
                                 "pretrained": "pipeline directory", "sha256": weights_digest(self.model)}
        return self._fingerprint

    def tokenize(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token ids and attention mask [B, context_length], padded and truncated as diffusers' pipelines do."""
        out = self.tokenizer(list(captions), padding="max_length", max_length=self.context_length, truncation=True,
                             return_tensors="pt")
        return out.input_ids, out.attention_mask.bool()

    def forward(self, captions: Sequence[str]) -> TextEmbedding:
        """Encode captions; an empty caption is the unconditional input for guidance."""
        ids, mask = self.tokenize(captions)
        device = next(self.model.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        with torch.set_grad_enabled(self.learns and torch.is_grad_enabled()):
            out = self.model(ids, attention_mask=mask if self.use_mask else None, output_hidden_states=self.layer != "final")
        tokens = out.last_hidden_state if self.layer == "final" else out.hidden_states[-2]
        if self.is_t5:
            weights = mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
            pooled = (out.last_hidden_state * weights).sum(1) / weights.sum(1).clamp(min=1)
        else:
            pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return TextEmbedding(tokens=tokens, pooled=pooled, mask=mask)


def write_bpe_files(folder: Path) -> None:
    """`vocab.json` and `merges.txt` beside a BPE tokenizer's `tokenizer.json` (transformers 5 writes only the latter;
    transformers 4's slow CLIPTokenizer reads only the former). A non-BPE tokenizer (T5's) is left as it is."""
    spec = json.loads((folder / "tokenizer.json").read_text()) if (folder / "tokenizer.json").is_file() else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        return
    if not (folder / "vocab.json").is_file():
        (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    if not (folder / "merges.txt").is_file():
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def write_text_model_prefix(folder: Path) -> None:
    """Put a saved CLIPTextModel's weights under `text_model.`, where transformers 4 looks for them (transformers 5
    saves them without it and reads both). Other models' files, and files already prefixed, are left as they are."""
    from safetensors.torch import load_file, save_file

    config = json.loads((folder / "config.json").read_text())
    if (config.get("architectures") or [""])[0] != "CLIPTextModel":
        return
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else None
    for name in sorted(set(index["weight_map"].values())) if index else ["model.safetensors"]:
        tensors = load_file(folder / name)
        if all(key.startswith("text_model.") for key in tensors):
            continue
        save_file({key if key.startswith("text_model.") else f"text_model.{key}": t for key, t in tensors.items()},
                  folder / name, metadata={"format": "pt"})
    if index:
        index["weight_map"] = {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in index["weight_map"].items()}
        index_file.write_text(json.dumps(index, indent=2))


class TextEncoderPair(nn.Module):
    """SDXL's two text encoders read as one: token states concatenated along the width (the first's, then the
    second's), the pooled vector and mask of the second (with projection). `zeros_for_empty` gives the empty caption
    zero states instead of its encoding, as SDXL's `force_zeros_for_empty_prompt` does in training and guidance."""

    def __init__(self, first: TransformersTextEncoder, second: TransformersTextEncoder, zeros_for_empty: bool) -> None:
        super().__init__()
        self.first, self.second, self.zeros_for_empty = first, second, zeros_for_empty
        self.trainable, self.layer, self.learns = first.trainable, first.layer, first.learns
        self.context_length = min(first.context_length, second.context_length)
        self.token_dim, self.pooled_dim = first.token_dim + second.token_dim, second.pooled_dim

    def encoders(self) -> list[TransformersTextEncoder]:
        return [self.first, self.second]

    def fingerprint(self) -> dict[str, str]:
        one, two = self.first.fingerprint(), self.second.fingerprint()
        return {"model": f"{one['model']} + {two['model']}", "pretrained": one["pretrained"],
                "sha256": f"{one['sha256']}+{two['sha256']}"}

    def forward(self, captions: Sequence[str]) -> TextEmbedding:
        one, two = self.first(captions), self.second(captions)
        embedding = TextEmbedding(tokens=torch.cat([one.tokens, two.tokens], dim=-1), pooled=two.pooled, mask=two.mask)
        if self.zeros_for_empty:
            keep = torch.tensor([bool(c) for c in captions], device=embedding.tokens.device)
            embedding.tokens = embedding.tokens * keep[:, None, None].to(embedding.tokens.dtype)
            embedding.pooled = embedding.pooled * keep[:, None].to(embedding.pooled.dtype)
        return embedding


def pipeline_text_encoder(path: str, parts: list[tuple[str, str]], trainable: bool, layer: str, zeros_for_empty: bool,
                          max_length: int | None = None, lora: LoRASettings | None = None,
                          ) -> TransformersTextEncoder | TextEncoderPair:
    """The text encoder of a pipeline directory: its one encoder, or SDXL's two as a pair (with LoRA: on each)."""
    encoders = [TransformersTextEncoder(path, encoder, tokenizer, trainable, layer, max_length, lora)
                for encoder, tokenizer in parts]
    if len(encoders) == 1:
        return encoders[0]
    if len(encoders) != 2:
        raise UserError(f"{path} holds {len(encoders)} text encoders; genart reads one or two (SDXL)")
    return TextEncoderPair(*encoders, zeros_for_empty)
