"""`genart parts`: every family, process and backbone a config can name is listed with one line, and every setting of
one is shown by its short name, as `--model.help NAME` is."""

from __future__ import annotations

import importlib
import pkgutil

from helpers import genart_in_process

import genart_lightning.diffusion
import genart_lightning.models
import genart_lightning.nn
from genart_lightning.commands.parts import KINDS, argument_docs, load, parameters, settings
from genart_lightning.diffusion.process import Process
from genart_lightning.models.base import GenerativeModel
from genart_lightning.nn.backbone import Backbone


def concrete_subclasses(package, base: type) -> set[str]:
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
    found, stack = set(), [base]
    while stack:
        for sub in stack.pop().__subclasses__():
            stack.append(sub)
            if sub.__module__.startswith("genart_lightning.") and not sub.__name__.startswith("_"):
                found.add(f"{sub.__module__}.{sub.__qualname__}")
    return found


def test_every_family_process_and_backbone_is_listed_with_one_line(tmp_path):
    listed = {p for _, paths in KINDS.values() for p in paths}
    abstract = {"genart_lightning.models.diffusion.DiffusionModel", "genart_lightning.models.adversarial.AdversarialModel"}
    for package, base in ((genart_lightning.models, GenerativeModel), (genart_lightning.diffusion, Process),
                          (genart_lightning.nn, Backbone)):
        missing = concrete_subclasses(package, base) - abstract - listed
        assert not missing, f"add to genart_lightning/commands/parts.py KINDS: {missing}"
    code, out, err = genart_in_process("parts", cwd=tmp_path)
    assert code == 0, err
    for dotted in listed:
        line = next(line for line in out.splitlines() if line.strip().startswith(dotted.rpartition(".")[2]))
        assert len(line.split()) > 2, line  # the name and a sentence


def test_settings_of_a_part_by_short_name(tmp_path):
    code, out, _ = genart_in_process("parts", "vp", cwd=tmp_path)
    assert code == 0 and "genart_lightning.diffusion.vp.VP" in out and "--model.init_args.process.init_args.NAME" in out
    assert "  min_snr_gamma: " in out and "  timestep_spacing: str (default 'trailing')" in out
    code, out, _ = genart_in_process("parts", "TextImageDataModule", cwd=tmp_path)
    assert "  image_size: int (default 32)  output side in pixels" in out  # its description, from the docstring
    code, _, err = genart_in_process("parts", "PixelDifusion", cwd=tmp_path)
    assert code == 2 and "no part named 'PixelDifusion'" in err and "PixelDiffusion" in err
    code, out, err = genart_in_process("fit", "--model.help", "PixelDiffusion", cwd=tmp_path)
    assert code == 0 and "--model.guidance_scale GUIDANCE_SCALE" in out, err[-2000:]


def test_every_setting_of_every_part_has_a_description():
    """Each setting `genart parts NAME` lists (a base's too, where **kwargs hands it on) has an Args entry in
    the docstring of its class, its __init__ or a base (GenerativeModel's: the ones families share)."""
    undocumented = {}
    for _, paths in KINDS.values():
        for dotted in paths:
            cls = load(dotted)
            docs = argument_docs(cls)
            names = [param.name for param in parameters(cls)]
            assert len(settings(cls)) == len(names) > 0, dotted
            missing = [name for name in names if not docs.get(name, "").strip()]
            if missing:
                undocumented[dotted] = missing
    assert not undocumented, f"add an Args entry (what it does, why change it) for {undocumented}"
    inherited = {param.name for param in parameters(load("genart_lightning.models.diffusion.PixelDiffusion"))}
    assert {"channels", "lr", "guidance_scale", "process"} <= inherited  # DiffusionModel's, via **kwargs
