"""Prompt following on real data: every shipped text-conditional config trained on scikit-learn's handwritten digits.

    python -m benchmarks.quality_digits [--train-steps 1500] [--image-size 32] [--rows vp,edm,...]

The 1,797 digits (8x8, upscaled) are split train / val / test (`genart shards digits`); captions name the digit in
three phrasings. Each row trains its shipped shapes config unchanged except for the data and batch 32, for
--train-steps, then `genart eval --prompts digits --fid-features digits` samples every digit equally at each guidance
scale (and at the guided scales again with guidance limited to an interval of noise levels) and reports, against the held-out test digits and a judge trained on real training digits only:
- accuracy: the share of samples the judge reads as the prompted digit (chance 0.1);
- spread: per digit, the samples' feature spread over the real test digits' spread (near-copies score far below 1);
- FID on the judge's features against the test digits.
The latent rows train experiments/vae_shapes.yaml on the same digits first. Runs stay under --work: a cut-off table
continues where it stopped. The table replaces its section of --out; wall minutes are this machine's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.quality_runs import REPO, fit, genart, write_section

ROWS = {  # name -> (config, label)
    "vp": ("ddpm_shapes", "vp + U-Net, pixels"),
    "edm": ("edm_shapes", "edm + U-Net, pixels"),
    "flow": ("flow_shapes", "flow + U-Net, pixels"),
    "flow_dit": ("flow_dit_shapes", "flow + DiT, VAE latents"),
    "ldm": ("ldm_shapes", "vp + U-Net, VAE latents"),
    "cgan": ("cgan_shapes", "text-conditional GAN"),
}
LATENT_ROWS = ("flow_dit", "ldm")
GAN_STEPS_PER_ITERATION = 2  # Lightning counts the D and the G step: 1,500 iterations of batch 32 are 3,000 steps
VAE_STEPS = 1500
GOALS = {"cgan": (0.9, 0.8)}  # accuracy, spread at one guidance scale; diffusion rows: DIFFUSION_GOAL
DIFFUSION_GOAL = (0.95, 0.85)



def digits_shards(out: Path, image_size: int, limit: int | None = None, samples_per_shard: int = 256) -> dict:
    """The digits shards under `out` (written once): their train/val/test URLs."""
    if not (out / "info.json").is_file():
        from datamodules.digits import write_digits_shards

        info = write_digits_shards(out, image_size=image_size, limit=limit, samples_per_shard=samples_per_shard)
        (out / "info.json").write_text(json.dumps({k: v for k, v in info.items() if k.endswith("_urls")}))
    return json.loads((out / "info.json").read_text())


def evaluate(ckpt: Path, data: dict, scales: list[float], num_samples: int, out: Path, *options: str) -> list[dict]:
    """One row of metrics per guidance scale (the GAN has no guidance: one row, scale None)."""
    if not out.is_file():
        genart("eval", "--ckpt", str(ckpt), "--data", data["test_urls"], "--num-samples", str(num_samples),
               "--prompts", "digits", "--fid-features", "digits", "--out", str(out),
               *(["--guidance", *map(str, scales)] if scales else []), *options)
    metrics = json.loads(out.read_text())
    return metrics.get("sweep", [metrics])


def row_cells(results: list[dict], scales: list[float], goal: tuple[float, float]) -> tuple[list[str], str]:
    """Cells `accuracy / spread / FID` per scale, and whether one scale meets the goal."""
    by_scale = {r.get("guidance") or 1.0: r for r in results}  # no guidance (the GAN) samples as scale 1 does
    cells, met = [], False
    for scale in scales:
        r = by_scale.get(scale)
        if r is None:
            cells.append("-")
            continue
        met |= r["digit_accuracy"] >= goal[0] and r["digit_spread"] >= goal[1]
        cells.append(f"{r['digit_accuracy']:.2f} / {r['digit_spread']:.2f} / {r['fid']:.2f}")
    return cells, ("met" if met else "missed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--guidance", default="1,2,4", help="comma-separated guidance scales (diffusion rows)")
    parser.add_argument("--interval", default="0.28,5.42",
                        help="guidance interval LO,HI of the extra columns (default: EDM2's, Kynkaanniemi et al. 2024)")
    parser.add_argument("--num-samples", type=int, default=200, help="samples per guidance scale, spread over the 10 digits")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "quality_digits")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "QUALITY.md")
    args = parser.parse_args()
    unknown = set(args.rows.split(",")) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {', '.join(ROWS)}")
    scales = [float(s) for s in args.guidance.split(",")]
    work = args.work / f"{args.image_size}px_steps{args.train_steps}"
    data = digits_shards(args.work / f"digits_{args.image_size}px", args.image_size)
    command = (f"python -m benchmarks.quality_digits --train-steps {args.train_steps} --image-size {args.image_size} "
               f"--guidance {args.guidance} --num-samples {args.num_samples}")
    lines = [f"### Real data: scikit-learn digits at {args.image_size}px, {args.train_steps} steps of batch 32", "",
             f"`{command}`. Each config's own sampler and steps. Cells: accuracy / spread / FID (digits judge features, "
             f"against the held-out test digits), {args.num_samples} samples per cell. Goal: accuracy >= {DIFFUSION_GOAL[0]} with spread >= "
             f"{DIFFUSION_GOAL[1]} at one scale (GAN: {GOALS['cgan'][0]} / {GOALS['cgan'][1]}, no guidance).", "",
             "| config | training | " + " | ".join(f"guidance {s:g}" for s in scales)
             + "".join(f" | guidance {s:g} in ({args.interval}]" for s in scales if s != 1) + " | goal |",
             "|---|---|" + "---|" * (2 * len(scales) - (1 in scales)) + "---|"]
    common = (f"--data.init_args.image_size={args.image_size}", f"--model.init_args.image_size={args.image_size}",
              "--data.init_args.batch_size=32")
    for name in args.rows.split(","):
        config, label = ROWS[name]
        extra = common
        if name in LATENT_ROWS:
            vae, _ = fit("vae_shapes", VAE_STEPS, work / "vae_shapes", data["train_urls"], data["val_urls"], common)
            extra = (*common, f"--model.init_args.first_stage_ckpt={vae}")
        steps = args.train_steps * (GAN_STEPS_PER_ITERATION if name == "cgan" else 1)
        ckpt, minutes = fit(config, steps, work / config, data["train_urls"], data["val_urls"], extra)
        goal = GOALS.get(name, DIFFUSION_GOAL)
        if name == "cgan":
            cells, verdict = row_cells(evaluate(ckpt, data, [], args.num_samples, work / config / "eval.json"),
                                       scales, goal)
            cells += ["-"] * sum(s != 1 for s in scales)
        else:
            cells, verdict = row_cells(evaluate(ckpt, data, scales, args.num_samples, work / config / "eval.json"), scales, goal)
            guided = [s for s in scales if s != 1]
            if guided:
                more, more_verdict = row_cells(evaluate(ckpt, data, guided, args.num_samples, work / config / "eval_interval.json",
                                                        "--guidance-interval", args.interval), guided, goal)
                cells += more
                verdict = "met" if "met" in (verdict, more_verdict) else "missed"
        lines.append(f"| {label} ({config}) | {minutes:.0f} min | " + " | ".join(cells) + f" | {verdict} |")
        write_section(args.out, lines, f"quality_digits_{args.image_size}px")  # after every row: a cut-off run keeps what it measured
    print(f"digits quality table: {args.out}")


if __name__ == "__main__":
    main()
