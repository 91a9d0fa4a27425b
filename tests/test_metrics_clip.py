"""CLIP score: equals 100 * max(cos, 0) of the encoder's own embeddings; long captions are cut and counted."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from genart_lightning.metrics.clip_score import CLIPScore


def direct_score(metric: CLIPScore, images: torch.Tensor, captions: list[str]) -> float:
    """The formula written out on the OpenCLIP encoders: normalise to [0, 1], CLIP mean/std, cosine of embeddings."""
    model = metric.model
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)  # OpenAI CLIP statistics
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        image_emb = F.normalize(model.encode_image(((images + 1) / 2 - mean) / std), dim=-1)
        text_emb = F.normalize(model.encode_text(metric.tokenizer(captions, context_length=model.context_length)), dim=-1)
    return float((100 * (image_emb * text_emb).sum(-1).clamp(min=0)).mean())


def test_clip_score_equals_direct_computation_and_states_truncation():
    metric = CLIPScore("genart-tiny")  # 32px vision tower, 32-token context, random init (offline)
    with torch.no_grad():  # random init gives mostly negative cosines; flipped, most pairs count and some clamp
        metric.model.text_projection.neg_()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 32, 32, generator=g) * 2 - 1
    long_caption = "a large red circle on the left, blue background, " * 8  # far beyond 32 tokens
    captions = ["a small red circle", "a large blue square at the top", long_caption, "x", "green triangle", "white"]
    metric.update(images[:4], captions[:4])
    metric.update(images[4:], captions[4:])  # two updates: the mean is over all pairs, not over batches
    result = metric.compute()
    assert float(result["clip_score"]) == pytest.approx(direct_score(metric, images, captions), rel=1e-4)
    assert int(result["truncated_captions"]) == 1 and int(result["num_samples"]) == 6
    assert float(result["clip_score"]) > 1  # not all pairs clamp to zero, so the check above means something


def test_clip_score_resizes_other_resolutions_and_refuses_mismatched_captions():
    metric = CLIPScore("genart-tiny")
    metric.update(torch.zeros(2, 3, 64, 48), ["a", "b"])  # centre crop 48x48 -> 32x32
    assert int(metric.compute()["num_samples"]) == 2
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        metric.update(torch.zeros(2, 3, 32, 32), ["a"])
