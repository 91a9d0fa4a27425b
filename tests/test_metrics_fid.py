"""FID/KID: agreement with the Frechet formula in float64, sanity of distances, cached Inception weights path."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from genart_lightning.metrics.features import (
    INCEPTION_FILE,
    INCEPTION_URL,
    WeightsMissingError,
    build_features,
)
from genart_lightning.metrics.fid import FeatureDistances


def frechet_reference(a: np.ndarray, b: np.ndarray) -> float:
    """The Frechet distance of two Gaussians fitted to feature sets, in float64 with SciPy's sqrtm."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def fid_of(real: torch.Tensor, fake: torch.Tensor, batch: int = 64) -> float:
    metric = FeatureDistances(real.shape[1], kid_subsets=5)
    for chunk in real.split(batch):
        metric.update(chunk, real=True)
    for chunk in fake.split(batch):
        metric.update(chunk, real=False)
    return metric.compute()["fid"]


def test_fid_matches_float64_frechet_formula():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 24, generator=g) * 2 + 5  # a large mean stresses the sum-of-outer-products form
    mix = torch.randn(24, 24, generator=g) / 5
    fake = torch.randn(250, 24, generator=g) @ (torch.eye(24) + mix) + 5.3
    expected = frechet_reference(real.double().numpy(), fake.double().numpy())
    assert fid_of(real, fake) == pytest.approx(expected, rel=1e-3)


def test_fid_self_is_zero_and_grows_with_shift():
    real = torch.randn(400, 16, generator=torch.Generator().manual_seed(1))
    assert abs(fid_of(real, real)) < 1e-4
    fids = [fid_of(real, real + shift) for shift in (0.1, 0.3, 1.0)]
    assert fids[0] < fids[1] < fids[2]
    assert fids[2] == pytest.approx(16 * 1.0**2, rel=1e-3)  # a pure mean shift adds |shift|^2 per dimension


def test_kid_is_small_for_same_distribution_and_large_for_shift():
    g = torch.Generator().manual_seed(2)
    real, same = torch.randn(300, 8, generator=g), torch.randn(300, 8, generator=g)
    near = FeatureDistances(8, kid_subsets=10, kid_subset_size=100)
    far = FeatureDistances(8, kid_subsets=10, kid_subset_size=100)
    for metric, fake in ((near, same), (far, same + 2)):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    assert abs(near.compute()["kid"]) < 0.05 < far.compute()["kid"]


def test_kid_std_is_a_real_spread_when_sets_are_smaller_than_the_subset_size():
    g = torch.Generator().manual_seed(3)
    metric = FeatureDistances(8, kid_subsets=20)  # default subset size 1000 > both sets
    metric.update(torch.randn(300, 8, generator=g), real=True)
    metric.update(torch.randn(300, 8, generator=g) + 0.5, real=False)
    result = metric.compute()
    assert result["kid_subset_size"] == 150  # half the smaller set: subsets differ from each other
    assert result["kid_std"] > 0.05 * result["kid"] > 0  # whole-set subsets are all the same set: std ~1e-7


def test_missing_inception_weights_error_names_paths_and_fetch(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(WeightsMissingError) as err:
        build_features("inception", resolution=32)
    message = str(err.value)
    assert "\n" not in message
    assert str(tmp_path / "hub" / "checkpoints" / INCEPTION_FILE) in message and INCEPTION_URL in message
    assert "--fid-weights" in message and "curl" in message
    with pytest.raises(WeightsMissingError, match="--fid-weights .*nowhere.pth"):
        build_features("inception", resolution=32, weights=tmp_path / "nowhere.pth")


@pytest.mark.slow
def test_inception_features_load_from_fid_weights_or_hub_cache(tmp_path, monkeypatch):
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    # No network here: make a weights file of the right layout (random values) the way an offline user would copy one.
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: None)
    monkeypatch.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
    layout = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    monkeypatch.undo()
    weights = tmp_path / "my-inception.pth"
    torch.save(layout, weights)

    features = build_features("inception", resolution=32, weights=weights)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        out = features(images)
    assert out.shape == (2, 2048) and features.antialias is False  # original TF-style resize, recorded in metrics.json

    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / INCEPTION_FILE).symlink_to(weights)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with torch.no_grad():
        assert torch.allclose(build_features("inception", resolution=32)(images), out)  # found in the hub cache


def test_any_torchscript_feature_extractor_plugs_in(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    path = tmp_path / "features.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    features = build_features(str(path), resolution=16)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(features(images), net(images))
    assert features.num_features == 5 and features.feature_id.startswith("torchscript-")
    with pytest.raises(FileNotFoundError, match="feature extractor not found: .*nope.pt \\(from --fid-features\\)"):
        build_features(str(tmp_path / "nope.pt"), resolution=16)
