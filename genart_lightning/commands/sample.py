"""`genart sample`: a grid of samples from any family checkpoint."""

from __future__ import annotations

import argparse

SAMPLING_OPTIONS = [
    ("steps", int, "number of sampling steps"),
    ("sampler", str, "sampler name, e.g. ddpm, ddim, dpmpp_2m"),
    ("guidance", float, "classifier-free guidance scale (1 = plain conditional)"),
    ("eta", float, "DDIM noise: 0 deterministic, 1 like DDPM"),
]
"""Options forwarded to `model.sample` only when set, so families without them still work."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sample", help="draw a grid of samples from a checkpoint", description=__doc__)
    p.add_argument("--ckpt", required=True, help="checkpoint written by `genart fit` (.ckpt)")
    p.add_argument("--num", type=int, default=16, help="number of images (default 16)")
    p.add_argument("--prompt", action="append", help="caption for conditional families; repeat for several (cycled)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed: same seed, same grid")
    p.add_argument("--out", default="grid.png", help="output PNG (default grid.png)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    for name, kind, text in SAMPLING_OPTIONS:
        p.add_argument(f"--{name}", type=kind, default=None, help=f"{text} (families that take it; default: the checkpoint's config)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from genart_lightning.metrics.evaluator import sample_options
    from genart_lightning.models.grids import save_grid
    from genart_lightning.models.loading import load_model

    model = load_model(args.ckpt, map_location=args.device).to(args.device)
    captions = None
    if args.prompt:
        if not model.conditional:
            raise SystemExit(f"error: {type(model).__name__} is unconditional; drop --prompt")
        captions = [args.prompt[i % len(args.prompt)] for i in range(args.num)]
    try:
        options = sample_options(model.sample, {name: getattr(args, name) for name, _, _ in SAMPLING_OPTIONS})
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    images = model.sample(args.num, captions=captions, seed=args.seed, **options)
    print(f"wrote {save_grid(images, args.out)} ({args.num} samples)")
