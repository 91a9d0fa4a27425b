"""LoRA adapters as files other tools read, and theirs read back as a starting adapter.

Two layouts: diffusers / peft (`unet.<module>.lora_A.weight`, `.lora_B.weight`, `text_encoder.<module>...`, written
by diffusers' own `save_lora_weights` with each adapter's LoraConfig as metadata, so `load_lora_weights` knows alpha;
without that metadata a file loads as if alpha were the rank) and kohya / A1111 (`lora_unet_<module with _>.lora_down
.weight`, `.lora_up.weight`, `.alpha`; `lora_te_` / `lora_te1_` / `lora_te2_` for text encoders, named as
transformers 4 names CLIP's modules; SDXL's U-Net in its original sgm block names), which ComfyUI, A1111 and diffusers
read. The kohya file is written here rather than by diffusers' `convert_state_dict_to_kohya`, which records alpha =
rank whatever the adapter's alpha was.

peft's `get_peft_model_state_dict` / `set_peft_model_state_dict` read and write the adapters; this module only
renames keys and carries alpha, folding a file's alpha / rank into the up weights where it differs from the
adapter's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from genart_lightning import UserError
from genart_lightning.nn.lora import require_peft

FORMATS = ("diffusers", "kohya")
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
"""The safetensors metadata entry diffusers keeps LoraConfigs in (`diffusers.loaders.lora_base`)."""


def _same(module: str) -> str:
    return module


@dataclass(frozen=True)
class AdaptedPart:
    """A network holding LoRA adapters, with the names other tools give it and its modules."""

    net: nn.Module
    component: str
    """The pipeline component it is: unet, transformer, text_encoder, text_encoder_2."""
    targets: tuple[str, ...]
    """The layer names its adapters sit on (peft's target_modules, recorded in diffusers' metadata)."""
    kohya_prefix: str
    """lora_unet_, lora_te_, lora_te1_, lora_te2_."""
    strip: str = ""
    """The prefix our wrapper adds to the component's module names (`unet.` in DiffusersUNet)."""
    kohya_path: Callable[[str], str] = _same
    """A module's path as kohya names it (sgm blocks for SDXL, `text_model.` for transformers 5's CLIP)."""

    def tensors(self) -> dict[str, Tensor]:
        """`<module>.lora_A.weight` / `.lora_B.weight` of every adapted layer, module paths as the component's."""
        state = require_peft().get_peft_model_state_dict(self.net)
        return {k.removeprefix(self.strip): v.detach().clone().contiguous() for k, v in state.items()}

    def modules(self) -> set[str]:
        """The adapted modules' paths (from the adapter names alone: nothing is copied)."""
        return {module_of(k.removeprefix(self.strip)) for k in require_peft().get_peft_model_state_dict(self.net)}

    def kohya_name(self, module: str) -> str:
        return self.kohya_prefix + self.kohya_path(module).replace(".", "_")


def module_of(key: str) -> str:
    """The adapted module's path of a peft key."""
    return key.rsplit(".lora_", 1)[0]


def sgm_module(module: str, layers_per_block: int) -> str:
    """A diffusers U-Net attention module's path in SDXL's original (sgm) block names, which kohya's SDXL scripts and
    ComfyUI use: `down_blocks.b.attentions.j` is `input_blocks.(1 + b (n + 1) + j).1`, `mid_block.attentions.0`
    `middle_block.1`, `up_blocks.b.attentions.j` `output_blocks.(b (n + 1) + j).1`, n = layers_per_block."""
    parts = module.split(".")
    if parts[0] == "mid_block" and parts[1:3] == ["attentions", "0"]:
        return ".".join(["middle_block", "1", *parts[3:]])
    if parts[0] in ("down_blocks", "up_blocks") and parts[2] == "attentions":
        block, layer = int(parts[1]), int(parts[3])
        index = (1 if parts[0] == "down_blocks" else 0) + block * (layers_per_block + 1) + layer
        return ".".join(["input_blocks" if parts[0] == "down_blocks" else "output_blocks", str(index), "1", *parts[4:]])
    return module  # outside the attention blocks the names agree


def backbone_part(net: nn.Module, targets: tuple[str, ...]) -> AdaptedPart:
    """The backbone as an adapted part: a diffusers U-Net (SDXL's with sgm names for kohya), PixArt's transformer,
    or one of ours (its own module names)."""
    for component in ("unet", "transformer"):
        inner = getattr(net, component, None)
        if isinstance(inner, nn.Module):
            sgm = getattr(net, "reads_sizes", False) and component == "unet"
            path = partial(sgm_module, layers_per_block=inner.config.layers_per_block) if sgm else _same
            return AdaptedPart(net, component, targets, f"lora_{component}_", f"{component}.", path)
    return AdaptedPart(net, "unet", targets, "lora_unet_")


def text_parts(encoders: list[nn.Module]) -> list[AdaptedPart]:
    """Adapted transformers text encoders (`TransformersTextEncoder`s) as parts: kohya's lora_te_ for one, lora_te1_ /
    lora_te2_ for SDXL's two; CLIP module paths under `text_model.` as transformers 4 (and kohya) name them."""
    prefixes = ["lora_te_"] if len(encoders) == 1 else ["lora_te1_", "lora_te2_"]
    parts = []
    for encoder, prefix in zip(encoders, prefixes, strict=True):
        clip_without_prefix = type(encoder.model).__name__ == "CLIPTextModel" and not hasattr(encoder.model, "text_model")
        path = partial(str.__add__, "text_model.") if clip_without_prefix else _same
        parts.append(AdaptedPart(encoder.model, encoder.subfolder, encoder.lora_targets, prefix, "", path))
    return parts


def write_lora(parts: list[AdaptedPart], alpha: float, rank: int, fmt: str, out: Path,
               pipeline_class: str = "StableDiffusionPipeline") -> Path:
    """Write the parts' adapters in `fmt`; returns the file written (diffusers: `out/pytorch_lora_weights.safetensors`,
    through `pipeline_class`'s own `save_lora_weights`)."""
    if fmt == "kohya":
        from safetensors.torch import save_file

        tensors = {}
        for part in parts:
            for key, tensor in part.tensors().items():
                name = part.kohya_name(module_of(key))
                tensors[f"{name}.{'lora_down' if '.lora_A.' in key else 'lora_up'}.weight"] = tensor
                tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out), metadata={"format": "pt", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha)})
        return out
    if fmt != "diffusers":
        raise UserError(f"unknown LoRA format {fmt!r}; choose one of {', '.join(FORMATS)}")
    from genart_lightning.nn.diffusers_parts import require_diffusers

    saver = getattr(getattr(require_diffusers(), pipeline_class, None), "save_lora_weights", None)
    if saver is None:
        raise UserError(f"diffusers has no LoRA loader for {pipeline_class}; export --lora kohya, or --merge-lora "
                        "--diffusers for the merged pipeline")
    arguments = {}
    for part in parts:
        config = require_peft().LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(part.targets)).to_dict()
        arguments[f"{part.component}_lora_layers"] = part.tensors()
        arguments[f"{part.component}_lora_adapter_metadata"] = json.loads(json.dumps(config, default=list))
    saver(out, **arguments)
    return out / DIFFUSERS_WEIGHT_NAME


def read_lora(path: str) -> tuple[dict[str, Tensor], dict[str, float], dict[str, str]]:
    """A LoRA file (diffusers / peft or kohya; a directory means its pytorch_lora_weights.safetensors): its tensors,
    the alpha of each module (kohya: by kohya name; diffusers: by component) where the file says it, and its metadata."""
    from safetensors import safe_open

    file = Path(path).expanduser()
    file = file / DIFFUSERS_WEIGHT_NAME if file.is_dir() else file
    if not file.is_file():
        raise UserError(f"LoRA file not found: {file} (from lora.weights); give a .safetensors written by genart export "
                        "--lora, diffusers' save_lora_weights or kohya's scripts")
    with safe_open(str(file), "pt") as f:
        metadata, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    if any(".lora_down." in k for k in tensors):
        alphas = {k.partition(".")[0]: float(v) for k, v in tensors.items() if k.endswith(".alpha")}
        return {k: v for k, v in tensors.items() if not k.endswith(".alpha")}, alphas, metadata
    if any(".lora_A." in k for k in tensors):
        config = json.loads(metadata.get(METADATA_KEY, "{}"))
        alphas = {k.removesuffix(".lora_alpha"): float(v) for k, v in config.items() if k.endswith(".lora_alpha")}
        return tensors, alphas, metadata
    raise UserError(f"{file} holds no LoRA tensors genart reads (neither lora_A / lora_B nor lora_down / lora_up keys)")


def load_lora(parts: list[AdaptedPart], path: str, alpha: float, rank: int) -> int:
    """Set the parts' adapters (rank `rank`, alpha `alpha`) to the file's; a file alpha different from `alpha` is folded
    into the up weights so each adapted network computes what the file's adapter computes. Returns the layers set."""
    tensors, alphas, _ = read_lora(path)
    modules = {id(part): part.modules() for part in parts}
    names = {}  # a module's name in the file -> (part, module)
    for part in parts:
        for module in modules[id(part)]:
            names[part.kohya_name(module)] = names[f"{part.kohya_prefix}{module.replace('.', '_')}"] = (part, module)
            names[f"{part.component}.{module}"] = (part, module)
    states: dict[int, dict[str, Tensor]] = {id(part): {} for part in parts}
    for key, tensor in tensors.items():
        name, _, kind = key.partition(".lora_") if ".lora_A." in key or ".lora_B." in key else key.partition(".")
        if name not in names:
            what = "a text encoder" if name.startswith(("lora_te", "text_encoder")) else "a layer"
            raise UserError(f"{path} adapts {what} this model does not ({name}); train with the lora.target_modules "
                            "(and lora.text_encoder) the file was trained with")
        part, module = names[name]
        down = kind.startswith(("A", "lora_down"))
        if down and tensor.shape[0] != rank:
            raise UserError(f"{path} has rank {tensor.shape[0]} adapters, the config lora.rank {rank}; set lora.rank: "
                            f"{tensor.shape[0]}")
        file_alpha = alphas.get(name, alphas.get(part.component, float(rank)))
        states[id(part)][f"{part.strip}{module}.lora_{'A' if down else 'B'}.weight"] = (
            tensor if down else tensor * (file_alpha / alpha))
    layers = 0
    for part in parts:
        missing = modules[id(part)] - {module_of(k.removeprefix(part.strip)) for k in states[id(part)]}
        if missing:
            raise UserError(f"{path} has no adapter for {len(missing)} adapted layers of the {part.component} (e.g. "
                            f"{sorted(missing)[0]}); set lora.target_modules / lora.text_encoder as the file was trained")
        require_peft().set_peft_model_state_dict(part.net, states[id(part)])
        layers += len(modules[id(part)])
    return layers
