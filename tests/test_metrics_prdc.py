"""Precision/recall (Kynkaanniemi et al. 2019) as defined, against a brute-force computation; FD-DINOv2 on a tiny
random-init Dinov2Model against SciPy's Frechet distance; both through `genart eval --fake` into metrics.json."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import genart_in_process
from PIL import Image
from test_metrics_fid import frechet_reference

from genart_lightning.metrics.precision_recall import PrecisionRecall, precision_recall


def clusters(which: list[int], per_cluster: int, seed: int) -> torch.Tensor:
    """2-d unit Gaussians around the corners (+-20, +-20): clusters 40 apart, each ~6 across. In 2-d, 250 points
    cover their cluster well enough for a fresh sample to land inside ~97% of the time (in 8-d about 85%)."""
    corners = torch.tensor([[20.0, 20.0], [20.0, -20.0], [-20.0, 20.0], [-20.0, -20.0]])
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(per_cluster, 2, generator=g) + corners[c] for c in which])


def brute_force(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """The paper's definition, point by point in float64: a probe counts if it lies within some manifold point's
    distance to that point's k-th nearest other point."""
    def radius(points: np.ndarray, i: int) -> float:
        others = [np.linalg.norm(points[i] - points[j]) for j in range(len(points)) if j != i]
        return sorted(others)[k - 1]

    def share(probes: np.ndarray, manifold: np.ndarray) -> float:
        radii = [radius(manifold, i) for i in range(len(manifold))]
        covered = [any(np.linalg.norm(p - m) <= r for m, r in zip(manifold, radii, strict=True)) for p in probes]
        return sum(covered) / len(probes)

    return share(fake, real), share(real, fake)


def test_precision_recall_on_separated_clusters():
    real = clusters([0, 1, 2, 3], 250, seed=0)
    half = clusters([0, 1], 250, seed=1)  # fresh samples of two of the four clusters
    precision, recall = precision_recall(real, half, k=3)
    assert precision >= 0.95 and 0.46 <= recall <= 0.5, (precision, recall)  # measured: 0.986, 0.483
    same = precision_recall(real, clusters([0, 1, 2, 3], 250, seed=2), k=3)  # a fresh sample of all four
    assert min(same) >= 0.95, same  # measured: 0.971, 0.973
    assert precision_recall(real, real, k=3) == (1.0, 1.0)
    assert precision_recall(real, real + 1000, k=3) == (0.0, 0.0)
    with pytest.raises(ValueError, match="needs more than 3 generated images, got 3"):
        precision_recall(real, half[:3], k=3)


def test_precision_recall_metric_in_chunks_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(90, 6, generator=g)
    fake = torch.randn(70, 6, generator=g) * 1.3 + 0.4  # wider and shifted: some fakes outside, few reals missed
    metric = PrecisionRecall(6, k=3, chunk=7)  # blocks of 7 x 7 distances: every row and column split
    metric.load_real(real)
    metric.update(torch.randn(5, 6), real=False)
    metric.reset()  # forgets generated features only
    for batch in fake.split(16):
        metric.update(batch, real=False)
    result = metric.compute()
    expected = brute_force(real.double().numpy(), fake.double().numpy(), k=3)
    assert (result["precision"], result["recall"]) == pytest.approx(expected, abs=1e-12)
    assert (result["num_real"], result["num_fake"], result["k"]) == (90, 70, 3)
    assert 0.5 < expected[0] < 0.9 and 0.9 < expected[1] < 1, expected  # measured: 0.729, 0.967 (neither trivial)


def tiny_dinov2(path) -> str:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=14,
                          image_size=28)
    Dinov2Model(config).save_pretrained(path)
    return str(path)


def image_folder(path, n: int, seed: int, bright: float) -> np.ndarray:
    """`n` 16px PNGs of smooth random colour blobs; returns them as uint8 [n, 16, 16, 3]."""
    rng = np.random.default_rng(seed)
    path.mkdir()
    coarse = rng.uniform(0, 255 * bright, (n, 4, 4, 3))
    pixels = np.clip(np.kron(coarse, np.ones((1, 4, 4, 1))) + rng.normal(0, 12, (n, 16, 16, 3)), 0, 255).astype(np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(path / f"{i:03d}.png")
    return pixels


def dinov2_reference_features(model_dir: str, pixels: np.ndarray) -> np.ndarray:
    """EDM2's recipe written out: uint8 -> bicubic antialias 224 -> /255, ImageNet mean/std -> last layer's CLS token."""
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(model_dir).eval()
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bicubic", antialias=True) / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        return model(pixel_values=x).last_hidden_state[:, 0].double().numpy()


def test_eval_fake_folder_writes_fd_dinov2_and_precision_recall(tmp_path):
    model_dir = tiny_dinov2(tmp_path / "dinov2")
    real = image_folder(tmp_path / "real", 48, seed=0, bright=1.0)
    fake = image_folder(tmp_path / "fake", 40, seed=1, bright=0.8)
    pool = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
    torch.jit.script(pool).save(str(tmp_path / "features.pt"))  # FID's features here: 12 block means
    out = tmp_path / "metrics.json"
    code, stdout, stderr = genart_in_process(
        "eval", "--fake", str(tmp_path / "fake"), "--data", str(tmp_path / "real"), "--fid-features",
        str(tmp_path / "features.pt"), "--fd-dinov2", model_dir, "--precision-recall", "--cache-dir", str(tmp_path / "c"),
        "--out", str(out), cwd=tmp_path)
    assert code == 0, stderr[-2000:]
    metrics = json.loads(out.read_text())
    assert "| fid | kid | fd_dinov2 | precision | recall |" in stdout

    expected = frechet_reference(dinov2_reference_features(model_dir, real), dinov2_reference_features(model_dir, fake))
    assert metrics["fd_dinov2"] == pytest.approx(expected, rel=1e-4) and expected > 0
    described = metrics["fd_dinov2_features"]
    assert described["id"].startswith("dinov2-dinov2-") and described["num_features"] == 32
    assert described["source"] == model_dir and described["reference"]["count"] == 48

    def pooled(pixels: np.ndarray) -> np.ndarray:
        return pool(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1).double().numpy()

    assert (metrics["precision"], metrics["recall"]) == pytest.approx(brute_force(pooled(real), pooled(fake), 3), abs=1e-12)
    assert {k: metrics["precision_recall"][k] for k in ("k", "num_real", "num_fake")} == {"k": 3, "num_real": 48, "num_fake": 40}
    assert metrics["precision_recall"]["features"] == metrics["feature_extractor"]["id"]


def test_missing_dinov2_is_one_line(tmp_path):
    from genart_lightning.metrics.dinov2 import DINOv2Features
    from genart_lightning.metrics.features import WeightsMissingError

    (tmp_path / "fake").mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (60 * i, 90, 30)).save(tmp_path / "fake" / f"{i}.png")
    torch.jit.script(torch.nn.Flatten()).save(str(tmp_path / "features.pt"))
    code, _, stderr = genart_in_process(
        "eval", "--fake", str(tmp_path / "fake"), "--data", str(tmp_path / "fake"), "--fid-features",
        str(tmp_path / "features.pt"), "--fd-dinov2", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert stderr.startswith(f"error: DINOv2 directory not found: {tmp_path / 'nowhere'} (from --fd-dinov2); on a "
                             f"machine with network run `hf download facebook/dinov2-large --local-dir {tmp_path / 'nowhere'}`")
    with pytest.raises(WeightsMissingError, match="DINOv2 nobody/no-dinov2 .*not in the hub cache: looked in "
                                                  ".*models--nobody--no-dinov2 .*hf download nobody/no-dinov2"):
        DINOv2Features("nobody/no-dinov2")
