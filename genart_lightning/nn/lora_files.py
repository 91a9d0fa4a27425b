"""LoRA adapters as files other tools read, and theirs read back as a starting adapter.

Two layouts: diffusers / peft (`unet.<module>.lora_A.weight`, `.lora_B.weight`, written by diffusers' own
`save_lora_weights` with the adapter's LoraConfig as metadata, so `load_lora_weights` knows alpha; without that
metadata a file loads as if alpha were the rank) and kohya / A1111 (`lora_unet_<module with _>.lora_down.weight`,
`.lora_up.weight`, `.alpha`; SDXL's in its original sgm block names), which ComfyUI, A1111 and diffusers read. The kohya file is written here rather than by
diffusers' `convert_state_dict_to_kohya`, which records alpha = rank whatever the adapter's alpha was.

peft's `get_peft_model_state_dict` / `set_peft_model_state_dict` read and write the adapters; this module only
renames keys and carries alpha, folding a file's alpha / rank into the up weights where it differs from the
adapter's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from genart_lightning import UserError
from genart_lightning.nn.lora import require_peft

FORMATS = ("diffusers", "kohya")
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
"""The safetensors metadata entry diffusers keeps LoraConfigs in (`diffusers.loaders.lora_base`)."""
KOHYA_PREFIX = "lora_unet_"


def adapter_tensors(net: nn.Module) -> dict[str, Tensor]:
    """`<module>.lora_A.weight` / `.lora_B.weight` of every adapted layer of `net`, named from `net`."""
    return {k: v.detach().clone().contiguous() for k, v in require_peft().get_peft_model_state_dict(net).items()}


def backbone_module(key: str) -> str:
    """The adapted module's path of a peft key, without the `unet.` of our diffusers wrapper."""
    return key.rsplit(".lora_", 1)[0].removeprefix("unet.")


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


def kohya_name(module: str, sgm_layers_per_block: int | None) -> str:
    """`lora_unet_` + the module's path with `_` for `.` (in sgm block names for SDXL)."""
    path = sgm_module(module, sgm_layers_per_block) if sgm_layers_per_block is not None else module
    return KOHYA_PREFIX + path.replace(".", "_")


def sgm_layers(net: nn.Module) -> int | None:
    """layers_per_block of an SDXL U-Net (whose kohya files use sgm block names), None for any other network."""
    unet = getattr(net, "unet", None)
    return unet.config.layers_per_block if getattr(net, "reads_sizes", False) else None


def to_kohya(tensors: dict[str, Tensor], alpha: float, sgm_layers_per_block: int | None = None) -> dict[str, Tensor]:
    """peft adapter tensors -> kohya keys (sgm block names when `sgm_layers_per_block` is set), with each alpha."""
    out: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        name = kohya_name(backbone_module(key), sgm_layers_per_block)
        part = "lora_down" if ".lora_A." in key else "lora_up"
        out[f"{name}.{part}.weight"] = tensor
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def write_lora(net: nn.Module, alpha: float, rank: int, target_modules: list[str], fmt: str, out: Path) -> Path:
    """Write `net`'s adapters in `fmt`; returns the file written (diffusers: `out/pytorch_lora_weights.safetensors`)."""
    tensors = adapter_tensors(net)
    if fmt == "kohya":
        from safetensors.torch import save_file

        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(to_kohya(tensors, alpha, sgm_layers(net)), str(out), metadata={"format": "pt", "ss_network_dim": str(rank),
                                                                 "ss_network_alpha": str(alpha)})
        return out
    if fmt != "diffusers":
        raise UserError(f"unknown LoRA format {fmt!r}; choose one of {', '.join(FORMATS)}")
    from genart_lightning.nn.diffusers_parts import require_diffusers

    config = require_peft().LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules).to_dict()
    unet_layers = {k.removeprefix("unet."): v for k, v in tensors.items()}
    require_diffusers().StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=unet_layers, unet_lora_adapter_metadata=json.loads(json.dumps(config, default=list)))
    return out / DIFFUSERS_WEIGHT_NAME


def read_lora(path: str) -> tuple[dict[str, Tensor], dict[str, float]]:
    """A LoRA file (diffusers / peft or kohya; a directory means its pytorch_lora_weights.safetensors) as peft keys
    relative to the U-Net (`<module>.lora_A.weight`), and each module's alpha where the file says it."""
    from safetensors import safe_open

    file = Path(path).expanduser()
    file = file / DIFFUSERS_WEIGHT_NAME if file.is_dir() else file
    if not file.is_file():
        raise UserError(f"LoRA file not found: {file} (from lora.weights); give a .safetensors written by genart export "
                        "--lora, diffusers' save_lora_weights or kohya's scripts")
    with safe_open(str(file), "pt") as f:
        metadata, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    if any(".lora_down." in k for k in tensors):
        return _from_kohya(tensors, file)
    if any(".lora_A." in k for k in tensors):
        config = json.loads(metadata.get(METADATA_KEY, "{}"))
        alpha = config.get("unet.lora_alpha")
        out = {k.removeprefix("unet."): v for k, v in tensors.items() if not k.startswith("text_encoder")}
        return out, ({backbone_module(k): float(alpha) for k in out} if alpha is not None else {})
    raise UserError(f"{file} holds no LoRA tensors genart reads (neither lora_A / lora_B nor lora_down / lora_up keys)")


def _from_kohya(tensors: dict[str, Tensor], file: Path) -> tuple[dict[str, Tensor], dict[str, float]]:
    """kohya keys name modules with `_` for `.`: kept as given, resolved against the network in `load_lora`."""
    out, alphas = {}, {}
    for key, tensor in tensors.items():
        name, _, part = key.partition(".")
        if not name.startswith(KOHYA_PREFIX):
            if name.startswith("lora_te"):
                raise UserError(f"{file} adapts a text encoder ({name}); genart's LoRA adapts the backbone only")
            continue
        if part == "alpha":
            alphas[name] = float(tensor)
        else:
            out[f"{name}.{'lora_A' if part.startswith('lora_down') else 'lora_B'}.weight"] = tensor
    return out, alphas


def load_lora(net: nn.Module, path: str, alpha: float, rank: int) -> int:
    """Set `net`'s adapters (rank `rank`, alpha `alpha`) to the file's; a file alpha different from `alpha` is folded
    into the up weights so the adapted network computes what the file's adapter computes. Returns the layers set."""
    tensors, alphas = read_lora(path)
    modules = {backbone_module(k) for k in adapter_tensors(net)}
    kohya_names = {kohya_name(m, None): m for m in modules} | {kohya_name(m, sgm_layers(net)): m for m in modules}
    prefix = "unet." if any(k.startswith("unet.") for k in adapter_tensors(net)) else ""
    state = {}
    for key, tensor in tensors.items():
        name, _, part = key.rpartition(".lora_")
        module = kohya_names.get(name, name)
        if module not in modules:
            raise UserError(f"{path} adapts {name}, which is not an adapted layer of this backbone; train with the "
                            "lora.target_modules the file was trained with (to_q, to_k, ...)")
        if part.startswith("A") and tensor.shape[0] != rank:
            raise UserError(f"{path} has rank {tensor.shape[0]} adapters, the config lora.rank {rank}; set lora.rank: "
                            f"{tensor.shape[0]}")
        file_alpha = alphas.get(name, alphas.get(module, float(rank)))
        state[f"{prefix}{module}.lora_{part}"] = tensor * (file_alpha / alpha) if part.startswith("B") else tensor
    missing = modules - {backbone_module(k) for k in state}
    if missing:
        raise UserError(f"{path} has no adapter for {len(missing)} adapted layers (e.g. {sorted(missing)[0]}); set "
                        "lora.target_modules to the layers the file adapts")
    require_peft().set_peft_model_state_dict(net, state)
    return len(modules)
