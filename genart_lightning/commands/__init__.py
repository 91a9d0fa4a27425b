"""`genart` subcommands beside LightningCLI's fit/validate/test/predict; one module each.

Each module exposes `register(subparsers) -> None`, adding its parser with `func=run`.
"""

import argparse
from pathlib import Path


def require_checkpoint(path: str) -> None:
    """One line (before torch loads) when the checkpoint a command reads is not there."""
    if not Path(path).is_file():
        raise SystemExit(
            f"error: checkpoint not found: {path} (from --ckpt); pass a .ckpt written by `genart fit` or a `genart export` file"
        )


def add_threads_option(parser) -> None:
    """`--threads`: torch's intra-op threads on CPU (default: this process's share of the usable cores)."""
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads on CPU (default: usable cores per process, or OMP_NUM_THREADS when set)")


def use_cpu_threads(threads: int | None, device: str, loader_workers: int = 0) -> None:
    """On CPU, set torch's threads from the cores (ranks of torchrun share them) and say so on stdout (stderr is
    for the one line of a mistake)."""
    import os

    from genart_lightning.run.threads import set_cpu_threads

    if str(device).startswith("cpu"):
        choice = set_cpu_threads(loader_workers, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), threads)
        print(f"[genart] {choice.line()}", flush=True)


def int_pair(text: str) -> tuple[int, int]:
    """An argparse type: "A,B" as two integers (--original-size H,W, --crop-top-left TOP,LEFT)."""
    try:
        first, second = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not two integers A,B, e.g. 1024,768") from None
    return first, second


def interval_option(text: str | None) -> tuple[float, float] | None:
    """--guidance-interval LO,HI as numbers; a malformed one is one line (argparse's own errors add the usage)."""
    from genart_lightning.diffusion.guidance import check_interval

    if text is None:
        return None
    try:
        return check_interval([float(v) for v in text.split(",")])
    except ValueError:
        raise SystemExit(f"error: --guidance-interval {text!r} is not LO,HI: two noise levels sigma / alpha with "
                         "LO < HI, e.g. 0.3,5") from None
