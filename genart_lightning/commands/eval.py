"""`genart eval`: FID/KID (+ FD-DINOv2, precision/recall), CLIP score or attribute accuracy of a checkpoint; several
--guidance values make a sweep."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

from genart_lightning.commands import add_threads_option, interval_option, require_checkpoint, use_cpu_threads

TABLE_COLUMNS = ("guidance", "fid", "kid", "fd_dinov2", "precision", "recall", "clip_score", "attribute_accuracy", "psnr",
                 "ssim")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="score a checkpoint: FID/KID, FD-DINOv2, precision/recall, CLIP score, attribute accuracy; guidance sweeps", description=__doc__,
        epilog="Multi-GPU: torchrun --nproc_per_node 4 -m genart_lightning.cli eval ... (each rank samples its share).",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="checkpoint written by `genart fit` (.ckpt) or `genart export`: sample and score it")
    source.add_argument("--fake", help="a folder of images to score instead (any model's; captions from its samples.jsonl)")
    p.add_argument("--data", required=True, nargs="+",
                   help="real data: shards (paths, globs, brace patterns: data/val-*.tar) or one folder of images")
    p.add_argument("--num-samples", type=int, default=10_000, help="generated images (default 10000; 50000 for published FID)")
    p.add_argument("--guidance", type=float, nargs="+", help="classifier-free guidance scale(s); several = a sweep (table + plot)")
    p.add_argument("--steps", type=int, help="sampling steps (diffusion)")
    p.add_argument("--sampler", help="sampler name (diffusion, e.g. ddim)")
    p.add_argument("--guidance-interval",
                   help="LO,HI: guide only at noise levels sigma/alpha in (LO, HI], e.g. 0.3,5 (diffusion)")
    p.add_argument("--height", type=int, help="sample height in pixels (diffusion; default image_size; scored "
                   "resized and centre-cropped to image_size, as the real images are)")
    p.add_argument("--width", type=int, help="sample width in pixels (diffusion; default image_size)")
    p.add_argument("--fid-features", default="inception",
                   help="FID/KID features: inception (the default: the standard Inception-v3 pool3, comparable with "
                        "published FID), judge (the shapes judge's) or digits (the digits judge's): offline, comparable "
                        "only on their own dataset; or a TorchScript .pt")
    p.add_argument("--fid-weights", help="local Inception weights file (offline nodes); default: the torch hub cache")
    p.add_argument("--fd-dinov2", metavar="PATH_OR_ID",
                   help="also FD-DINOv2 (as EDM2 reports): a transformers Dinov2Model save_pretrained directory, or a hub "
                        "id already in the hub cache (EDM2's: facebook/dinov2-large); nothing is downloaded")
    p.add_argument("--precision-recall", nargs="?", const="fid", choices=("fid", "dinov2"),
                   help="also improved precision/recall (Kynkaanniemi et al. 2019) on the FID features (the default) or "
                        "on DINOv2's (needs --fd-dinov2)")
    p.add_argument("--precision-recall-k", type=int, default=3, help="nearest neighbours of precision/recall (default 3)")
    p.add_argument("--clip-model", help="OpenCLIP model for CLIP score, e.g. ViT-B-32 (default: no CLIP score)")
    p.add_argument("--clip-pretrained", help="OpenCLIP tag (e.g. laion2b_s34b_b79k) or a local weights file")
    p.add_argument("--prompts", choices=("auto", "shapes", "digits", "data"), default="auto",
                   help="conditional families: shapes (attribute accuracy), digits (digit accuracy and spread), data (the "
                        "shards' captions), auto (detect)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--batch-size", type=int, default=64, help="images per sampling call and per rank (default 64)")
    p.add_argument("--cache-dir", help="reference statistics cache (default $GENART_CACHE/fid_stats or ~/.cache/genart/fid_stats)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    add_threads_option(p)
    p.add_argument("--out", default="metrics.json", help="output JSON (sweeps add .csv, .md and .png beside it)")
    p.set_defaults(func=run)


def _init_distributed(device: str) -> str:
    """Join the torchrun process group when launched with several ranks; returns this rank's device."""
    import torch
    import torch.distributed as dist

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(device)
    return device


def run(args: argparse.Namespace) -> None:
    if args.ckpt:
        require_checkpoint(args.ckpt)
    from genart_lightning.metrics.features import WeightsMissingError
    from genart_lightning.nn.text_encoder import WeightsNotFoundError

    try:
        evaluate_checkpoint(args)
    except (WeightsMissingError, WeightsNotFoundError, FileNotFoundError) as err:  # user input: one line, no traceback
        raise SystemExit(f"error: {err}") from None


def evaluate_checkpoint(args: argparse.Namespace) -> None:
    """Evaluate at each guidance scale, write metrics.json (+ table and plot for a sweep) on rank 0."""
    from datamodules.distributed import rank_world
    from genart_lightning.commands.sample import check_sampler_name
    from genart_lightning.digits.suite import DigitsSuite
    from genart_lightning.metrics.evaluator import Evaluator
    from genart_lightning.metrics.image_folder import ImageFolder
    from genart_lightning.models.loading import load_model
    from genart_lightning.shapes.suite import ShapesSuite

    device = _init_distributed(args.device)
    use_cpu_threads(args.threads, device)
    suites = [ShapesSuite(), DigitsSuite()]
    if args.fake:
        folder = ImageFolder(args.fake)
        evaluator = Evaluator(args.data, len(folder.files), args.fid_features, fid_weights=args.fid_weights,
                              clip_model=args.clip_model, clip_pretrained=args.clip_pretrained, batch_size=args.batch_size,
                              cache_dir=args.cache_dir, progress=True, suites=suites, **extra_metrics(args))
        results = [{**evaluator.score_folder(folder, device), "data": args.data}]
        if rank_world()[0] == 0:
            write_results(results, Path(args.out))
            warn_if_not_comparable(results[0], args, suites)
        return
    check_sampler_name(args.sampler)
    interval = interval_option(args.guidance_interval)
    model = load_model(args.ckpt, map_location="cpu").to(device)
    evaluator = Evaluator(
        args.data, args.num_samples, args.fid_features, fid_weights=args.fid_weights, prompts=args.prompts,
        clip_model=args.clip_model, clip_pretrained=args.clip_pretrained, seed=args.seed, batch_size=args.batch_size,
        cache_dir=args.cache_dir, progress=True, suites=suites, **extra_metrics(args),
    )
    options = {k: v for k, v in (("steps", args.steps), ("sampler", args.sampler), ("guidance_interval", interval),
                                 ("height", args.height), ("width", args.width)) if v is not None}
    scales = args.guidance or [None]
    results = []
    for scale in scales:
        results.append(evaluator(model, guidance=scale, **options))
        results[-1].update(checkpoint=model.loaded_from, data=args.data)
    if rank_world()[0] == 0:
        write_results(results, Path(args.out))
        warn_if_not_comparable(results[0], args, suites)


def extra_metrics(args: argparse.Namespace) -> dict:
    """The opt-in metrics' Evaluator options (FD-DINOv2, precision/recall)."""
    return {"fd_dinov2": args.fd_dinov2, "precision_recall": args.precision_recall,
            "precision_recall_k": args.precision_recall_k}


def warn_if_not_comparable(result: dict, args: argparse.Namespace, suites: list) -> None:
    """One stderr line per reason the FID/KID just printed do not compare with other runs' (too few images, a judge's
    features on other data); after the table, where the number is read."""
    from genart_lightning.metrics.comparability import comparability_warnings

    for line in comparability_warnings(result, args.fid_features, suites, args.data):
        print(f"warning: {line}", file=sys.stderr, flush=True)


def write_results(results: list[dict], out: Path) -> None:
    """metrics.json (a sweep: also .csv, .md and the trade-off plot beside it) and the table on stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results[0] if len(results) == 1 else {"sweep": results}, indent=2) + "\n")
    print(f"wrote {out}")
    print(markdown_table(results))
    if len(results) > 1:
        for path in (write_csv(results, out.with_suffix(".csv")), write_markdown(results, out.with_suffix(".md")),
                     plot_tradeoff(results, out.with_suffix(".png"))):
            print(f"wrote {path}")


def _columns(results: list[dict]) -> list[str]:
    return [c for c in TABLE_COLUMNS if any(r.get(c) is not None for r in results)]


def markdown_table(results: list[dict]) -> str:
    """The headline numbers, one row per evaluation."""
    columns = _columns(results)
    rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    rows += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in results]
    return "\n".join(rows)


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def write_csv(results: list[dict], path: Path) -> Path:
    """One row per guidance scale."""
    columns = _columns(results)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([[r.get(c) for c in columns] for r in results])
    return path


def write_markdown(results: list[dict], path: Path) -> Path:
    """The table plus how it was computed, ready for a README or a report."""
    r = results[0]
    how = (f"{r['num_samples']} samples, seed {r['seed']}, {r['resolution']}px, features {r['feature_extractor']['id']}, "
           f"reference {r['reference']['count']} real images, checkpoint {Path(r['checkpoint']['path']).name} (step {r['checkpoint']['global_step']})")
    path.write_text(f"{markdown_table(results)}\n\n{how}\n")
    return path


def plot_tradeoff(results: list[dict], path: Path) -> Path:
    """FID against text alignment (CLIP score or attribute accuracy), one point per guidance scale."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    scales = [r["guidance"] for r in results]
    align_key = next((k for k in ("clip_score", "attribute_accuracy") if results[0].get(k) is not None), None)
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    x = [r[align_key] for r in results] if align_key else scales
    ax.plot(x, [r["fid"] for r in results], "o-")
    for xi, r in zip(x, results, strict=True):
        ax.annotate(f"w={r['guidance']:g}", (xi, r["fid"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(align_key.replace("_", " ") if align_key else "guidance scale")
    ax.set_ylabel(f"FID ({results[0]['feature_extractor']['id'].split('-')[0]} features)")
    ax.set_title(f"guidance trade-off, {results[0]['num_samples']} samples")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
