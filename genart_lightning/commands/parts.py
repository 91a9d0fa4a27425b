"""`genart parts`: the families, processes, backbones and first stages a config can name, one line each, and
`genart parts NAME` for every setting of one (type, default, and its description where the docstring has one)."""

from __future__ import annotations

import argparse
import importlib
import inspect
import re

KINDS: dict[str, tuple[str, list[str]]] = {
    "families": ("model", [
        "genart_lightning.models.diffusion.PixelDiffusion",
        "genart_lightning.models.latent_diffusion.LatentDiffusion",
        "genart_lightning.models.gan.DCGAN",
        "genart_lightning.models.cgan.TextConditionalGAN",
        "genart_lightning.models.vae.VAE",
    ]),
    "processes": ("model.init_args.process", [
        "genart_lightning.diffusion.vp.VP",
        "genart_lightning.diffusion.edm.EDM",
        "genart_lightning.diffusion.flow.Flow",
    ]),
    "backbones": ("model.init_args.backbone", [
        "genart_lightning.nn.unet.UNetBackbone",
        "genart_lightning.nn.dit.DiTBackbone",
        "genart_lightning.nn.diffusers_parts.DiffusersUNetBackbone",
        "genart_lightning.nn.diffusers_pixart.PixArtBackbone",
    ]),
    "first stages (or first_stage_ckpt: a VAE run's checkpoint)": ("model.init_args.first_stage", [
        "genart_lightning.nn.diffusers_parts.DiffusersAutoencoder",
    ]),
    "data": ("data", [
        "datamodules.webdataset.TextImageDataModule",
    ]),
}
"""Each kind a config chooses: its config key and the dotted paths it accepts (tests/test_parts.py checks that
every family, process and backbone class is listed)."""


def resolve(name: str) -> str | None:
    """The dotted path of a part named by its class name (any case) or by its dotted path; None when unknown."""
    paths = {p for _, kind in KINDS.values() for p in kind}
    if name in paths:
        return name
    return next((p for p in sorted(paths) if p.rpartition(".")[2].lower() == name.lower()), None)


def load(dotted: str) -> type:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def summary(cls: type, width: int = 100) -> str:
    """The first paragraph of a class's docstring on one line, cut at a word near `width` characters."""
    text = " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split())
    return text if len(text) <= width else text[:width].rsplit(" ", 1)[0] + " ..."


def argument_docs(cls: type) -> dict[str, str]:
    """`name: description` entries of the "Args:" sections of the class's and its __init__'s docstrings (and its
    bases'), continuation lines joined."""
    docs: dict[str, str] = {}
    for owner in reversed(cls.__mro__):
        init = owner.__dict__.get("__init__")
        for doc in (inspect.getdoc(init) if init else None, inspect.cleandoc(owner.__doc__ or "")):
            docs |= args_section(doc or "")
    return docs


def args_section(doc: str) -> dict[str, str]:
    """The entries of a Google-style "Args:" section: one per line at the first entry's indent, deeper lines continue."""
    lines = doc.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Args:"), None)
    if start is None:
        return {}
    base = len(lines[start]) - len(lines[start].lstrip())
    entries: dict[str, str] = {}
    entry_indent, name = None, None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent <= base:
            break
        match = re.match(r"(\w+)( \([^)]*\))?: (.*)", line.strip())
        if match and indent == (entry_indent or indent):
            entry_indent, name = indent, match.group(1)
            entries[name] = match.group(3).strip()
        elif name:
            entries[name] += " " + line.strip()
    return entries


def parameters(cls: type) -> list[inspect.Parameter]:
    """The constructor's named arguments, then those its `**kwargs` hands on to the bases' constructors, as
    jsonargparse reads them: PixelDiffusion(channels, **kwargs) also takes DiffusionModel's lr, ..."""
    found: dict[str, inspect.Parameter] = {}
    for owner in cls.__mro__:
        init = owner.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        for param in params:
            if param.name != "self" and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                found.setdefault(param.name, param)
        if not any(param.kind is param.VAR_KEYWORD for param in params):
            break
    return list(found.values())


def settings(cls: type) -> list[str]:
    """One line per constructor argument (`parameters`): name, type, default, description."""
    docs = argument_docs(cls)
    lines = []
    for param in parameters(cls):
        kind = param.annotation if isinstance(param.annotation, str) else getattr(param.annotation, "__name__", "")
        default = "required" if param.default is param.empty else f"default {param.default!r}"
        lines.append(f"  {param.name}: {kind} ({default})" + (f"  {docs[param.name]}" if param.name in docs else ""))
    return lines


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("parts", help="list families, processes, backbones, first stages; `parts NAME`: its settings",
                              description=__doc__)
    p.add_argument("name", nargs="?", help="a class name (PixelDiffusion, vp, UNetBackbone, ...) or dotted path")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    if args.name is None:
        for kind, (key, paths) in KINDS.items():
            print(f"{kind} ({key}):")
            for dotted in paths:
                print(f"  {dotted.rpartition('.')[2]:24}{summary(load(dotted))}")
        print("every setting of one: genart parts NAME")
        return
    dotted = resolve(args.name)
    if dotted is None:
        names = ", ".join(sorted({p.rpartition(".")[2] for _, kind in KINDS.values() for p in kind}))
        raise SystemExit(f"error: no part named {args.name!r}; choose one of {names} (genart parts lists them)")
    cls = load(dotted)
    key = next(key for key, paths in KINDS.values() if dotted in paths)
    print(f"{dotted}\n\n{inspect.getdoc(cls) or ''}\n\nin a config: {key}: {{class_path: {dotted}, init_args: {{NAME: VALUE}}}}; "
          f"on the command line: --{key}.init_args.NAME=VALUE\nsettings:")
    print("\n".join(settings(cls)))
