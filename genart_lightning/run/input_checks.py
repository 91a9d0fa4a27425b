"""A parsed `genart fit` config checked before anything is built: each mistake is one line naming it and the fix."""

from __future__ import annotations

import pickle
from pathlib import Path

from jsonargparse import Namespace

from datamodules.webdataset import existing_shards
from genart_lightning import UserError, describe
from genart_lightning.models.loading import is_sharded_checkpoint, written_family

NAMED_CHECKPOINTS = ("last", "best", "hpc", "registry")
"""`--ckpt_path` values Lightning resolves itself."""


def init_args(config: Namespace, key: str) -> Namespace:
    section = config.get(key)
    return (section.get("init_args") or Namespace()) if isinstance(section, Namespace) else Namespace()


def check_inputs(config: Namespace) -> None:
    """The shards and checkpoint a run reads exist, the image size is said once, and a resumed checkpoint is readable
    and of the configured family (one line naming the first problem), before anything is built."""
    data, model = init_args(config, "data"), init_args(config, "model")
    for name in ("train_urls", "val_urls"):
        if data.get(name):
            existing_shards(data[name], name)
    sizes = (model.get("image_size"), data.get("image_size"))
    if None not in sizes and sizes[0] != sizes[1]:
        raise UserError(f"--model.image_size={sizes[0]} and --data.image_size={sizes[1]} differ: the model generates "
                        "the size the data is read at; set both to the same value")
    ckpt = config.get("ckpt_path")
    if ckpt and ckpt not in NAMED_CHECKPOINTS:
        check_resume_checkpoint(Path(ckpt), (config.get("model") or Namespace()).get("class_path"))


def check_resume_checkpoint(path: Path, configured: str | None) -> None:
    """`--ckpt_path` exists, holds nothing but tensors and plain data, and was written by the configured family
    (Lightning would otherwise take the family from the checkpoint, silently, and fail later with a traceback)."""
    if not (path.is_file() or is_sharded_checkpoint(path)):
        raise UserError(f"checkpoint not found: {path} (from --ckpt_path); pass a .ckpt written by `genart fit`")
    try:
        family = written_family(path)
    except pickle.UnpicklingError:
        raise UserError(f"checkpoint {path} (from --ckpt_path) holds objects other than tensors, which are not unpickled "
                        "(they could run code); pass a .ckpt written by `genart fit`") from None
    except Exception as err:  # truncated zips, foreign files: each fails its own way
        raise UserError(f"checkpoint {path} (from --ckpt_path) is unreadable ({describe(err)}); pass an earlier "
                        "checkpoint of the run") from None
    if family and configured and family != configured.rpartition(".")[2]:
        raise UserError(f"--ckpt_path {path} is a {family} checkpoint, but the config trains "
                        f"{configured.rpartition('.')[2]}; resume with the config of its run (its checkpoints/config.yaml), "
                        "or load weights only with --model.init_args.init_from")
