"""Encode once, train many times: image shards -> latent shards of a frozen first stage (and text encoder).

The first stage and the text encoder are frozen while latent diffusion trains, so their outputs are the same every
epoch; encoding them once (as MosaicML's Stable Diffusion runs and kohya's `cache_latents` do) takes both off the
training step. Each input shard becomes one output shard of the same name, written to a temporary file and renamed,
so ranks of a distributed encode write disjoint files, and an interrupted encode resumes by skipping finished shards.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from datamodules.latents import CacheMismatch, describe, latent_sample, write_cache_info
from datamodules.shards import count_samples, record_sizes
from datamodules.stream import ShardStream, StreamConfig, Transform
from genart_lightning.models.base import FirstStage
from genart_lightning.models.loading import load_model
from genart_lightning.nn.diffusers_parts import DiffusersAutoencoder
from genart_lightning.nn.frozen import weights_digest
from genart_lightning.nn.text_encoder import FrozenTextEncoder


def load_first_stage(source: str) -> FirstStage:
    """A diffusers `AutoencoderKL` directory, a genart VAE checkpoint, or a latent-diffusion checkpoint's VAE."""
    if Path(source).is_dir():
        return DiffusersAutoencoder(source).eval()
    model = load_model(source)
    first_stage = getattr(model, "first_stage", model)
    if not all(hasattr(first_stage, name) for name in ("encode", "latent_shape", "scaling")):
        raise ValueError(f"{source} holds a {type(model).__name__}, not a first stage; pass a VAE checkpoint, a "
                         "latent-diffusion checkpoint or a diffusers AutoencoderKL directory")
    return first_stage.eval()


def first_stage_record(first_stage: FirstStage) -> dict:
    """What a first stage is, for the cache: its class, a hash of its weights and its latent scale (not its path,
    so a moved checkpoint still matches)."""
    fingerprint = getattr(first_stage, "fingerprint", None)
    digest = fingerprint()["sha256"] if fingerprint is not None else weights_digest(first_stage)
    return {"class": type(first_stage).__qualname__, "sha256": digest, "scaling": round(float(first_stage.scaling), 8)}


def text_record(encoder: FrozenTextEncoder) -> dict:
    """What a text encoder is, for the cache: its fingerprint and the layer whose token states were kept."""
    return dict(encoder.fingerprint()) | {"layer": encoder.layer}


def cache_record(first_stage: FirstStage, text_encoder: FrozenTextEncoder | None, image_size: int) -> dict:
    return {"first_stage": first_stage_record(first_stage), "image_size": image_size,
            "latent_shape": list(first_stage.latent_shape(image_size)),
            "text_encoder": text_record(text_encoder) if text_encoder is not None else None}


def check_cache(cache: dict, first_stage: FirstStage, text_encoder: FrozenTextEncoder | None, image_size: int) -> None:
    """Refuse, in one line naming both, a cache another first stage (or image size, or text encoder) made.
    `text_encoder` is the encoder whose cached states the model would read; None when it reads none."""
    ours = cache_record(first_stage, text_encoder, image_size)
    same_text = text_encoder is None or cache.get("text_encoder") in (None, ours["text_encoder"])
    if cache.get("first_stage") != ours["first_stage"] or cache.get("latent_shape") != ours["latent_shape"] or not same_text:
        theirs = {**cache, "text_encoder": cache.get("text_encoder") if text_encoder is not None else None}
        raise CacheMismatch(f"the latent shards were made by {describe(theirs)} at image_size {cache.get('image_size')}, "
                            f"this model has {describe(ours)} at image_size {image_size}; re-encode them with "
                            "`genart shards encode` or train from images (--data.kind=images)")


@torch.no_grad()
def encode_shards(
    first_stage: FirstStage,
    text_encoder: FrozenTextEncoder | None,
    urls: list[str],
    out_dir: str | os.PathLike,
    image_size: int,
    batch_size: int = 32,
    precision: str = "float16",
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    require_caption: bool = True,
) -> dict:
    """Encode this rank's share of `urls` (every `world_size`-th shard) into `out_dir`; returns counts.

    Images go through the same reader, decoders and resize + centre crop as training (`ShardStream`), so unusable
    samples are counted and skipped the same way."""
    names = [url.rsplit("/", 1)[-1] for url in urls]
    if len(set(names)) != len(names):
        repeated = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"two input shards are called {repeated}; output shards keep their names, so encode each "
                         "directory to its own --out")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_cache_info(out, cache_record(first_stage, text_encoder, image_size) | {"precision": precision})
    dtype = np.dtype(precision)
    first_stage.to(device)
    if text_encoder is not None:
        text_encoder.to(device)
    mine = [(url, out / name) for url, name in list(zip(urls, names, strict=True))[rank::world_size]]
    todo = [(url, target) for url, target in mine if not target.exists()]
    totals = Counter(shards=len(mine), already_encoded=len(mine) - len(todo))
    progress = tqdm(total=sum(count_samples(url, require_caption) for url, _ in todo), unit="img",
                    desc=f"encoding (rank {rank}/{world_size})", position=rank, disable=None)
    for url, target in todo:
        stream = ShardStream(StreamConfig(
            urls=[url], stage="val", mode="exact", batch_size=batch_size, transform=Transform(image_size), rank=0,
            world_size=1, num_workers=0, seed=0, epoch=0, require_caption=require_caption, strict=False,
            shuffle_buffer=1))
        temporary = target.with_name(f".{target.name}.rank{rank}.tmp")
        written = 0
        with wds.TarWriter(str(temporary), encoder=False, mtime=0, user="genart", group="genart", mode=0o644) as writer:
            for batch in stream:
                if "key" not in batch:
                    totals.update(batch["__skipped__"][0])
                    continue
                images = torch.as_tensor(batch["image"]).to(device)
                latents = first_stage.encode(images).float().cpu().numpy().astype(dtype)
                text = _text_arrays(text_encoder, batch["caption"], dtype) if text_encoder is not None else None
                for i, (key, caption) in enumerate(zip(batch["key"], batch["caption"], strict=True)):
                    writer.write(latent_sample(key, caption, latents[i],
                                               {k: v[i] for k, v in text.items()} if text is not None else None))
                written += len(batch["key"])
                progress.update(len(batch["key"]))
        os.replace(temporary, target)  # a finished shard appears whole, or not at all
        record_sizes(out, {target.name: written})
        totals["samples"] += written
    progress.close()
    return dict(totals)


def _text_arrays(encoder: FrozenTextEncoder, captions: list[str], dtype: np.dtype) -> dict[str, np.ndarray]:
    emb = encoder(captions)
    return {"tokens": emb.tokens.float().cpu().numpy().astype(dtype), "mask": emb.mask.cpu().numpy(),
            "pooled": emb.pooled.float().cpu().numpy().astype(dtype)}


def cached_conditioning(batch: dict, keep: torch.Tensor, unconditional: dict[str, torch.Tensor],
                        conditioning: str) -> dict[str, torch.Tensor]:
    """The backbone's conditioning inputs from a batch's cached text states; rows where `keep` is False get the
    unconditional ("" caption) states, as caption dropout would have encoded them."""
    rows = keep.to(batch["text_tokens"].device)
    def pick(cached: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (cached.dim() - 1)
        return torch.where(rows.view(shape), cached, empty.to(cached.dtype).expand_as(cached))
    cond: dict[str, torch.Tensor] = {}
    if conditioning in ("both", "tokens"):
        cond |= {"context": pick(batch["text_tokens"], unconditional["context"]),
                 "context_mask": pick(batch["text_mask"], unconditional["context_mask"])}
    if conditioning in ("both", "pooled"):
        cond["pooled"] = pick(batch["text_pooled"], unconditional["pooled"])
    return cond
