"""A small real captioned dataset that is there offline: scikit-learn's 1,797 handwritten digits (UCI, 8x8, 17 grey
levels, about 180 per class), upscaled and captioned in several phrasings.

Real handwriting from 43 writers, unlike the procedural shapes: the quality benchmark and the regression guard use it
to check that a text-to-image model draws the digit its prompt names, with the variety of the real images.
scikit-learn (a dev extra) is imported only when shards are written.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.shards import brace_pattern, write_shards

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a handwritten digit {name}", "the number {digit}, written by hand", "a scan of a hand-drawn {name}")
"""Caption phrasings; each image gets one, chosen by its index."""
SPLITS = ("train", "val", "test")


def caption(digit: int, template: int) -> str:
    """Caption of `digit` in phrasing number `template`."""
    return TEMPLATES[template % len(TEMPLATES)].format(name=NAMES[digit], digit=digit)


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 8, 8] scaled to 0..255 with ink dark on white, labels [N]) from scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("the digits dataset needs scikit-learn: pip install scikit-learn (it is in the dev extra)") from err
    data = load_digits()
    ink = data.images / 16.0  # 0..16 ink levels
    return np.round(255 * (1 - ink)).astype(np.uint8), data.target.astype(np.int64)


def split_indices(labels: np.ndarray, held_out: float = 0.2, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-class stratified split: `held_out` of each class, halved into val and test; the rest train."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit))
        n_out = round(len(members) * held_out)
        parts["val"].append(members[: n_out // 2])
        parts["test"].append(members[n_out // 2 : n_out])
        parts["train"].append(members[n_out:])
    return {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}


def upscale(image: np.ndarray, image_size: int) -> np.ndarray:
    """An 8x8 grey image -> [image_size, image_size, 3] uint8, bicubic (strokes, not blocks)."""
    big = Image.fromarray(image).resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.repeat(np.asarray(big)[:, :, None], 3, axis=2)


def write_digits_shards(out_dir: str | os.PathLike, image_size: int = 32, samples_per_shard: int = 256,
                        held_out: float = 0.2, seed: int = 0, limit: int | None = None) -> dict:
    """Write train/val/test shards (PNG, caption, KEY.json with the digit); same arguments, same bytes.

    `limit` keeps the first `limit` training images (small-data runs); val and test stay whole. Returns the brace
    pattern and sample count of each split (`train_urls`, `num_train`, ...).
    """
    images, labels = load_digits_arrays()
    out, info = Path(out_dir), {}
    for split, indices in split_indices(labels, held_out, seed).items():
        indices = indices[:limit] if split == "train" and limit is not None else indices

        def samples(indices: np.ndarray = indices, split: str = split):
            for i in indices.tolist():
                buffer = io.BytesIO()
                Image.fromarray(upscale(images[i], image_size)).save(buffer, format="PNG")
                digit = int(labels[i])
                yield {"__key__": f"{split}{i:05d}", "png": buffer.getvalue(), "txt": caption(digit, i).encode(),
                       "json": json.dumps({"digit": digit}).encode()}

        shards = write_shards(samples(), out, split, samples_per_shard)
        info[f"{split}_urls"], info[f"num_{split}"] = brace_pattern([p for p, _ in shards]), len(indices)
        info[f"{split}_shards"] = [p for p, _ in shards]
    return info
