"""`genart sweep SPEC.yaml` runs a sweep (locally or as one SLURM job array); `genart sweep report SPEC.yaml` sums it up."""

from __future__ import annotations

import argparse

from genart_lightning.sweeps.launch import launch_local, launch_slurm
from genart_lightning.sweeps.report import report
from genart_lightning.sweeps.spec import SpecError, expand, load_spec, write_configs

USAGE = "genart sweep SPEC.yaml [--launcher local|slurm] [--dry-run] [--wait] | genart sweep report SPEC.yaml [--metric M] [--x KEY]"

EPILOG = """spec (YAML; keys are the dotted keys `genart fit` takes; paths relative to the working directory):
  base: experiments/vae_shapes.yaml        # or a list, merged like repeated --config
  fixed: {trainer.max_steps: 600}          # in every run
  grid: {model.init_args.lr: [3.0e-4, 1.0e-3]}
  random: {samples: 4, seed: 0, params: {model.init_args.beta: {loguniform: [1.0e-5, 1.0e-3]}}}
  seeds: [0, 1, 2]
  metric: val/psnr                         # optional: name, out_dir (runs/<name>), x, slurm: {time: ...}
runs go to <out_dir>/<run name>/ (config.yaml, logs, metrics.json); runs with metrics.json are skipped."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `genart sweep` (with `report` as its first word for the report)."""
    p = subparsers.add_parser(
        "sweep", help="expand a sweep spec into runs and launch them; `sweep report SPEC` tabulates them",
        description=__doc__, usage=USAGE, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("words", nargs="+", metavar="[report] SPEC.yaml", help="sweep spec (see experiments/sweeps/)")
    p.add_argument("--launcher", choices=["local", "slurm"], default="local",
                   help="local: one run after another in this shell; slurm: one job array (slurm/sweep.sbatch)")
    p.add_argument("--dry-run", action="store_true", help="write configs (and the sbatch script) but launch nothing")
    p.add_argument("--wait", action="store_true", help="slurm: return when the array has finished (sbatch --wait)")
    p.add_argument("--metric", help="report: metric to plot (default: the spec's `metric`, else a val/loss metric)")
    p.add_argument("--x", help="report: swept key on the plot's x axis (default: the spec's `x`, else the first)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Launch the sweep's unfinished runs, or write its report; bad specs end in one `error:` line."""
    words = args.words
    is_report = words[0] == "report"
    if is_report:
        words = words[1:]
    if len(words) != 1:
        raise SystemExit(f"error: expected one sweep spec, got {words}; usage: {USAGE}")
    try:
        spec = load_spec(words[0])
        runs = expand(spec)
        if is_report:
            for kind, path in report(spec, runs, metric=args.metric, x=args.x).items():
                print(f"wrote {kind}: {path}")
            print((spec.out_dir / "report.md").read_text(), end="")
            return
        write_configs(spec, runs)
        print(f"sweep {spec.name}: {len(runs)} runs ({sum(r.finished for r in runs)} finished) in {spec.out_dir}")
        if args.launcher == "slurm":
            launch_slurm(spec, runs, dry_run=args.dry_run, wait=args.wait)
            return
    except (SpecError, ValueError, RuntimeError) as err:
        raise SystemExit(f"error: {err}") from None
    failed = launch_local(runs, dry_run=args.dry_run)
    if failed:
        raise SystemExit(f"error: {len(failed)} run(s) failed: {', '.join(r.name for r in failed)}")
