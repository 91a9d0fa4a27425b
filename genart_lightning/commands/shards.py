"""`genart shards`: write the shapes dataset or your own images as WebDataset shards, and inspect shards."""

from __future__ import annotations

import argparse
import os
import sys

from genart_lightning.commands import add_threads_option, use_cpu_threads


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("shards", help="write or inspect WebDataset text-image shards", description=__doc__)
    sub = p.add_subparsers(dest="shards_command", metavar="ACTION", required=True)

    shapes = sub.add_parser("shapes", help="procedural coloured-shapes dataset with captions (train + val)")
    shapes.add_argument("--out", required=True, help="output directory")
    shapes.add_argument("--num-samples", type=int, default=10_000, help="train + val samples (default 10000)")
    shapes.add_argument("--image-size", type=int, default=32, help="image side in pixels (default 32)")
    shapes.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    shapes.add_argument("--val-fraction", type=float, default=0.1, help="share of samples in val (default 0.1)")
    shapes.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    shapes.set_defaults(func=run_shapes)

    digits = sub.add_parser("digits", help="scikit-learn's handwritten digits, captioned (train, val, test; real data)")
    digits.add_argument("--out", required=True, help="output directory")
    digits.add_argument("--image-size", type=int, default=32, help="image side in pixels (default 32; 8 is native)")
    digits.add_argument("--limit", type=int, default=None, help="keep only the first N training images (small-data runs)")
    digits.set_defaults(func=run_digits)

    folder = sub.add_parser("from-folder", help="your images + captions (CSV/JSONL, HF imagefolder, .txt) -> shards")
    folder.add_argument("--images", required=True, help="folder of .jpg/.jpeg/.png/.webp images (searched recursively)")
    folder.add_argument("--captions", default=None,
                        help="CSV with header file,caption or JSONL {file, caption}; without it: the folder's Hugging Face"
                             " imagefolder metadata.jsonl/csv (file_name + text), else IMAGE.txt beside each image")
    folder.add_argument("--caption-column", default=None,
                        help="caption column of the metadata or --captions file (default: text, else caption;"
                             " in a --captions file: caption, else text)")
    folder.add_argument("--out", required=True, help="output directory")
    folder.add_argument("--resize", type=int, default=None, help="resize the shorter side to this many pixels")
    folder.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    folder.add_argument("--val-fraction", type=float, default=0.0, help="share of samples in a val split (default 0)")
    folder.add_argument("--empty-captions", action="store_true", help="keep images that have no caption")
    folder.add_argument("--skip-bad", action="store_true",
                        help="leave out the bad files (unreadable images, images without a caption), list each and"
                             " write the rest (default: list them all, write nothing, exit 2)")
    folder.set_defaults(func=run_from_folder)

    encode = sub.add_parser(
        "encode", help="image shards -> latent shards of a frozen first stage (and text encoder), to train from",
        description="Encode image shards once with a frozen VAE (and text encoder); latent diffusion then trains from "
                    "the output with --data.kind=latents. Under torchrun or srun each rank encodes its own shards.")
    source = encode.add_mutually_exclusive_group(required=True)
    source.add_argument("--first-stage", metavar="CKPT_OR_DIR",
                        help="genart VAE (or latent-diffusion) checkpoint, or a diffusers AutoencoderKL directory")
    source.add_argument("--pipeline", metavar="DIR", help="a diffusers pipeline directory: its VAE and text encoder(s), "
                        "read as a model built with pipeline: DIR reads them")
    encode.add_argument("--data", required=True, metavar="URLS", help="image shards: path, brace pattern (quote it), glob")
    encode.add_argument("--out", required=True, help="output directory (shards keep their names; latents.json records "
                                                     "what made them)")
    encode.add_argument("--text-encoder", default=None, metavar="NAME",
                        help="also cache this OpenCLIP text encoder's states (e.g. genart-tiny, ViT-H-14)")
    encode.add_argument("--pretrained", default=None, metavar="TAG", help="its pretrained tag or weights file")
    encode.add_argument("--text-layer", default=None, choices=("final", "penultimate"),
                        help="token states of this layer (as the model's text_layer; default final, or the pipeline's)")
    encode.add_argument("--text-cache-dir", default=None, help="where its pretrained weights are cached")
    encode.add_argument("--image-size", type=int, default=None,
                        help="resize + centre crop to this side (default: a genart VAE's own image_size)")
    encode.add_argument("--batch-size", type=int, default=32, help="images per encoder call (default 32)")
    encode.add_argument("--precision", default="float16", choices=("float16", "float32"),
                        help="stored dtype (default float16: half the bytes)")
    encode.add_argument("--device", default=None, help="default: this rank's GPU, else cpu")
    add_threads_option(encode)
    encode.set_defaults(func=run_encode)

    info = sub.add_parser("info", help="sample count, image sizes, caption lengths, unreadable entries")
    info.add_argument("urls", help="shard path, brace pattern (quote it) or pipe: URL")
    info.add_argument("--buckets", default=None, metavar="auto",
                      help="also show how many samples each aspect bucket gets (auto, as --data.buckets auto)")
    info.add_argument("--image-size", type=int, default=256, help="with --buckets: the square side (default 256)")
    info.add_argument("--bucket-step", type=int, default=64, help="with --buckets: sides multiples of this (default 64)")
    info.set_defaults(func=run_info)


def _print_urls(result: dict, notes: tuple[str, ...] = ()) -> None:
    for split in ("train", "val", "test"):
        if f"{split}_urls" in result:
            print(f"{split}: {result[f'num_{split}']} samples -> {result[f'{split}_urls']}")
    for note in notes:
        print(note)
    if "train_urls" in result:
        flags = f"--data.train_urls '{result['train_urls']}'"
        flags += f" --data.val_urls '{result['val_urls']}'" if "val_urls" in result else ""
        print(f"train with: genart fit --config CONFIG {flags}")


def _fail(exn: Exception) -> SystemExit:
    return SystemExit(f"error: {exn}")


# Library imports happen inside the commands so `genart --help` stays fast (no torch import).
def run_shapes(args: argparse.Namespace) -> None:
    from datamodules.synthetic import write_shapes_shards

    try:
        result = write_shapes_shards(args.out, args.num_samples, args.image_size, args.seed, args.val_fraction, args.shard_size)
    except ValueError as exn:
        raise _fail(exn) from None
    _print_urls(result)


def run_digits(args: argparse.Namespace) -> None:
    from datamodules.digits import write_digits_shards

    try:
        result = write_digits_shards(args.out, args.image_size, limit=args.limit)
    except (ImportError, ValueError) as exn:
        raise _fail(exn) from None
    _print_urls(result)


def run_from_folder(args: argparse.Namespace) -> None:
    from datamodules.shards import BadFolder, count_bad, from_folder

    try:
        result = from_folder(args.images, args.captions, args.out, args.resize, args.shard_size, args.val_fraction,
                             args.empty_captions, args.caption_column, args.skip_bad)
    except BadFolder as exn:  # every bad file, one a line, then the error line that counts them
        print("\n".join(f"  {bad.line()}" for bad in exn.bad), file=sys.stderr)
        raise _fail(exn) from None
    except (OSError, ValueError) as exn:
        raise _fail(exn) from None
    for bad in result["skipped"]:
        print(f"skipped {bad.line()}")
    notes = [f"skipped (--skip-bad): {count_bad(result['skipped'])}"] if result["skipped"] else []
    if n := result["empty_captions"]:
        notes.append(f"{n} empty caption{'s' * (n != 1)} (an empty caption file or cell): stored as unconditional samples")
    if n := result["uncaptioned"]:
        notes.append(f"{n} image{'s' * (n != 1)} without a caption stored with an empty one (--empty-captions)")
    _print_urls(result, tuple(notes))


def run_encode(args: argparse.Namespace) -> None:
    import torch

    from datamodules.webdataset import existing_shards
    from genart_lightning.models.latent_cache import encode_shards, load_first_stage
    from genart_lightning.nn.pipelines import read_pipeline
    from genart_lightning.nn.text_encoder import FrozenTextEncoder
    from genart_lightning.run.cluster import launcher_ranks

    rank, world, local_rank = launcher_ranks()
    try:
        urls = existing_shards(args.data, "data", flag="--data")
        if args.pipeline:
            index = read_pipeline(args.pipeline)
            first_stage, text = index.first_stage(), index.text_encoder(layer=args.text_layer).eval()
        else:
            first_stage = load_first_stage(args.first_stage)
            text = (FrozenTextEncoder(args.text_encoder, args.pretrained, args.text_cache_dir,
                                      layer=args.text_layer or "final").eval() if args.text_encoder else None)
        image_size = args.image_size or getattr(getattr(first_stage, "hparams", None), "image_size", None)
        if image_size is None:
            raise ValueError(f"pass --image-size: {args.first_stage or args.pipeline} does not record the image size "
                             "it was trained at")
        device = args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        use_cpu_threads(args.threads, device)
        counts = encode_shards(first_stage, text, urls, args.out, image_size, args.batch_size, args.precision, rank,
                               world, device)
    except (OSError, ValueError) as exn:
        raise _fail(exn) from None
    skipped = {k: v for k, v in counts.items() if k not in ("shards", "already_encoded", "samples")}
    print(f"rank {rank}/{world}: {counts.get('samples', 0)} samples encoded into {counts['shards'] - counts['already_encoded']}"
          f" shards of {args.out} ({counts['already_encoded']} already there)"
          + (f"; skipped {sum(skipped.values())} ({', '.join(f'{k}: {v}' for k, v in skipped.items())})" if skipped else ""))
    if rank == 0:
        pattern = f"{args.out.rstrip('/')}/{args.data.rsplit('/', 1)[-1]}"
        print(f"train with: genart fit --config CONFIG --data.kind latents --data.train_urls '{pattern}'")


def run_info(args: argparse.Namespace) -> None:
    from datamodules.shards import expand_urls, format_report, inspect_shards, is_local

    missing = [u for u in expand_urls(args.urls) if is_local(u) and not os.path.isfile(u)]
    if missing:
        raise SystemExit(f"error: shard not found: {missing[0]} ({len(missing)} missing); check the path or pattern")
    print(format_report(inspect_shards(args.urls)))
    if args.buckets:
        from datamodules.shards import bucket_histogram

        try:
            histogram = bucket_histogram(expand_urls(args.urls), args.buckets, args.image_size, args.bucket_step)
        except ValueError as exn:
            raise _fail(exn) from None
        print(f"aspect buckets at image_size {args.image_size}, step {args.bucket_step} (height x width: samples):")
        print("  " + ", ".join(f"{h}x{w}: {n}" for (h, w), n in histogram.items()))
