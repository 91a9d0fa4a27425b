"""`genart sample`: images from any family checkpoint, as a grid and/or one PNG per sample with a samples.jsonl."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from genart_lightning.commands import (
    add_threads_option,
    int_pair,
    interval_option,
    require_checkpoint,
    use_cpu_threads,
)

SAMPLING_OPTIONS = [
    ("steps", int, "number of sampling steps"),
    ("sampler", str, "sampler name, e.g. ddpm, ddim, dpmpp_2m"),
    ("guidance", float, "classifier-free guidance scale (1 = plain conditional)"),
    ("eta", float, "DDIM noise: 0 deterministic, 1 like DDPM"),
    ("guidance_interval", str, "LO,HI: guide only at noise levels sigma/alpha in (LO, HI], e.g. 0.3,5"),
    ("height", int, "image height in pixels, a multiple of the backbone's step (diffusion; default image_size)"),
    ("width", int, "image width in pixels, a multiple of the backbone's step (diffusion; default image_size)"),
    ("original_size", int_pair, "H,W: the original image size a size-reading backbone (SDXL) is told; default the "
                                "sample's size"),
    ("crop_top_left", int_pair, "TOP,LEFT: the crop corner a size-reading backbone (SDXL) is told; default 0,0"),
]
"""Options forwarded to `model.sample` only when set, so families without them still work."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sample", help="draw samples from a checkpoint: a grid, or one PNG per sample", description=__doc__,
        epilog="--out-dir writes what clean-fid, torch-fidelity, `genart eval --fake` and human raters read.",
    )
    p.add_argument("--ckpt", required=True, help="checkpoint written by `genart fit` (.ckpt) or `genart export`")
    p.add_argument("--num", type=int, default=16, help="number of images (default 16)")
    p.add_argument("--prompt", action="append", help="caption for conditional families; repeat for several (cycled)")
    p.add_argument("--prompts-file", help="captions, one per line, or JSONL with a caption/prompt/text field (cycled)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed: same seed and batch size, same images")
    p.add_argument("--out", default=None, help="grid PNG (default grid.png when --out-dir is not given)")
    p.add_argument("--out-dir", default=None, help="write one PNG per sample and samples.jsonl (file, caption, seed, settings)")
    p.add_argument("--batch-size", type=int, default=64, help="images per sampling call (default 64)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    add_threads_option(p)
    for name, kind, text in SAMPLING_OPTIONS:
        default = "" if "default" in text else "; default: the checkpoint's config"
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=f"{text} (families that take it{default})")
    p.set_defaults(func=run)


def read_prompts(path: str) -> list[str]:
    """Captions from a text file (one per line) or JSONL (`caption`, `prompt` or `text` field); blank lines skipped."""
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"error: prompts file not found: {file} (from --prompts-file); pass a text or JSONL file")
    prompts = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if file.suffix == ".jsonl":
            record = json.loads(line)
            field = next((k for k in ("caption", "prompt", "text") if k in record), None)
            if field is None:
                raise SystemExit(f"error: line {number} of {file} has no caption, prompt or text field; add one")
            prompts.append(str(record[field]))
        else:
            prompts.append(line.strip())
    if not prompts:
        raise SystemExit(f"error: {file} holds no prompts (from --prompts-file)")
    return prompts


def check_sampler_name(name: str | None) -> None:
    """A wrong --sampler is one line listing the samplers, before the checkpoint loads."""
    from genart_lightning.diffusion.samplers import check_sampler

    if name is not None:
        try:
            check_sampler(name)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None


def run(args: argparse.Namespace) -> None:
    require_checkpoint(args.ckpt)
    import torch
    from tqdm import tqdm

    from genart_lightning import UserError
    from genart_lightning.metrics.evaluator import chunk_seed, sample_options
    from genart_lightning.models.grids import enlarged_path, save_grid, save_images
    from genart_lightning.models.loading import load_model

    if args.num < 1 or args.batch_size < 1:
        raise SystemExit(f"error: --num {args.num} and --batch-size {args.batch_size} must be >= 1")
    prompts = (args.prompt or []) + (read_prompts(args.prompts_file) if args.prompts_file else [])
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    check_sampler_name(args.sampler)
    args.guidance_interval = interval_option(args.guidance_interval)
    use_cpu_threads(args.threads, device)
    model = load_model(args.ckpt, map_location=device).to(device)
    if prompts and not model.conditional:
        raise SystemExit(f"error: {type(model).__name__} is unconditional; drop --prompt / --prompts-file")
    captions = [prompts[i % len(prompts)] for i in range(args.num)] if prompts else None
    try:
        options = sample_options(model.sample, {name: getattr(args, name) for name, _, _ in SAMPLING_OPTIONS})
        settings = model.sampling_settings(options)  # a size the backbone cannot take is one line here
    except (ValueError, UserError) as err:
        raise SystemExit(f"error: {err}") from None
    images, records = [], []
    starts = range(0, args.num, args.batch_size)
    for chunk, start in enumerate(tqdm(starts, desc="sampling", unit="batch", disable=len(starts) == 1)):
        stop = min(start + args.batch_size, args.num)
        seed = chunk_seed(args.seed, chunk)
        batch_captions = captions[start:stop] if captions else None
        batch = model.sample(stop - start, captions=batch_captions, seed=seed, **options).float().cpu()
        images.append(batch)
        records += [{"index": start + i, "caption": batch_captions[i] if batch_captions else "", "seed": seed,
                     "index_in_batch": i} for i in range(stop - start)]
    images = torch.cat(images)
    if args.out_dir:
        files = save_images(images, args.out_dir)
        with (Path(args.out_dir) / "samples.jsonl").open("w") as f:
            for record, file in zip(records, files, strict=True):
                f.write(json.dumps({"file": file.name, **record, "checkpoint": str(Path(args.ckpt).resolve()),
                                    "settings": settings}) + "\n")
        print(f"wrote {len(files)} PNGs and samples.jsonl to {args.out_dir}")
    if args.out or not args.out_dir:
        grid = save_grid(images, args.out or "grid.png", captions=captions)
        large = enlarged_path(grid)
        print(f"wrote {grid} ({args.num} samples)" + (f" and {large} (enlarged for viewing)" if large.is_file() else ""))
