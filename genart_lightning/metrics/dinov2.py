"""DINOv2 features for FD-DINOv2 (Stein et al. 2023, "Exposing flaws of generative model evaluation metrics and their
unfair treatment of diffusion models"), the Frechet distance EDM2 reports beside FID."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F

from genart_lightning.metrics.features import FeatureExtractor, WeightsMissingError
from genart_lightning.nn.diffusers_parts import looks_like_hub_id
from genart_lightning.nn.frozen import weights_digest

DINOV2_HUB_ID = "facebook/dinov2-large"
"""ViT-L/14, the network EDM2 loads (torch hub `dinov2_vitl14`), as a transformers `Dinov2Model`: 1024 features."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_SIZE = 224


def _copy_hint(target: str) -> str:
    return (f"on a machine with network run `hf download {DINOV2_HUB_ID} --local-dir {target}` (or save_pretrained a "
            f"Dinov2Model there) and copy that directory here")


def load_dinov2(source: str):
    """transformers' `Dinov2Model` from a save_pretrained directory, or a hub id already in the hub cache (nothing is
    downloaded at evaluation); each way it can fail is one line naming the directory to copy."""
    from huggingface_hub.constants import HF_HUB_CACHE
    from transformers import Dinov2Model

    local = Path(source).expanduser()
    if local.is_dir():
        config = local / "config.json"
        if not config.is_file():
            raise WeightsMissingError(f"{local} (from --fd-dinov2) is not a save_pretrained directory (no config.json); "
                                      f"{_copy_hint(str(local))}")
        model_type = json.loads(config.read_text()).get("model_type")
        if model_type != "dinov2":
            raise WeightsMissingError(f"{local} (from --fd-dinov2) holds a {model_type!r} model, not a Dinov2Model; point "
                                      f"at a DINOv2 directory ({DINOV2_HUB_ID} is what EDM2 reports)")
    elif not looks_like_hub_id(source):
        raise WeightsMissingError(f"DINOv2 directory not found: {local} (from --fd-dinov2); {_copy_hint(str(local))}, "
                                  f"or give a hub id already in the hub cache, e.g. {DINOV2_HUB_ID}")
    try:
        return Dinov2Model.from_pretrained(str(local) if local.is_dir() else source, local_files_only=True)
    except OSError as err:
        if local.is_dir():
            raise WeightsMissingError(f"cannot load DINOv2 from {local} (from --fd-dinov2): "
                                      f"{str(err).splitlines()[0]}; {_copy_hint(str(local))}") from None
        cached = Path(HF_HUB_CACHE) / f"models--{source.replace('/', '--')}"
        raise WeightsMissingError(f"DINOv2 {source} (from --fd-dinov2) is not in the hub cache: looked in {cached} "
                                  f"(nothing is downloaded at evaluation); on a login node run `hf download {source}` "
                                  "with the same HF_HOME, or copy its save_pretrained directory and pass "
                                  "--fd-dinov2 DIR") from None


class DINOv2Features(FeatureExtractor):
    """FD-DINOv2's features, made as EDM2 makes them (NVlabs/edm2 `calculate_metrics.py`, `DINOv2Detector`, default
    resize_mode='torch'; itself modelled on layer6ai-labs/dgm-eval):

    1. images as uint8 values 0..255 (grey images get three channels);
    2. resized to 224 x 224 with torch bicubic interpolation, antialias=True (EDM2's 'torch' mode; dgm-eval resizes
       with PIL bicubic, which EDM2 calls almost the same and slow), no clamping after it, as in EDM2;
    3. divided by 255 and normalised with the ImageNet mean and std;
    4. the CLS token of the last layer after the final LayerNorm: what torch hub's DINOv2 forward returns
       (`head(x_norm_clstoken)`, head = Identity) and transformers' `Dinov2Model` gives as `pooler_output`.

    The network is any `Dinov2Model` (EDM2's is ViT-L/14, `facebook/dinov2-large`); its id carries a digest of its
    weights, so reference statistics are never reused across networks.
    """

    resize = f"uint8+bicubic-antialias-{INPUT_SIZE}x{INPUT_SIZE}+imagenet-normalisation"
    antialias = True

    def __init__(self, source: str = DINOV2_HUB_ID) -> None:
        super().__init__()
        self.net = load_dinov2(source).float().eval().requires_grad_(False)
        self.source = source
        self.num_features = int(self.net.config.hidden_size)
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", source.replace("/", "--") if looks_like_hub_id(source)
                      else Path(source).expanduser().resolve().name)
        self.feature_id = f"dinov2-{name}-{weights_digest(self.net)[:12]}"
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        x = ((images.float().clamp(-1, 1) + 1) * 127.5).round()  # the uint8 values EDM2's detector receives
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", antialias=True)
        x = (x / 255 - self.mean) / self.std
        return self.net(pixel_values=x).pooler_output

    def describe(self) -> dict:
        return {**super().describe(), "source": self.source, "input_size": INPUT_SIZE,
                "normalisation": "ImageNet mean/std", "output": "CLS token of the last layer after the final LayerNorm"}
