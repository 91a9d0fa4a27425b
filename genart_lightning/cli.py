"""`genart`: LightningCLI for fit/validate/test/predict, plus the project's own subcommands."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from pathlib import Path

LIGHTNING_SUBCOMMANDS = {
    "fit": "train a family from a YAML config (LightningCLI; any key overridable: --model.init_args.lr=1e-4)",
    "validate": "run validation of a config/checkpoint",
    "test": "run the test loop of a config/checkpoint",
    "predict": "run prediction of a config/checkpoint",
}
COMMAND_MODULES = ["shards", "sample", "sweep", "export", "eval", "ema", "slurm", "parts"]
"""Modules in genart_lightning.commands, each adding one subcommand."""


def config_paths(argv: list[str]) -> list[str]:
    """The files given with --config / -c, in order."""
    paths = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            paths.append(argv[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def moved_class_error(argv: list[str]) -> str | None:
    """One line for the first class path (in a --config file or on the command line) that names a moved class."""
    import yaml

    from genart_lightning.models.moved import moved_class_hint

    def strings(node: object) -> list[str]:
        if isinstance(node, dict):
            return [s for value in node.values() for s in strings(value)]
        if isinstance(node, list):
            return [s for value in node for s in strings(value)]
        return [node] if isinstance(node, str) else []

    sources = [(path, strings(yaml.safe_load(Path(path).read_text()))) for path in config_paths(argv) if Path(path).is_file()]
    sources.append(("the command line", [part for arg in argv for part in arg.split("=")]))
    for where, values in sources:
        for value in values:
            hint = moved_class_hint(value, where)
            if hint:
                return hint
    return None


def short_help_names(argv: list[str]) -> list[str]:
    """`--model.help PixelDiffusion` (any `--KEY.help NAME`): a part's class name becomes the dotted path jsonargparse
    needs (`genart parts` lists the names)."""
    from genart_lightning.commands.parts import resolve

    out = list(argv)
    for i, arg in enumerate(out):
        if arg.endswith(".help") and arg.startswith("--") and i + 1 < len(out):
            out[i + 1] = resolve(out[i + 1]) or out[i + 1]
        elif ".help=" in arg and arg.startswith("--"):
            key, _, name = arg.partition("=")
            out[i] = f"{key}={resolve(name) or name}"
    return out


def lightning_cli(args: list[str] | None) -> None:
    """Run LightningCLI restricted to this project's model and data base classes (args None: sys.argv)."""
    if args is None:
        sys.argv[2:] = short_help_names(sys.argv[2:])
    else:
        args = [args[0], *short_help_names(args[1:])]
    problem = moved_class_error(sys.argv[2:] if args is None else args[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    from datamodules.webdataset import TextImageDataModule
    from genart_lightning.models.base import GenerativeModel
    from genart_lightning.run.lightning_cli import GenartCLI

    try:
        GenartCLI(
            GenerativeModel,
            TextImageDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False},
            args=args,
        )
    except argparse.ArgumentError as err:  # jsonargparse's: usage and a nested report, 90 lines for one typo
        print(f"error: {condense_config_error(str(err))}", file=sys.stderr)
        raise SystemExit(2) from None
    release_process_group()


def condense_config_error(message: str) -> str:
    """jsonargparse's nested validation report as one line: the key, the class, the innermost problem, the fix."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    key = re.match(r'Parser key "([^"]+)"', lines[0]) if lines else None
    problems = [i for i, line in enumerate(lines) if line.startswith("- Problem with given class_path")]
    if key and problems:
        cls = re.search(r"'([^']+)'", lines[problems[0]])
        detail = lines[problems[0] + 1] if problems[0] + 1 < len(lines) else ""
        where = f"config key {key.group(1)} ({cls.group(1) if cls else 'class'}): {detail.rstrip('.')}; "
        return where + (moved_argument_hint(detail) or
                        f"check the spelling against `genart fit --help` (or --{key.group(1)}.help CLASS)")
    return " ".join(lines[:2]) + ("" if len(lines) <= 2 else " (more with --debug)")


def innermost_problem(message: str) -> str:
    """The one line that says what went wrong: a class's own error raised while jsonargparse instantiated a config
    comes wrapped in a report of every Union subtype tried ("- Expected a <class 'NoneType'>", the given value)."""
    lines = message.splitlines()
    if len(lines) == 1 or not lines[0].startswith("Does not validate against any of the Union subtypes"):
        return message
    wrappers = ("Expected a <class", "Does not validate against", "Problem with given class_path")
    causes = [line.strip()[2:] for line in lines
              if line.strip().startswith("- ") and not any(w in line for w in wrappers)]
    return causes[0] if causes else lines[0]


def moved_argument_hint(detail: str) -> str | None:
    """For a diffusion argument that moved into `process:` or `backbone:`, where to write it now."""
    from genart_lightning.models.diffusion import LEGACY_PROCESS_ARGUMENTS, LEGACY_UNET_ARGUMENTS

    name = re.search(r"Option '([^']+)' is not accepted", detail)
    if name is None or name.group(1) not in (*LEGACY_PROCESS_ARGUMENTS, *LEGACY_UNET_ARGUMENTS):
        return None
    part, cls = (("process", "genart_lightning.diffusion.vp.VP") if name.group(1) in LEGACY_PROCESS_ARGUMENTS
                 else ("backbone", "genart_lightning.nn.unet.UNetBackbone"))
    return f"{name.group(1)} moved into the model's {part}: write {part}: {{class_path: {cls}, init_args: {{{name.group(1)}: ...}}}}"


def release_process_group() -> None:
    """Destroy the DDP process group after a run that ended normally.

    Lightning leaves it alive; at interpreter exit gloo's worker threads are then torn down unjoined and
    one rank can abort with "terminate called without an active exception", failing a finished SLURM job.
    Not done after an exception: ranks still inside a collective would deadlock the teardown.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def build_parser() -> argparse.ArgumentParser:
    """Top-level parser; Lightning subcommands are listed here but parsed by LightningCLI."""
    parser = argparse.ArgumentParser(
        prog="genart",
        description="Train, sample and evaluate generative image models (GAN, VAE, diffusion) with PyTorch Lightning.",
        epilog="`genart fit --help` shows every config key; `genart COMMAND --help` for the others.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in LIGHTNING_SUBCOMMANDS.items():
        subparsers.add_parser(name, help=text, add_help=False)
    for module in COMMAND_MODULES:
        importlib.import_module(f"genart_lightning.commands.{module}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `genart` console script."""
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
        lightning_cli(None if from_command_line else argv)  # LightningCLI warns when given sys.argv twice
        return
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        raise SystemExit(0 if not argv else 2)
    args.func(args)


def entry(argv: list[str] | None = None) -> None:
    """The `genart` console script: `main`, with a user's mistake as one line on stderr and exit code 2.

    `--debug` (anywhere) or GENART_DEBUG=1 shows the traceback instead.
    """
    from genart_lightning import UserError

    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("GENART_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if from_command_line:
        sys.argv[1:] = argv  # LightningCLI reads sys.argv itself (it warns when given the same arguments twice)
    run = lambda: main(None if from_command_line else argv)  # noqa: E731
    if debug:
        run()
        return
    try:
        run()
    except SystemExit as exit_:
        if isinstance(exit_.code, str):  # commands raise SystemExit("error: ...") for the mistakes they check
            print(exit_.code if exit_.code.startswith("error:") else f"error: {exit_.code}", file=sys.stderr)
            raise SystemExit(2) from None
        raise
    except (UserError, FileNotFoundError, ValueError) as err:
        print(f"error: {innermost_problem(str(err))} (traceback: --debug)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    entry()
