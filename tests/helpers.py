"""Test scaffolding, once: the repository root, tiny network settings, CPU trainers and datamodules over shards, a
real `genart` fit config, the `genart` command in-process and as a subprocess, tar writing, a pickle payload."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TINY_UNET = {"base_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1], "head_channels": 16}
"""The U-Net of the training tests: 16px in a second or two per 100 steps on one CPU core."""


def tiny_unet(**overrides):
    """A UNetBackbone with TINY_UNET's settings (and `overrides`)."""
    from genart_lightning.nn.unet import UNetBackbone

    return UNetBackbone(**{**TINY_UNET, **overrides})


def shards_data(shards: dict, batch_size: int = 32, image_size: int = 16, **kwargs):
    """A TextImageDataModule over a shards fixture's train and val shards, read in-process."""
    from datamodules.webdataset import TextImageDataModule

    return TextImageDataModule(shards["train_urls"], shards.get("val_urls"), batch_size=batch_size, num_workers=0,
                               image_size=image_size, **kwargs)


def cpu_trainer(root: Path | str | None, steps: int, **kwargs):
    """A quiet CPU Trainer that validates only where a test asks (`trainer.validate`), clipping gradients at 1."""
    import lightning as L

    settings = {"max_steps": steps, "accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                "enable_model_summary": False, "num_sanity_val_steps": 0, "limit_val_batches": 2,
                "check_val_every_n_epoch": 1000, "gradient_clip_val": 1.0, "default_root_dir": root}
    return L.Trainer(**{**settings, **kwargs})


def tiny_config(shards: dict, max_steps: int = 8) -> dict:
    """A real VAE fit on 16px shapes shards, small enough for a few seconds on one CPU core."""
    return {
        "model": {
            "class_path": "genart_lightning.models.vae.VAE",
            "init_args": {"image_size": 16, "latent_channels": 2, "base_channels": 8, "channel_mults": [1, 2],
                          "num_res_blocks": 1, "lr": 1e-3, "num_logged_reconstructions": 0},
        },
        "data": {
            "class_path": "datamodules.webdataset.TextImageDataModule",
            "init_args": {"train_urls": shards["train_urls"], "val_urls": shards["val_urls"], "batch_size": 8,
                          "num_workers": 0, "image_size": 16, "shuffle_buffer": 16, "seed": 0},
        },
        "trainer": {"max_steps": max_steps, "accelerator": "cpu", "devices": 1, "log_every_n_steps": 1,
                    "limit_val_batches": 0, "enable_progress_bar": False,
                    "enable_model_summary": False},
        "sample_grid": {"every_n_steps": 0, "num_samples": 4},
    }


def genart_in_process(*args: str, cwd: Path | None = None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the `genart` console script's entry run in this process: what a user sees,
    without a new interpreter importing torch and Lightning (about 5 CPU-s each)."""
    from genart_lightning.cli import entry

    out, err = io.StringIO(), io.StringIO()
    code = 0
    before = os.getcwd()
    try:
        os.chdir(cwd or before)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            entry(list(args))
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        os.chdir(before)
    return code, out.getvalue(), err.getvalue()


def start_genart(*args: str, cwd: Path, env: dict | None = None, merge_stderr: bool = True) -> subprocess.Popen:
    """Start the `genart` console script as a user would (a fresh process, one CPU thread); stdout and stderr
    together unless `merge_stderr` is False."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "genart_lightning.cli", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    """Wait for a started `genart` and fail with the end of its output if it failed; returns the output."""
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(proc.args[2:])} exited {proc.returncode}:\n{out[-4000:]}"
    return out


def genart(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300) -> str:
    """Run `genart ARGS` to the end in a subprocess; returns its output."""
    return finish(start_genart(*args, cwd=cwd, env=env), timeout)


def step_losses(metrics_csv: Path, key: str = "train/loss") -> list[tuple[int, float]]:
    """(step, value) of every row of a CSVLogger metrics.csv that has `key`."""
    with open(metrics_csv) as f:
        return [(int(row["step"]), float(row[key])) for row in csv.DictReader(f) if row.get(key)]


def add_member(tar: tarfile.TarFile, name: str, data: bytes, pax: dict | None = None) -> None:
    """Append a regular file `name` holding `data` to an open tar."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.pax_headers = dict(pax or {})
    tar.addfile(info, io.BytesIO(data))


class PicklePayload:
    """Unpickling this creates a file: proof that a loader ran code from a shard."""

    def __init__(self, path: str | Path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


DIGITS_STEPS = 300
"""Training steps of the tiny digits models: at 8px, about 25 s each on one core (text tower trained along)."""


def digits_model(name: str):
    """One tiny text-conditional pixel diffusion per process (vp, edm, flow), as the shipped configs train them: text
    tower trained along at 0.1x, caption dropout 0.1, EMA for sampling."""
    from genart_lightning.diffusion.edm import EDM
    from genart_lightning.diffusion.flow import Flow
    from genart_lightning.diffusion.vp import VP
    from genart_lightning.models.diffusion import PixelDiffusion

    process = {"vp": VP(prediction="v"), "edm": EDM(), "flow": Flow()}[name]
    return PixelDiffusion(image_size=8, process=process, backbone=tiny_unet(), lr=3e-3, warmup_steps=20,
                          ema_decay=0.99, sample_steps=20, train_text_encoder=True)


def train_on_digits(name: str, shards: dict, root: Path) -> dict:
    """Fit `digits_model(name)` on the 8px digits for DIGITS_STEPS steps; the model, its checkpoint and its validation
    loss before and after."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0)
    model = digits_model(name)
    data = shards_data(shards, image_size=8)
    checkpoint = ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0, every_n_train_steps=DIGITS_STEPS)
    trainer = cpu_trainer(root, DIGITS_STEPS, callbacks=[checkpoint], limit_val_batches=4)
    before = trainer.validate(model, data, verbose=False)[0]["val/loss"]
    trainer.fit(model, data)
    after = trainer.validate(model, data, verbose=False)[0]["val/loss"]
    return {"name": name, "model": model.eval(), "ckpt": root / "last.ckpt", "root": root, "before": before, "after": after}


def save_untrained(model, path: Path) -> Path:
    """`model`'s checkpoint as `genart fit` writes one, without training (random-init networks for shape tests)."""
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", logger=False, max_steps=0, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)
    return Path(path)


SIZES = [(32, 32), (48, 24), (24, 48), (40, 20), (20, 40), (36, 28)]
"""(width, height) of the test images: square, 2:1 and 1:2 (two sizes each), and a little wider than square."""
STEP = 8
"""bucket_step of the aspect-bucket tests: bucket sides are multiples of it."""


def write_mixed_shards(out: Path, samples: int, per_shard: int, seed: int = 0) -> str:
    """Image shards of one flat colour per image at the (width, height) SIZES, for aspect buckets."""
    import random

    from PIL import Image

    from datamodules.shards import write_shards

    rng = random.Random(seed)

    def sample(i: int) -> dict:
        width, height = rng.choice(SIZES)
        image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return {"__key__": f"{i:06d}", "png": buffer.getvalue(), "txt": f"a picture, {width}x{height}".encode()}

    written = write_shards((sample(i) for i in range(samples)), out, "train", per_shard)
    return f"{out}/train-{{000000..{len(written) - 1:06d}}}.tar"
