"""Evaluation: FID feature extraction images/s (ours vs torchmetrics' own FID update), and the time cached
reference statistics save (computing them from the shards vs loading the cache, through the evaluation runner).

The FID Inception weights cannot be downloaded on the build machines. When they are not in the torch hub cache the
benchmark builds the same network with random weights: the cost of a forward pass does not depend on the values.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from unittest import mock

import torch

from benchmarks.common import CLOCK, Comparison, alternate, clock, fix_threads, timed
from datamodules.synthetic import write_shapes_shards
from genart_lightning.metrics.evaluator import Evaluator
from genart_lightning.metrics.feature_space import FeatureSpace
from genart_lightning.metrics.features import (
    INCEPTION_FILE,
    InceptionFeatures,
    WeightsMissingError,
    inception_weights_path,
)
from genart_lightning.metrics.fid import FeatureDistances

BATCH, REFERENCE_IMAGES, IMAGE_SIZE = 16, 64, 32


def inception_weights(tmp: Path) -> tuple[Path, bool]:
    """(weights file, real?): the standard FID Inception weights if cached, else the same net with random weights."""
    try:
        return inception_weights_path(), True
    except WeightsMissingError:
        from torch_fidelity import feature_extractor_inceptionv3 as fidelity

        # Skip the download and the load; what is left is the architecture with its initial (random) weights.
        with (
            mock.patch.object(fidelity, "load_state_dict_from_url", lambda *args, **kwargs: {}),
            mock.patch.object(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None),
        ):
            net = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
        path = tmp / INCEPTION_FILE
        torch.save(net.state_dict(), path)
        return path, False


def feature_extraction(weights: Path, quick: bool) -> Comparison:
    """Generated-side FID update: our extractor + FeatureDistances vs torchmetrics FrechetInceptionDistance.update."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    ours_extractor = InceptionFeatures(weights).eval()
    ours_metric = FeatureDistances(ours_extractor.num_features)
    # The same resizing as ours (no antialias, as the original TF code): the comparison is of the code around it.
    theirs = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights), antialias=False)
    images = torch.rand(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE) * 2 - 1
    as_uint8 = ((images + 1) * 127.5).round().to(torch.uint8)

    @torch.no_grad()
    def ours_update() -> None:
        ours_metric.update(ours_extractor(images), real=False)

    with torch.no_grad():
        same = torch.allclose(ours_extractor(images).double(), theirs.inception(as_uint8).double(), atol=1e-4)
    blocks = {
        "ours": lambda: BATCH / timed(ours_update, 1),
        "baseline": lambda: BATCH / timed(lambda: theirs.update(as_uint8, real=False), 1),
    }
    times = alternate(blocks, rounds=2 if quick else 4)
    return Comparison(
        section="5a. FID feature extraction (CPU)",
        metric=f"images/{CLOCK} s",
        ours_label="InceptionFeatures + FeatureDistances.update (FID float64 sums + KID features)",
        baseline_label="torchmetrics FrechetInceptionDistance(2048).update on uint8 images",
        ours=times["ours"],
        baseline=times["baseline"],
        higher_is_better=True,
        goal=0.95,
        goal_text="ours within 5% of torchmetrics (ratio >= 0.95)",
        setup=f"batch {BATCH} of {IMAGE_SIZE}px images resized to 299px inside, features identical: {same}",
    )


def reference_cache(weights: Path, tmp: Path, quick: bool) -> Comparison:
    """Seconds to get the real-side statistics: computed from the shards (cold) vs loaded from the cache (warm)."""
    info = write_shapes_shards(tmp / "shards", 2 * REFERENCE_IMAGES, image_size=IMAGE_SIZE, seed=0, val_fraction=0.5)
    evaluator = Evaluator(info["val_urls"], num_samples=2, features=InceptionFeatures(weights), batch_size=BATCH, cache_dir=tmp / "cache")
    # The runner's own reference step (what `genart eval` and the periodic callback run), minus sampling.
    counts: dict[str, int] = {}

    def run(cached: bool) -> float:
        if not cached:
            for path in (tmp / "cache").glob("*.pt"):
                path.unlink()
        evaluator.spaces = {"fid": FeatureSpace(evaluator.features_spec, torch.device("cpu"))}  # fresh real-side state
        start = clock()
        evaluator._references(IMAGE_SIZE, torch.device("cpu"))
        elapsed = clock() - start
        reference = evaluator.spaces["fid"].reference
        if reference["reused"] != cached:
            raise AssertionError(f"expected reused={cached}, got {reference}")
        counts["images"] = reference["count"]
        return elapsed

    # The baseline goes first: its run writes the cache that ours then reads.
    times = alternate({"baseline": lambda: run(False), "ours": lambda: run(True)}, rounds=1 if quick else 2, warmup=0)
    per_image = sorted(times["baseline"])[0] / counts["images"]
    return Comparison(
        section="5b. Cached FID reference statistics (CPU)",
        metric=f"{CLOCK} s per evaluation",
        ours_label="load cached statistics",
        baseline_label=f"compute them from the shards ({counts['images']} images: decode, Inception, float64 sums)",
        ours=times["ours"],
        baseline=times["baseline"],
        higher_is_better=False,
        goal_text="no numeric goal (report)",
        setup=f"{REFERENCE_IMAGES} shapes images at {IMAGE_SIZE}px, batch {BATCH}, cache written by the runner itself",
        note=(
            f"computing costs ~{per_image:.3f} {CLOCK} s per real image here, so for a 50k-image reference set the cache "
            f"saves ~{per_image * 50_000 / 3600:.1f} {CLOCK}-hours per evaluation on one such core (loading stays well "
            "under a second: a 2048x2048 float64 covariance plus the KID feature sample)"
        ),
    )


def main(quick: bool = False) -> list[Comparison]:
    """Feature extraction ratio and reference-cache saving."""
    fix_threads()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        weights, real = inception_weights(tmp)
        results = [feature_extraction(weights, quick), reference_cache(weights, tmp, quick)]
    if not real:
        for result in results:
            result.setup += "; Inception weights not available offline: same network with random weights"
    return results


if __name__ == "__main__":
    for result in main():
        print(result.line())
        print("  ", result.setup, result.note)
