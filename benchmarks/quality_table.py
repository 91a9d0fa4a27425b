"""Quality per training budget and per sampling step: vp, edm and flow with the U-Net, flow with the DiT, on shapes.

    python -m benchmarks.quality_table [--train-steps 3000] [--num-samples 400] [--rows flow,vp,...] [--out benchmarks/QUALITY.md]

Every row trains its shipped shapes config (`genart fit`) for the same number of steps of batch 32 on the same
shards, then `genart eval` scores guided samples (scale 4) at 10, 20 and 50 steps of the config's own sampler:
all-attribute accuracy (the mean over the judged attributes, as `genart eval` reports it) and FID on the shapes judge's features. The
latent DiT row trains experiments/vae_shapes.yaml first (600 steps); `flow_no_coordinates` (not run by default) is
the flow row without the U-Net's coordinate channels, the ablation that shows what they do for the position. Runs and metrics stay under --work, so a
cut-off run continues where it stopped (a finished fit or eval is not redone). Wall times are this machine's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.quality_runs import REPO, fit, genart, write_section
from genart_lightning.shapes.judge import ATTRIBUTES

ROWS = {  # name -> (label, config, sampler, overrides of the config)
    "flow": ("flow + U-Net (flow_shapes)", "flow_shapes", "euler", ()),
    "flow_no_coordinates": ("flow + U-Net (flow_shapes), coordinates off", "flow_shapes", "euler",
                            ("--model.init_args.backbone.init_args.coordinates=false",)),
    "vp": ("vp + U-Net (ddpm_shapes)", "ddpm_shapes", "ddim", ()),
    "edm": ("edm + U-Net (edm_shapes)", "edm_shapes", "heun", ()),
    "flow_dit": ("flow + DiT, latents (flow_dit_shapes)", "flow_dit_shapes", "euler", ()),
}
DEFAULT_ROWS = ("flow", "vp", "edm", "flow_dit")
SAMPLE_STEPS = (10, 20, 50)
BY_ATTRIBUTE_STEPS = 20
VAE_STEPS = 600


def evaluate(ckpt: Path, sampler: str, steps: int, num_samples: int, data: Path, out: Path) -> dict:
    if not out.is_file():
        genart("eval", "--ckpt", str(ckpt), "--data", f"{data}/val-000000.tar", "--num-samples", str(num_samples),
               "--fid-features", "judge", "--guidance", "4", "--steps", str(steps), "--sampler", sampler,
               "--out", str(out))
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-steps", type=int, default=3000)
    parser.add_argument("--num-samples", type=int, default=400)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "quality")
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "QUALITY.md")
    args = parser.parse_args()
    unknown = set(args.rows.split(",")) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {', '.join(ROWS)}")
    work = args.work / f"steps{args.train_steps}"
    data = args.work / "shapes"
    if not (data / "val-000000.tar").is_file():
        genart("shards", "shapes", "--out", str(data), "--num-samples", "6000", "--image-size", "32", "--seed", "0")
    shards = (f"{data}/train-{{000000..000005}}.tar", f"{data}/val-000000.tar")
    lines = [f"Shapes at 32px on CPU, {args.train_steps} training steps of batch 32 per row, guidance 4, "
             f"{args.num_samples} samples per cell (`python -m benchmarks.quality_table --train-steps {args.train_steps} "
             f"--num-samples {args.num_samples} --rows {args.rows}`). Accuracy: all attributes (as `genart eval` "
             f"reports it: the mean over the five attributes); by attribute at {BY_ATTRIBUTE_STEPS} sampling steps.", "",
             "| process + backbone | sampler | training | " + " | ".join(f"{s} steps: accuracy / FID" for s in SAMPLE_STEPS)
             + " | " + " / ".join(ATTRIBUTES) + " |",
             "|---|---|---|" + "---|" * (len(SAMPLE_STEPS) + 1)]
    for name in args.rows.split(","):
        label, config, sampler, extra = ROWS[name]
        if config == "flow_dit_shapes":
            vae, _ = fit("vae_shapes", VAE_STEPS, work / "vae_shapes", *shards)
            extra = (*extra, f"--model.init_args.first_stage_ckpt={vae}")
        ckpt, minutes = fit(config, args.train_steps, work / name, *shards, extra)
        cells, by_attribute = [], ""
        for steps in SAMPLE_STEPS:
            metrics = evaluate(ckpt, sampler, steps, args.num_samples, data, work / name / f"eval_{sampler}_{steps}.json")
            cells.append(f"{metrics['attribute_accuracy']:.2f} / {metrics['fid']:.2f}")
            if steps == BY_ATTRIBUTE_STEPS:
                by_attribute = " / ".join(f"{metrics[f'{a}_accuracy']:.2f}" for a in ATTRIBUTES)
        lines.append(f"| {label} | {sampler} | {minutes:.0f} min | " + " | ".join(cells) + f" | {by_attribute} |")
        write_section(args.out, lines, f"quality_shapes_{args.train_steps}")  # after every row: a cut-off run keeps what it measured
    print(f"quality table: {args.out}")


if __name__ == "__main__":
    main()
