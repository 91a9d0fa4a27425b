"""Weights-only initialisation (`init_from`): fine-tune from a genart .ckpt, a `genart export` .safetensors or a
diffusers U-Net directory, with a report of what was loaded, missing, unexpected or of another shape.

Lightning's `ckpt_path` restores a whole training state (optimizer, step, data position); fine-tuning wants the
weights alone and a fresh start, and a loud account of every key that did not match.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn

from genart_lightning import UserError
from genart_lightning.models.loading import read_checkpoint, read_export, written_family

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclass
class InitReport:
    """What `init_from` did: tensor names loaded, missing from the source, unexpected in it, and of another shape."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def mismatches(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.mismatched)

    def summary(self, source: str) -> str:
        def first(names: list[str]) -> str:
            return f" ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if names else ""

        return (f"init_from {source}: loaded {len(self.loaded)} tensors; missing {len(self.missing)}{first(self.missing)}; "
                f"unexpected {len(self.unexpected)}{first(self.unexpected)}; "
                f"other shape {len(self.mismatched)}{first(self.mismatched)}")


def check_source_family(path: str, family: type) -> None:
    """A genart checkpoint or export written by another family is refused: a few tensors would match by name and the
    run would train on as if fine-tuned (`init_partial: true` skips this check to load what matches)."""
    source = Path(path).expanduser()
    if not source.is_file():
        return  # a diffusers directory names no family; a missing file is reported when read
    try:
        name = written_family(source)
    except Exception:  # unreadable: read_source_weights says so in its own line
        return
    if name and name != family.__name__:
        raise UserError(f"init_from {path} is a {name} checkpoint, but this model is {family.__name__}; give a "
                        f"checkpoint of a {family.__name__}, or set init_partial: true to load the tensors that match")


def read_source_weights(path: str, diffusers_prefix: str | None) -> dict[str, Tensor]:
    """The state dict `path` holds, keyed as in the model; a diffusers directory's keys get `diffusers_prefix`."""
    source = Path(path).expanduser()
    if source.is_dir():
        weights = source / DIFFUSERS_WEIGHTS
        if not weights.is_file():
            raise UserError(f"init_from {path} is a directory without {DIFFUSERS_WEIGHTS}; give a diffusers save_pretrained "
                            "directory (safetensors), a genart .ckpt or a `genart export` .safetensors")
        if diffusers_prefix is None:
            raise UserError(f"init_from {path} is a diffusers directory, but this model's backbone is not a diffusers "
                            "U-Net; use backbone: genart_lightning.nn.diffusers_parts.DiffusersUNetBackbone")
        from safetensors.torch import load_file

        return {diffusers_prefix + k: v for k, v in load_file(str(weights)).items()}
    if not source.is_file():
        raise FileNotFoundError(f"init_from weights not found: {path}; give a genart .ckpt, a `genart export` "
                                ".safetensors or a diffusers directory")
    if source.suffix == ".safetensors":
        return read_export(source)[2]
    checkpoint = read_checkpoint(source)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"init_from {path} has no state_dict; give a checkpoint written by `genart fit`")
    return checkpoint["state_dict"]


def load_initial_weights(model: nn.Module, weights: dict[str, Tensor], strict: bool, source: str,
                         ignore: tuple[str, ...] = ()) -> InitReport:
    """Copy the tensors of `weights` that match `model` by name and shape; strict makes any mismatch one error line.
    Names starting with an `ignore` prefix are left out on both sides (parts loaded otherwise)."""
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(ignore)} if ignore else model.state_dict()
    report = InitReport()
    usable = {}
    for name, tensor in weights.items():
        if ignore and name.startswith(ignore):
            continue
        if name not in own:
            report.unexpected.append(name)
        elif own[name].shape != tensor.shape:
            report.mismatched.append(f"{name} {tuple(tensor.shape)} vs {tuple(own[name].shape)}")
        else:
            usable[name] = tensor
    report.missing = [name for name in own if name not in weights]
    if strict and report.mismatches():
        raise UserError(report.summary(source) + "; with init_strict: true every tensor must match (set it false to "
                        "load what matches)")
    model.load_state_dict(usable, strict=False)
    report.loaded = sorted(usable)
    return report
