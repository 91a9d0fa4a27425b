"""`genart export`: a training checkpoint -> safetensors weights with the family, hyperparameters and config as metadata,
or (`--diffusers DIR`) a model built from diffusers parts -> diffusers directories (`unet/`, `vae/`) that
`from_pretrained` loads."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported lazily below, so `genart --help` stays fast
    from genart_lightning.models.diffusion import DiffusionModel


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="convert a .ckpt to .safetensors (weights + config metadata)", description=__doc__)
    p.add_argument("--ckpt", required=True, help="checkpoint written by `genart fit` (.ckpt)")
    p.add_argument("--out", help="output file (default: the checkpoint's path with .safetensors)")
    p.add_argument("--diffusers", metavar="DIR", help="write the EMA U-Net (and a diffusers VAE first stage) as diffusers "
                   "save_pretrained directories DIR/unet and DIR/vae instead")
    p.add_argument("--merge-lora", action="store_true", help="fold the LoRA adapters of a LoRA fine-tuning checkpoint "
                   "into the base weights and write plain weights that need neither the base nor peft (without it, a "
                   "LoRA checkpoint exports its adapters only)")
    p.add_argument("--config", help="resolved config to embed (default: config.yaml beside the checkpoint, if any)")
    p.set_defaults(func=run)


def export_checkpoint(ckpt: Path, out: Path, config: Path | None = None, merge_lora: bool = False) -> dict[str, str]:
    """Write `ckpt`'s model state (EMA weights included) to `out` as safetensors; returns the metadata written.
    `merge_lora` writes a LoRA checkpoint's weights with the adapters folded in (a plain model) instead."""
    from safetensors.torch import save_file

    from genart_lightning.models.base import FAMILY_KEY
    from genart_lightning.models.loading import read_checkpoint

    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint not found: {ckpt} (from --ckpt); pass a .ckpt written by `genart fit`")
    checkpoint = read_checkpoint(ckpt)
    if FAMILY_KEY not in checkpoint:
        raise ValueError(f"{ckpt} has no '{FAMILY_KEY}' entry: it was not written by a genart family")
    if config is not None and not config.is_file():
        raise FileNotFoundError(f"config not found: {config} (from --config); omit it to use config.yaml beside the checkpoint")
    config = config or ckpt.parent / "config.yaml"
    hyper_parameters, state_dict = checkpoint.get("hyper_parameters", {}), checkpoint["state_dict"]
    if merge_lora:
        model = merged_model(ckpt)
        hyper_parameters, state_dict = dict(model.hparams), model.state_dict()
    metadata = {
        FAMILY_KEY: checkpoint[FAMILY_KEY],
        "hyper_parameters": json.dumps(hyper_parameters),
        "global_step": str(checkpoint.get("global_step", "")),
        "source": ckpt.name,
    }
    if config.is_file() and not merge_lora:  # the training config names the LoRA settings the merged weights lack
        metadata["config"] = config.read_text()
    # safetensors refuses tensors that share storage or are views; each gets its own contiguous copy.
    tensors = {name: t.detach().contiguous().clone() for name, t in state_dict.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=metadata)
    return metadata


def merged_model(ckpt: Path) -> DiffusionModel:
    """The model of a LoRA checkpoint with its adapters folded into the base weights."""
    from genart_lightning import UserError
    from genart_lightning.models.loading import load_model

    model = load_model(ckpt)
    if getattr(model, "lora", None) is None:
        raise UserError(f"{ckpt} has no LoRA adapters to merge; export it without --merge-lora")
    return model.without_lora()


def export_diffusers(ckpt: Path, out: Path, merge_lora: bool = False) -> list[Path]:
    """Save the sampling (EMA) weights of a diffusers U-Net backbone, and a diffusers first stage, with save_pretrained."""
    from genart_lightning import UserError
    from genart_lightning.models.loading import load_model
    from genart_lightning.nn.diffusers_parts import DiffusersAutoencoder, DiffusersUNet

    model = merged_model(ckpt) if merge_lora else load_model(ckpt)
    if getattr(model, "lora", None) is not None:
        raise UserError(f"{ckpt} holds LoRA adapters, which a diffusers U-Net directory cannot; add --merge-lora to "
                        "write the U-Net with the adapters folded in")
    net = model.ema.module if hasattr(model, "ema") else None
    if not isinstance(net, DiffusersUNet):
        raise UserError(f"{ckpt} has a {type(net or model).__name__} backbone, not a diffusers U-Net, so it has no diffusers "
                        "form; export it without --diffusers (genart safetensors)")
    written = [out / "unet"]
    net.unet.save_pretrained(written[0])
    if isinstance(getattr(model, "first_stage", None), DiffusersAutoencoder):
        written.append(out / "vae")
        model.first_stage.vae.save_pretrained(written[1])
    return written


def run(args: argparse.Namespace) -> None:
    from genart_lightning.models.base import FAMILY_KEY

    ckpt = Path(args.ckpt)
    if args.diffusers:
        written = export_diffusers(ckpt, Path(args.diffusers), args.merge_lora)
        print(f"wrote {', '.join(map(str, written))} (diffusers save_pretrained; the U-Net holds the EMA weights)")
        return
    out = Path(args.out) if args.out else ckpt.with_suffix(".safetensors")
    metadata = export_checkpoint(ckpt, out, Path(args.config) if args.config else None, args.merge_lora)
    lora = json.loads(metadata["hyper_parameters"]).get("lora")
    notes = ["with config" if "config" in metadata else "no config.yaml embedded"]
    if args.merge_lora:
        notes.append("LoRA adapters merged")
    elif lora:
        notes.append("LoRA adapters only: loading it needs the base weights it was trained over; --merge-lora writes "
                     "standalone weights")
    print(f"wrote {out} ({metadata[FAMILY_KEY]}, step {metadata['global_step']}, {'; '.join(notes)})")
