"""Feature extractors for FID/KID: the standard Inception (offline-aware) or a TorchScript file; the leaf of metrics/."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor, nn

INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
"""The TF-ported FID Inception weights torch-fidelity (and so torchmetrics) use; the file name is what the hub cache holds."""
INCEPTION_FILE = INCEPTION_URL.rsplit("/", 1)[-1]


class WeightsMissingError(FileNotFoundError):
    """Feature-extractor weights are neither at the given path nor in the cache."""


class FeatureExtractor(nn.Module):
    """Images in [-1, 1], [B, C, H, W] -> features [B, num_features].

    `feature_id` and `resize` name the features exactly, so cached reference statistics are only
    reused with the extractor (and resizing) that made them. `num_features` spares torchmetrics its
    probe with a 299px dummy image.
    """

    num_features: int
    feature_id: str
    resize: str

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Stay in eval mode: a metric's features must not depend on batch statistics or dropout."""
        return super().train(False)

    def describe(self) -> dict:
        """How the features are made, for metrics.json."""
        return {"id": self.feature_id, "resize": self.resize, "num_features": self.num_features,
                "antialias": getattr(self, "antialias", None)}


def inception_weights_path(weights: str | Path | None = None) -> Path:
    """Where the Inception weights are: the explicit path, else the torch hub cache; one clear error if neither."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    path = Path(weights).expanduser() if weights else cached
    if path.is_file():
        return path
    looked = f"--fid-weights {path}" if weights else f"the torch hub cache {cached} (no --fid-weights given)"
    raise WeightsMissingError(
        f"FID Inception weights not found: looked in {looked}; on a login node run "
        f"`mkdir -p {cached.parent} && curl -L -o {cached} {INCEPTION_URL}` (or copy {INCEPTION_FILE} "
        f"anywhere and pass --fid-weights PATH), or use --fid-features judge|PATH"
    )


class InceptionFeatures(FeatureExtractor):
    """The standard FID features: pool3 (2048-d) of the TF Inception-v3, inputs resized as the original code does."""

    num_features = 2048
    feature_id = "inception-v3-compat-pool3"
    resize = "tf1-bilinear-299"
    antialias = False
    """Original TF FID resizes bilinearly without antialiasing; torchmetrics >= 1.8 defaults to True, which differs."""

    def __init__(self, weights: str | Path | None = None) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        path = inception_weights_path(weights)
        # torch-fidelity unpickles the file without weights_only; refuse anything that is more than tensors first.
        torch.load(path, map_location="cpu", weights_only=True)
        self.net = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path), antialias=self.antialias
        )

    def forward(self, images: Tensor) -> Tensor:
        # The original implementation quantises to uint8 before resizing; grey images get three channels.
        x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net(x)


class TorchScriptFeatures(FeatureExtractor):
    """Any feature network saved with torch.jit.save: images in [-1, 1] -> [B, D] (no Python code is unpickled)."""

    resize = "own"

    def __init__(self, path: str | Path, resolution: int, channels: int = 3) -> None:
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"feature extractor not found: {path} (from --fid-features); pass inception, judge or a TorchScript .pt file")
        self.net = torch.jit.load(str(path), map_location="cpu").eval()
        self.feature_id = f"torchscript-{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"
        with torch.no_grad():
            self.num_features = int(self.net(torch.zeros(1, channels, resolution, resolution)).shape[-1])

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images).flatten(1)


def build_features(spec: str, resolution: int, weights: str | Path | None = None, channels: int = 3) -> FeatureExtractor:
    """`inception` or a TorchScript path -> a feature extractor (dataset plug-ins add their own names, e.g. judge)."""
    if spec == "inception":
        return InceptionFeatures(weights)
    return TorchScriptFeatures(spec, resolution, channels)
