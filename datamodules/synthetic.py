"""Procedural "shapes" text-image dataset: coloured shapes with attribute captions, for demos, tests and evaluation.

Every image holds one shape (circle, square, triangle) of a palette colour, size and position on a background of
another palette colour; the caption names those attributes through one of several paraphrase templates, and
KEY.json keeps the attributes so text control can be scored offline (`dominant_shape_colour`).
"""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from datamodules.shards import brace_pattern, write_shards

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
"""Palette, chosen so every pair is far apart in RGB (smallest distance ~80) and colours survive JPEG/generation noise."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 0.3, "large": 0.6}
"""Shape extent as a fraction of the image side."""
POSITIONS: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
"""Position name -> phrase used in captions."""

TEMPLATES: tuple[str, ...] = (
    "{a_size} {size} {colour} {shape} {where}, {background} background",
    "a picture of {a_size} {size} {colour} {shape} {where} on {a_bg} {background} background",
    "{size} {colour} {shape} {where}, {background} backdrop",
    "an image showing {a_colour} {colour} {shape} ({size}) {where} against {background}",
    "{a_bg} {background} background with {a_size} {size} {colour} {shape} {where}",
)
_DIRECTION = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1), "centre": (0, 0)}
_MARGIN = 0.05


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_for(attrs: dict, template: int) -> str:
    """Caption of a sample's attributes using paraphrase template number `template`."""
    fields = {k: attrs[k] for k in ("size", "colour", "shape", "background")}
    fields["where"] = POSITIONS[attrs["position"]]
    fields.update(a_size=_article(attrs["size"]), a_colour=_article(attrs["colour"]), a_bg=_article(attrs["background"]))
    return TEMPLATES[template % len(TEMPLATES)].format(**fields)


def random_attributes(rng: random.Random, colour: str | None = None) -> dict:
    """Draw shape, colour (or use the given one), size, position and a background colour different from the shape's."""
    colour = colour if colour is not None else rng.choice(list(COLOURS))
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; choose one of {', '.join(COLOURS)}")
    return {
        "shape": rng.choice(SHAPES),
        "colour": colour,
        "size": rng.choice(list(SIZES)),
        "position": rng.choice(list(POSITIONS)),
        "background": rng.choice([c for c in COLOURS if c != colour]),
        "template": rng.randrange(len(TEMPLATES)),
    }


def caption_with_colour(colour: str, rng: random.Random) -> str:
    """A random shapes caption whose shape has the given colour (prompts for text-control tests)."""
    return caption_for(random_attributes(rng, colour), rng.randrange(len(TEMPLATES)))


def draw(attrs: dict, image_size: int, jitter: tuple[float, float] = (0.0, 0.0)) -> Image.Image:
    """Render attributes to an RGB image; no anti-aliasing so every pixel is a pure palette colour."""
    image = Image.new("RGB", (image_size, image_size), COLOURS[attrs["background"]])
    extent = SIZES[attrs["size"]] * image_size
    reach = 0.5 * image_size - 0.5 * extent - _MARGIN * image_size
    dx, dy = _DIRECTION[attrs["position"]]
    cx = 0.5 * image_size + dx * reach + jitter[0] * reach
    cy = 0.5 * image_size + dy * reach + jitter[1] * reach
    half = 0.5 * extent
    box = (cx - half, cy - half, cx + half - 1, cy + half - 1)
    pen = ImageDraw.Draw(image)
    fill = COLOURS[attrs["colour"]]
    if attrs["shape"] == "circle":
        pen.ellipse(box, fill=fill)
    elif attrs["shape"] == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    return image


def render_sample(rng: random.Random, image_size: int = 32) -> tuple[Image.Image, dict, str]:
    """One random sample: (image, attributes, caption); the rng fully determines it."""
    attrs = random_attributes(rng)
    # Small jitter around the named position so images are not 240 fixed pictures; stays within the margin.
    jitter = (rng.uniform(-0.15, 0.15), rng.uniform(-0.15, 0.15))
    return draw(attrs, image_size, jitter), attrs, caption_for(attrs, attrs["template"])


def _encode(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # PNG has no timestamp: same pixels, same bytes
    return buffer.getvalue()


def _samples(split: str, indices: range, image_size: int, seed: int):
    for index in indices:
        image, attrs, caption = render_sample(random.Random(f"shapes-{seed}-{index}"), image_size)
        yield {
            "__key__": f"{split}{index:08d}",
            "png": _encode(image),
            "txt": caption.encode(),
            "json": json.dumps({**attrs, "caption": caption}, sort_keys=True).encode(),
        }


def write_shapes_shards(
    out_dir: str | os.PathLike,
    num_samples: int,
    image_size: int = 32,
    seed: int = 0,
    val_fraction: float = 0.1,
    samples_per_shard: int = 1000,
) -> dict:
    """Write train-NNNNNN.tar / val-NNNNNN.tar shards of the shapes dataset; same arguments, same bytes.

    Returns {"train_urls", "val_urls" (brace patterns), "num_train", "num_val", "train_shards", "val_shards"}.
    """
    if num_samples < 2 or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"need num_samples >= 2 and 0 < val_fraction < 1, got {num_samples}, {val_fraction}")
    if image_size < 8:
        raise ValueError(f"image_size {image_size} is too small to draw shapes; use >= 8")
    num_val = max(1, round(num_samples * val_fraction))
    num_train = num_samples - num_val
    out = Path(out_dir)
    train = write_shards(_samples("train", range(num_train), image_size, seed), out, "train", samples_per_shard)
    val = write_shards(_samples("val", range(num_train, num_samples), image_size, seed), out, "val", samples_per_shard)
    return {
        "train_urls": brace_pattern([p for p, _ in train]),
        "val_urls": brace_pattern([p for p, _ in val]),
        "num_train": num_train,
        "num_val": num_val,
        "train_shards": [p for p, _ in train],
        "val_shards": [p for p, _ in val],
    }


def dominant_shape_colour(images: Tensor, min_distance: float = 60.0) -> list[str]:
    """Palette name of the shape in each image in [-1, 1] [B,3,H,W]; "none" where no shape stands out.

    Pixels are smoothed 3x3 (generated images are noisy), the background is the median colour of the border
    pixels, and pixels farther than `min_distance` (0-255 RGB units) and near the farthest from it vote for their
    nearest palette colour other than the background's.
    """
    names = list(COLOURS)
    return [names[i] if i >= 0 else "none" for chunk in images.split(256) for i in _shape_colour_index(chunk, min_distance)]


def _shape_colour_index(images: Tensor, min_distance: float) -> list[int]:
    x = (images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5
    x = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    rgb = x.permute(0, 2, 3, 1)  # [B,H,W,3]
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32)
    border = torch.cat([rgb[:, 0], rgb[:, -1], rgb[:, :, 0], rgb[:, :, -1]], dim=1)  # [B,4W,3]
    background = border.median(dim=1).values  # [B,3]
    pixels = rgb.reshape(len(rgb), -1, 3)  # [B,HW,3]
    from_bg = (pixels - background[:, None]).norm(dim=2)  # [B,HW]
    # Only the shape's core votes: smoothed edge pixels are blends that can sit nearer a third colour.
    threshold = (0.7 * from_bg.amax(dim=1)).clamp(min=min_distance)
    voters = from_bg > threshold[:, None]
    dist = torch.cdist(pixels, palette.expand(len(pixels), -1, -1))  # [B,HW,P]
    bg_index = torch.cdist(background[:, None], palette.expand(len(pixels), -1, -1)).argmin(dim=2)  # [B,1]
    dist.scatter_(2, bg_index[:, None].expand(-1, dist.shape[1], 1), float("inf"))  # never the background's colour
    votes = torch.nn.functional.one_hot(dist.argmin(dim=2), len(palette)).mul(voters[..., None]).sum(dim=1)
    return torch.where(voters.any(dim=1), votes.argmax(dim=1), -1).tolist()
