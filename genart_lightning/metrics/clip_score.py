"""CLIP score over an OpenCLIP model, as a torchmetrics Metric that truncates long captions and says so."""

from __future__ import annotations

from collections.abc import Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from genart_lightning.nn.text_encoder import TINY_MODEL, create_openclip


def num_tokens(tokenizer, text: str) -> int:
    """Tokens a caption needs, start and end tokens included (to tell whether it gets truncated)."""
    if hasattr(tokenizer, "encode"):  # open_clip's SimpleTokenizer; it adds start/end tokens around encode()
        return len(tokenizer.encode(text)) + 2
    return len(tokenizer.tokenizer(text)["input_ids"])  # Hugging Face tokenizers count their special tokens


class CLIPScore(Metric):
    """Mean of 100 * max(cos(image, caption), 0) (Hessel et al. 2021, CLIPScore) with any OpenCLIP model.

    Captions longer than the model's context are cut to it (the end token kept), unlike torchmetrics'
    CLIPScore, which fails above 77 tokens; `compute` reports how many were cut.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, model_name: str = TINY_MODEL, pretrained: str | None = None, cache_dir: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        model, self.tokenizer = create_openclip(model_name, pretrained, cache_dir)
        self.model = model.requires_grad_(False)
        cfg = open_clip.get_model_preprocess_cfg(model)
        self.image_size: tuple[int, int] = tuple(cfg["size"]) if isinstance(cfg["size"], (tuple, list)) else (cfg["size"],) * 2
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, -1, 1, 1), persistent=False)
        self.context_length: int = model.context_length
        self.model_id = f"{model_name}/{pretrained or 'random-init'}"
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("num_truncated", torch.tensor(0), dist_reduce_fx="sum")

    def preprocess(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] -> the model's input: centre square crop, bicubic resize, CLIP normalisation."""
        x = (images.float().clamp(-1, 1) + 1) / 2
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        side = min(h, w)
        x = x[..., (h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
        if (side, side) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        return (x - self.mean) / self.std

    def update(self, images: Tensor, captions: Sequence[str]) -> None:
        """Score each image against its caption."""
        if len(captions) != images.shape[0]:
            raise ValueError(f"CLIPScore got {images.shape[0]} images but {len(captions)} captions; pass one caption per image")
        self.model.eval()
        ids = self.tokenizer(list(captions), context_length=self.context_length).to(images.device)
        image_emb = self.model.encode_image(self.preprocess(images), normalize=True)
        text_emb = self.model.encode_text(ids, normalize=True)
        cosine = (image_emb * text_emb).sum(-1)
        self.score_sum += (100 * cosine.clamp(min=0)).double().sum()
        self.num += len(captions)
        self.num_truncated += sum(num_tokens(self.tokenizer, c) > self.context_length for c in captions)

    def compute(self) -> dict[str, Tensor]:
        """`clip_score` (mean), `num_samples`, and `truncated_captions` (cut to the context length)."""
        return {"clip_score": self.score_sum / self.num.clamp(min=1), "num_samples": self.num, "truncated_captions": self.num_truncated}
