"""The text-conditional GAN on small real data, with and without discriminator augmentation, at three dataset sizes.

    python -m benchmarks.gan_augment_digits [--sizes 200,600,all] [--variants none,diffaugment,ada]

Each cell trains experiments/cgan_shapes.yaml on the first N training digits (`genart shards digits --limit N`) for
--iterations G+D iterations of batch 32, then scores 200 samples with the digits judge as benchmarks/quality_digits
does: accuracy / spread / FID against the held-out test digits. Variants: none; diffaugment (color, translation and
cutout on every image D sees, p=1; Zhao et al. 2020); ada (the same ops, p adapted to D's overconfidence on reals,
target 0.6; Karras et al. 2020); mode_seeking (MSGAN's term, weight --diversity-weight, against a G that ignores its noise; Mao et al.
2019) alone and with each augmentation. Runs stay under --work; a cut-off table continues where it stopped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.quality_digits import GAN_STEPS_PER_ITERATION, digits_shards, evaluate
from benchmarks.quality_runs import REPO, fit, write_section

VARIANTS = {
    "none": (),
    "diffaugment": ("--model.init_args.augment=[color,translation,cutout]",),
    "ada": ("--model.init_args.augment=[color,translation,cutout]", "--model.init_args.augment_target=0.6"),
    "mode_seeking": (),  # + --model.init_args.diversity_weight from --diversity-weight
    "diffaugment+mode_seeking": ("--model.init_args.augment=[color,translation,cutout]",),
    "ada+mode_seeking": ("--model.init_args.augment=[color,translation,cutout]", "--model.init_args.augment_target=0.6"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="200,600,all", help="training images per cell (all: 1,438)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--diversity-weight", type=float, default=0.5, help="weight of the mode-seeking term")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "gan_augment_digits")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "QUALITY.md")
    args = parser.parse_args()
    sizes, variants = args.sizes.split(","), args.variants.split(",")
    lines = [f"### Text-conditional GAN on few digits: discriminator augmentation ({args.image_size}px, "
             f"{args.iterations} iterations of batch 32)", "",
             f"`python -m benchmarks.gan_augment_digits --sizes {args.sizes} --variants {args.variants} --iterations "
             f"{args.iterations} --image-size {args.image_size} --diversity-weight {args.diversity_weight:g}`. Cells: accuracy / spread / FID (digits judge, "
             f"{args.num_samples} samples against the held-out test digits), then training minutes.", "",
             "| training images | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for size in sizes:
        limit = None if size == "all" else int(size)
        data = digits_shards(args.work / f"digits_{args.image_size}px_{size}", args.image_size, limit, samples_per_shard=50)
        cells = []
        for variant in variants:
            options = VARIANTS[variant]
            name = f"{size}_{variant}"
            if variant.endswith("mode_seeking"):
                options, name = (*options, f"--model.init_args.diversity_weight={args.diversity_weight}"), f"{name}_w{args.diversity_weight:g}"
            root = args.work / f"{args.image_size}px_it{args.iterations}" / name
            steps = args.iterations * GAN_STEPS_PER_ITERATION
            ckpt, minutes = fit("cgan_shapes", steps, root, data["train_urls"], data["val_urls"],
                                (f"--data.init_args.image_size={args.image_size}", f"--model.init_args.image_size={args.image_size}",
                                 "--data.init_args.batch_size=32", *options))
            r = evaluate(ckpt, data, [], args.num_samples, root / "eval.json")[0]
            cells.append(f"{r['digit_accuracy']:.2f} / {r['digit_spread']:.2f} / {r['fid']:.2f} ({minutes:.0f} min)")
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
        write_section(args.out, lines, "gan_augment_digits")
    print(f"GAN augmentation table: {args.out}")


if __name__ == "__main__":
    main()
