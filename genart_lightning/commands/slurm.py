"""`genart slurm submit`: the sbatch line for train.sbatch from resource options, shown and submitted.

The script is the template shipped in the package (genart_lightning/slurm/train.sbatch). From a source
checkout the line names `slurm/train.sbatch` (a symlink to it) and logs go to the checkout's slurm/logs/,
as before; from an installed wheel it names the packaged file and logs go to ./slurm/logs/ of the
directory you submit from (the template's own default)."""

from __future__ import annotations

import argparse
import shlex
import subprocess
from pathlib import Path

from genart_lightning.slurm import checkout_link, template

_CHECKOUT_SCRIPT = checkout_link("train.sbatch")
SCRIPT = _CHECKOUT_SCRIPT or template("train.sbatch")


def log_dir() -> Path:
    """Where job logs go: the checkout's slurm/logs/, or slurm/logs/ under the working directory of an install."""
    return _CHECKOUT_SCRIPT.parent / "logs" if _CHECKOUT_SCRIPT else Path.cwd() / "slurm" / "logs"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "slurm",
        help="submit an experiment to SLURM (slurm/train.sbatch) on N nodes x G GPUs",
        description=__doc__,
        epilog="example: genart slurm submit --nodes 2 --gpus-per-node 4 --time 24:00:00 experiments/X.yaml "
        "--trainer.max_steps=100000",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = actions.add_parser("submit", help="build and run the sbatch command")
    s.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    s.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node, one rank each (default 0: CPU)")
    s.add_argument("--tasks-per-node", type=int, help="ranks per node without GPUs (default 1)")
    s.add_argument("--cpus-per-task", type=int, help="CPU cores per rank (data workers + main process)")
    s.add_argument("--time", help="time limit, e.g. 24:00:00 (SIGUSR1 comes 90 s before it; the job requeues)")
    s.add_argument("--partition", help="SLURM partition")
    s.add_argument("--account", help="SLURM account")
    s.add_argument("--job-name", help="job name (default: the config's file name)")
    s.add_argument("--sbatch-arg", action="append", default=[], help="any other sbatch option, e.g. --sbatch-arg=--qos=high")
    s.add_argument("--dry-run", action="store_true", help="print the command only")
    s.add_argument("config", help="experiment config, e.g. experiments/dcgan_shapes.yaml")
    s.add_argument("overrides", nargs=argparse.REMAINDER, help="genart fit overrides, e.g. --trainer.max_steps=1000")
    s.set_defaults(func=run)


def sbatch_command(args: argparse.Namespace) -> list[str]:
    """The sbatch argv for these options: one task per GPU (or --tasks-per-node), log in slurm/logs/."""
    config = Path(args.config)
    if not config.is_file():
        raise SystemExit(f"error: config not found: {config}; pass an experiment YAML such as experiments/X.yaml")
    if args.gpus_per_node and args.tasks_per_node and args.tasks_per_node != args.gpus_per_node:
        raise SystemExit("error: --tasks-per-node must equal --gpus-per-node (one rank per GPU); drop one of them")
    tasks = args.gpus_per_node or args.tasks_per_node or 1
    name = args.job_name or config.stem
    cmd = ["sbatch", f"--job-name={name}", f"--nodes={args.nodes}", f"--ntasks-per-node={tasks}",
           f"--output={log_dir()}/%x-%j.out"]
    if args.gpus_per_node:
        cmd.append(f"--gpus-per-node={args.gpus_per_node}")
    for option in ("cpus_per_task", "time", "partition", "account"):
        if getattr(args, option) is not None:
            cmd.append(f"--{option.replace('_', '-')}={getattr(args, option)}")
    return [*cmd, *args.sbatch_arg, str(SCRIPT), str(config), *args.overrides]


def run(args: argparse.Namespace) -> None:
    cmd = sbatch_command(args)
    print(shlex.join(cmd))
    if args.dry_run:
        return
    log_dir().mkdir(parents=True, exist_ok=True)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: sbatch failed: {result.stderr.strip()}")
    job_id = result.stdout.strip().split()[-1]
    name = cmd[1].split("=", 1)[1]
    print(f"submitted job {job_id}: log {log_dir()}/{name}-{job_id}.out, run dir runs/{Path(args.config).stem}/{job_id}")
