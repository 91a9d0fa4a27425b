"""`genart export`: a training checkpoint -> safetensors weights with the family, hyperparameters and config as metadata,
or (`--diffusers DIR`) a model built from diffusers parts -> a whole pipeline directory where it has one (built from a
pipeline, or over a diffusers VAE and an OpenCLIP text tower), else diffusers directories (`unet/`, `vae/`) that
`from_pretrained` loads."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported lazily below, so `genart --help` stays fast
    from genart_lightning.models.diffusion import DiffusionModel


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="convert a .ckpt to .safetensors (weights + config metadata)", description=__doc__)
    p.add_argument("--ckpt", required=True, help="checkpoint written by `genart fit` (.ckpt)")
    p.add_argument("--out", help="output file (default: the checkpoint's path with .safetensors)")
    p.add_argument("--diffusers", metavar="DIR", help="write the EMA U-Net (and a diffusers VAE first stage) as diffusers "
                   "save_pretrained directories DIR/unet and DIR/vae instead; a model built from a pipeline is written "
                   "as a whole pipeline (DiffusionPipeline.from_pretrained(DIR)), and so is one over a diffusers VAE and an "
                   "OpenCLIP text tower (a StableDiffusionPipeline)")
    p.add_argument("--merge-lora", action="store_true", help="fold the LoRA adapters of a LoRA fine-tuning checkpoint "
                   "into the base weights and write plain weights that need neither the base nor peft (without it, a "
                   "LoRA checkpoint exports its adapters only)")
    p.add_argument("--lora", choices=("diffusers", "kohya"), help="write a LoRA checkpoint's (EMA) adapters as a file "
                   "other tools load: diffusers (DIR/pytorch_lora_weights.safetensors with alpha in its metadata, for "
                   "pipe.load_lora_weights) or kohya (one .safetensors with lora_down / lora_up / alpha keys, for "
                   "ComfyUI and A1111); --out names the directory or file")
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


def export_diffusers(ckpt: Path, out: Path, merge_lora: bool = False) -> tuple[list[Path], str | None]:
    """Write a model with a diffusers U-Net backbone where diffusers reads it: the paths written, and why they are not a
    whole pipeline (None when they are). A model built from a pipeline is written as that pipeline (`export_pipeline`);
    one over a diffusers VAE and an OpenCLIP text tower as a Stable Diffusion pipeline (`export_openclip_pipeline`)
    where that pipeline samples as the model does; any other as save_pretrained directories of the sampling (EMA)
    U-Net and a diffusers first stage."""
    from genart_lightning import UserError
    from genart_lightning.models.loading import load_model
    from genart_lightning.nn.diffusers_parts import DiffusersAutoencoder, DiffusersUNet

    model = merged_model(ckpt) if merge_lora else load_model(ckpt)
    if getattr(model, "lora", None) is not None:
        raise UserError(f"{ckpt} holds LoRA adapters, which a diffusers U-Net directory cannot; add --merge-lora to "
                        "write the U-Net with the adapters folded in")
    if getattr(model, "pipeline", None) is not None:
        return [export_pipeline(model, out)], None
    net = model.ema.module if hasattr(model, "ema") else None
    if not isinstance(net, DiffusersUNet):
        raise UserError(f"{ckpt} has a {type(net or model).__name__} backbone, not a diffusers U-Net, so it has no diffusers "
                        "form; export it without --diffusers (genart safetensors)")
    if (why_not := openclip_pipeline_blocker(model)) is None:
        return [export_openclip_pipeline(model, out)], None
    written = [out / "unet"]
    net.unet.save_pretrained(written[0])
    if isinstance(getattr(model, "first_stage", None), DiffusersAutoencoder):
        written.append(out / "vae")
        model.first_stage.vae.save_pretrained(written[1])
    return written, why_not


def openclip_pipeline_blocker(model: DiffusionModel) -> str | None:
    """Why a model over a diffusers U-Net (not built from a pipeline) has no StableDiffusionPipeline that samples what it
    samples; None when it has one (diffusers VAE, OpenCLIP text tower, VP process, U-Net reading tokens only)."""
    from genart_lightning.diffusion.diffusers_schedulers import scheduler_for
    from genart_lightning.nn.diffusers_parts import DiffusersAutoencoder
    from genart_lightning.nn.openclip_export import conversion_blocker
    from genart_lightning.nn.text_encoder import FrozenTextEncoder

    first_stage, net = getattr(model, "first_stage", None), model.ema.module
    text = model.sampling_text_encoder
    if first_stage is None:
        return "a pixel-space model has no VAE"
    if not isinstance(first_stage, DiffusersAutoencoder):
        return f"its first stage is a {type(first_stage).__name__}, not a diffusers AutoencoderKL"
    if first_stage.shift_factor:
        return f"its VAE has shift_factor {first_stage.shift_factor}, which StableDiffusionPipeline does not apply"
    if net.attention_mask or getattr(net, "reads_sizes", False):
        return "its U-Net reads the caption mask or size ids, which StableDiffusionPipeline does not pass"
    if not isinstance(text, FrozenTextEncoder):
        return "it has no text encoder" if text is None else f"its text encoder is a {type(text).__name__}"
    try:
        scheduler_for(model.process, model.hparams.sampler)
    except ValueError as err:
        return str(err).split(";")[0]
    return conversion_blocker(text)


def export_openclip_pipeline(model: DiffusionModel, out: Path) -> Path:
    """A StableDiffusionPipeline of this model's sampling weights: the EMA U-Net, the diffusers VAE, the OpenCLIP tower
    as a CLIPTextModel ending at the layer the model reads with a CLIP tokenizer giving OpenCLIP's ids, padding
    included (nn/openclip_export.py), and the scheduler that walks the model's process and sampler as `genart sample`
    does; in files transformers 4 reads too (`vocab.json` / `merges.txt`, `text_model.` keys)."""
    from genart_lightning.nn.diffusers_parts import require_diffusers
    from genart_lightning.nn.openclip_export import clip_text_model, clip_tokenizer

    text = model.sampling_text_encoder
    pipe = require_diffusers().StableDiffusionPipeline(
        vae=model.first_stage.vae, text_encoder=clip_text_model(text), tokenizer=clip_tokenizer(text),
        unet=model.ema.module.unet, scheduler=sampling_scheduler(model), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(out)
    readable_by_transformers_4(out, "text_encoder", "tokenizer")
    return out


def sampling_scheduler(model: DiffusionModel) -> Any:
    """The diffusers scheduler that walks this model's process and sampler as `genart sample` does."""
    from genart_lightning.diffusion.diffusers_schedulers import scheduler_for
    from genart_lightning.nn.diffusers_parts import require_diffusers

    name, config = scheduler_for(model.process, model.hparams.sampler)
    return getattr(require_diffusers(), name).from_config(config)


def readable_by_transformers_4(out: Path, encoder: str, tokenizer: str) -> None:
    """A saved pipeline's text encoder and tokenizer folders as transformers 4 reads them too: CLIP tokenizers get
    `vocab.json` / `merges.txt` beside `tokenizer.json`, CLIPTextModel keys the `text_model.` prefix."""
    from genart_lightning.nn.transformers_text import write_bpe_files, write_text_model_prefix

    write_bpe_files(out / tokenizer)
    write_text_model_prefix(out / encoder)


def export_pipeline(model: DiffusionModel, out: Path) -> Path:
    """The source pipeline with this model's sampling weights (EMA U-Net or transformer, text encoder(s) as sampled
    with) and a scheduler that walks this model's process and sampler as `genart sample` does, saved where
    `DiffusionPipeline.from_pretrained` reads it, in files transformers 4 reads too: tokenizer folders keep the
    source's files (T5's `spiece.model`) and CLIP's get `vocab.json` / `merges.txt`, CLIP text encoders' keys the
    `text_model.` prefix."""
    from genart_lightning.nn.diffusers_parts import require_diffusers

    encoders = model.sampling_text_encoder.encoders()
    pipe = require_diffusers().DiffusionPipeline.from_pretrained(
        model.pipeline.path, vae=model.first_stage.vae, scheduler=sampling_scheduler(model),
        **{encoder.subfolder: encoder.model for encoder in encoders},
        **{model.pipeline.backbone_subfolder: getattr(model.ema.module, model.pipeline.backbone_subfolder)})
    pipe.save_pretrained(out)
    for encoder in encoders:
        source, written = Path(model.pipeline.path) / encoder.tokenizer_subfolder, out / encoder.tokenizer_subfolder
        for file in source.iterdir():  # transformers 5 writes tokenizer.json only; 4's slow tokenizers read the others
            if file.is_file() and not (written / file.name).exists():
                shutil.copy2(file, written / file.name)
        readable_by_transformers_4(out, encoder.subfolder, encoder.tokenizer_subfolder)
    return out


def export_lora(ckpt: Path, fmt: str, out: Path | None) -> Path:
    """The sampling (EMA) adapters of a LoRA checkpoint in `fmt` (nn/lora_files.py), at `out` or beside the checkpoint."""
    from genart_lightning import UserError
    from genart_lightning.models.loading import load_model
    from genart_lightning.nn.lora_files import write_lora

    model = load_model(ckpt)
    settings = getattr(model, "lora", None)
    if settings is None:
        raise UserError(f"{ckpt} has no LoRA adapters to export; export it without --lora")
    default = ckpt.with_name(f"{ckpt.stem}_lora" + ("_kohya.safetensors" if fmt == "kohya" else ""))
    pipeline_class = model.pipeline.class_name if getattr(model, "pipeline", None) else "StableDiffusionPipeline"
    return write_lora(model.lora_parts(sampling=True), settings.alpha or settings.rank, settings.rank, fmt,
                      out or default, pipeline_class)


def run(args: argparse.Namespace) -> None:
    from genart_lightning.models.base import FAMILY_KEY

    ckpt = Path(args.ckpt)
    if args.lora:
        written = export_lora(ckpt, args.lora, Path(args.out) if args.out else None)
        print(f"wrote {written} (LoRA adapters, {args.lora} format, EMA weights)")
        return
    if args.diffusers:
        written, why_not = export_diffusers(ckpt, Path(args.diffusers), args.merge_lora)
        if why_not is None:
            parts = sorted(p.name for p in written[0].iterdir() if p.is_dir())
            what = f"a diffusers pipeline: {', '.join(parts)}"
        else:
            what = f"diffusers save_pretrained, not a whole pipeline: {why_not}"
        print(f"wrote {', '.join(map(str, written))} ({what}; the U-Net holds the EMA weights)")
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
