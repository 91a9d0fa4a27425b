"""When an FID/KID is not comparable with other runs' numbers: too few images, or a dataset judge's features used on
other data. `genart eval` prints each reason as one warning line beside the number."""

from __future__ import annotations

from collections.abc import Sequence

from genart_lightning.metrics.suites import PromptSuite

MIN_FID_IMAGES = 2000
"""Below about this many real or generated images FID is biased upward, the more the fewer (Chong & Forsyth 2020,
"Effectively Unbiased FID and Inception Score"); 2048 is also the feature count of Inception's covariance."""


def sample_size_warning(generated: int, real: int, minimum: int = MIN_FID_IMAGES) -> str | None:
    """Why FID on `generated` and `real` images does not compare with other counts' FID, or None when both suffice."""
    small = [f"{n} {what}" for n, what in ((generated, "generated"), (real, "real")) if n < minimum]
    if not small:
        return None
    return (f"FID on {' and '.join(small)} images is biased upward (more so with fewer images); compare only runs with"
            f" the same counts, or use >= {minimum} of each (--num-samples, real images in --data)")


def features_data_warning(features: str, suites: Sequence[PromptSuite], captions: Sequence[str] | None) -> str | None:
    """Why a suite's features (`--fid-features judge`) on data that is not the suite's give incomparable FID/KID, or
    None; `captions`: some of the real data's (None: it has none)."""
    suite = next((s for s in suites if s.feature_name and s.feature_name == features), None)
    if suite is None or (captions and suite.recognises(captions)):
        return None
    why = f"its captions are not {suite.name} captions" if captions else "it has no captions to tell"
    return (f"--fid-features {features} uses the {suite.name} judge, trained on the {suite.name} dataset, and --data"
            f" {'is not' if captions else 'may not be'} {suite.name} data ({why}): its FID/KID compare only with runs on"
            " the same data and features, never with Inception FID (--fid-features inception, the default)")


def real_captions(data_urls: str | list[str], limit: int = 64) -> list[str] | None:
    """The first `limit` captions of the real data (shards, or a folder's samples.jsonl), None when it has none."""
    from genart_lightning.metrics.evaluator import data_captions
    from genart_lightning.metrics.image_folder import ImageFolder
    from genart_lightning.metrics.reference_stats import image_directory

    directory = image_directory(data_urls)
    if directory is not None:
        captions = ImageFolder(directory).captions
        return captions[:limit] if captions else None
    try:
        return data_captions(data_urls, limit)
    except ValueError:  # shards without KEY.txt
        return None


def comparability_warnings(result: dict, features: str, suites: Sequence[PromptSuite],
                           data_urls: str | list[str]) -> list[str]:
    """Each reason an evaluation's FID/KID (`result`, as the evaluator returns it) is not comparable, one line each."""
    lines = [sample_size_warning(result["num_samples"], result["reference"]["count"]),
             features_data_warning(features, suites, real_captions(data_urls))]
    return [line for line in lines if line]
