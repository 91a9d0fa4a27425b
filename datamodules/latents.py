"""Latent shards: what `genart shards encode` writes and `kind: latents` reads, in the img2dataset layout.

A sample is `KEY.latent.npy` (the first stage's scaled latent, [C, h, w]), `KEY.txt` (the caption, kept so
samples stay inspectable and so a text tower trained along can still read it) and, when the text encoder was
cached, `KEY.text.npz` (arrays `tokens` [L, D], `mask` [L], `pooled` [E]: one member, three arrays). Arrays are
read with `allow_pickle=False` only. `latents.json` beside the shards records what made them, so training over a
cache made by another first stage or text encoder stops before its first step.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
from webdataset.gopen import gopen

CACHE_FILE = "latents.json"
CACHE_FORMAT = "genart-latents/1"
LATENT_MEMBER, TEXT_MEMBER = "latent.npy", "text.npz"
TEXT_ARRAYS = ("tokens", "mask", "pooled")


class CacheMismatch(ValueError):
    """A latent cache made by another first stage or text encoder than the model trains over."""


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def load_array(data: bytes) -> np.ndarray:
    """One .npy member; never unpickles (an object array is refused)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def load_text(data: bytes) -> dict[str, np.ndarray]:
    """The cached text states of one sample: tokens, mask, pooled."""
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        missing = [name for name in TEXT_ARRAYS if name not in arrays.files]
        if missing:
            raise ValueError(f"text.npz lacks {', '.join(missing)}")
        return {name: arrays[name] for name in TEXT_ARRAYS}


def latent_sample(key: str, caption: str, latent: np.ndarray, text: dict[str, np.ndarray] | None) -> dict:
    """The tar members of one latent sample (arrays already in the cache's precision)."""
    sample = {"__key__": key, "txt": caption.encode(), LATENT_MEMBER: npy_bytes(latent)}
    if text is not None:
        sample[TEXT_MEMBER] = npz_bytes(text)
    return sample


def write_cache_info(out_dir: str | os.PathLike, info: dict) -> None:
    """Record what made the cache in out_dir/latents.json; refuses a directory that holds another cache.

    Every rank of a distributed encode writes the same content, each through its own temporary file."""
    path = Path(out_dir) / CACHE_FILE
    info = {"format": CACHE_FORMAT, **info}
    if path.exists():
        known = json.loads(path.read_text())
        if known != info:
            raise CacheMismatch(f"{path} records another cache ({describe(known)}), this encode is {describe(info)};"
                                " choose another --out")
        return
    temporary = path.with_name(f".{CACHE_FILE}.{os.getpid()}")
    temporary.write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    os.replace(temporary, path)


def read_cache_info(urls: list[str]) -> dict:
    """The one `latents.json` of the directories holding `urls`; one line when it is missing or they disagree."""
    infos: dict[str, dict] = {}
    for url in urls:
        if url.startswith("pipe:"):
            raise ValueError(f"latent shards are read by path or URL, not through {url!r}: the cache record "
                             f"{CACHE_FILE} must be found beside them")
        directory = url.rsplit("/", 1)[0] if "/" in url else "."
        if directory in infos:
            continue
        source = f"{directory}/{CACHE_FILE}"
        try:
            with gopen(source) as stream:  # a local path or any URL webdataset opens
                text = stream.read().decode()
        except OSError:
            raise FileNotFoundError(f"no {CACHE_FILE} beside {url}: these are not latent shards (data.kind=latents);"
                                    " write them with `genart shards encode`, or set --data.kind=images") from None
        infos[directory] = json.loads(text)
    first, *rest = infos.items()
    for directory, info in rest:
        if info != first[1]:
            raise CacheMismatch(f"latent shards in {first[0]} ({describe(first[1])}) and {directory}"
                                f" ({describe(info)}) were made differently; encode them with the same first stage")
    return first[1]


def describe(info: dict) -> str:
    """A short human line for a cache record (or a model's): which first stage, scale and text encoder."""
    stage = info.get("first_stage") or {}
    text = info.get("text_encoder")
    words = f"first stage {stage.get('class', '?')} sha256 {stage.get('sha256', '?')} scaling {stage.get('scaling', '?')}"
    if text:
        words += f", text {text.get('model')} ({text.get('pretrained')}, {text.get('layer')}) sha256 {text.get('sha256')}"
    return words
