"""Run under `torchrun --nproc-per-node 2`: for one family, a DDP fit, an FSDP2 fit (checkpoint half way) and an FSDP2
fit resumed from that checkpoint, all from the same seed; rank 0 saves each run's final full weights, and every rank
its parameter + optimizer bytes.

    torchrun --nproc-per-node 2 tests/fsdp_runs.py FAMILY[,FAMILY...] TRAIN_URLS OUT_DIR [--sharded]
    (each family's runs in OUT_DIR/FAMILY; --sharded adds sharded checkpoints and HSDP runs for the first family)
    python tests/fsdp_runs.py bf16 TRAIN_URLS -     (one process: bf16 + checkpointing under FSDP2, and the SD pipeline
                                                     at $GENART_TEST_PIPELINE fine-tuned under FSDP2; JSON on stdout)

With --sharded, also the same FSDP2 fit and resume with sharded checkpoints (a directory of per-rank files).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.webdataset import TextImageDataModule
from genart_lightning.callbacks.rank_state import RankState
from genart_lightning.diffusion.flow import Flow
from genart_lightning.diffusion.vp import VP
from genart_lightning.models.diffusion import PixelDiffusion
from genart_lightning.models.latent_diffusion import LatentDiffusion
from genart_lightning.nn.dit import DiTBackbone
from genart_lightning.nn.sharding import local
from genart_lightning.nn.unet import UNetBackbone
from genart_lightning.run.checkpoint_io import AtomicCheckpointIO
from genart_lightning.run.fsdp import FSDP2Strategy

STEPS = 4
FAMILIES = {
    "flow_dit": lambda: PixelDiffusion(image_size=16, process=Flow(), clip_x0=False, lr=1e-3, ema_decay=0.9,
                                       backbone=DiTBackbone(patch_size=4, hidden_size=64, depth=4, num_heads=2)),
    "vp_unet": lambda: PixelDiffusion(image_size=16, process=VP(prediction="v"), lr=1e-3, ema_decay=0.9,
                                      backbone=UNetBackbone(base_channels=32, channel_mult=[1, 2], num_res_blocks=1,
                                                            attention_levels=[1], head_channels=32)),
}


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes this rank holds of the trainable networks' parameters (live and EMA) and of the optimizer's state."""
    tensors = [p for p in model.parameters() if p.requires_grad] + list(model.ema.module.parameters())
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() > 0]
    return sum(local(t).numel() * t.element_size() for t in tensors)


class Report(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        full = {k: getattr(v, "full_tensor", lambda v=v: v)() for k, v in pl_module.state_dict().items()
                if k.startswith(("backbone.", "ema.module."))}  # full_tensor: all ranks gather a sharded one
        if trainer.global_rank == 0:
            torch.save({k: v.detach().cpu().clone() for k, v in full.items()}, self.out / "weights.pt")
        nbytes = state_bytes(pl_module, trainer.optimizers[0])
        (self.out / f"bytes-rank{trainer.global_rank}.json").write_text(json.dumps(nbytes))


def fit(family: str, urls: str, out: Path, strategy: str, ckpt_path: str | None = None, sharded: bool = False,
        hsdp_replicas: int | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(0)
    checkpoints = ModelCheckpoint(dirpath=out / "checkpoints", every_n_train_steps=STEPS // 2, save_top_k=-1)
    trainer = L.Trainer(
        max_steps=STEPS, accelerator="cpu", devices=2, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        strategy=FSDP2Strategy(save_distributed_checkpoint=sharded, hsdp_replicas=hsdp_replicas) if strategy == "fsdp2"
        else "ddp", plugins=[AtomicCheckpointIO()],
        callbacks=[checkpoints, RankState(), Report(out)],  # RankState: per-rank RNG, as `genart fit` attaches
    )
    data = TextImageDataModule(urls, batch_size=4, num_workers=0, image_size=16)
    trainer.fit(FAMILIES[family](), data, ckpt_path=ckpt_path)


def bf16_units(urls: str) -> dict:
    """One process: FSDP2 + bf16-mixed + gradient checkpointing on a DiT, then a whole SD pipeline model under FSDP2;
    what the test checks, as JSON."""
    from torch.distributed.fsdp import FSDPModule

    model = PixelDiffusion(image_size=16, process=Flow(), clip_x0=False, gradient_checkpointing=True,
                           backbone=DiTBackbone(patch_size=4, hidden_size=32, depth=2, num_heads=2))
    block = model.backbone.blocks[0]
    dtypes, calls, gathered = set(), [], set()
    block.register_forward_hook(lambda module, args, out: dtypes.add(str(out.dtype)))
    linear = block.modulation[1]
    linear.register_forward_pre_hook(lambda module, args: gathered.add(str(module.weight.dtype)))
    block.register_forward_pre_hook(lambda module, args: calls.append(1))  # a post hook misses early-stopped recomputes
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, strategy="fsdp2", precision="bf16-mixed",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, TextImageDataModule(urls, batch_size=4, num_workers=0, image_size=16))
    weight = block.modulation[1].weight
    pipeline = LatentDiffusion(image_size=16, pipeline=os.environ["GENART_TEST_PIPELINE"], lr=1e-3)
    unet = pipeline.backbone.unet
    before = unet.conv_in.weight.detach().clone()
    L.Trainer(max_steps=2, accelerator="cpu", devices=1, strategy="fsdp2", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(
        pipeline, TextImageDataModule(urls, batch_size=4, num_workers=0, image_size=16))
    blocks = [*unet.down_blocks, *unet.up_blocks]
    return {"units": all(isinstance(b, FSDPModule) for b in model.backbone.blocks) and isinstance(model.ema.module, FSDPModule),
            "dtensor_fp32": type(weight).__name__ == "DTensor" and weight.dtype == torch.float32,
            "dtypes": sorted(dtypes), "calls": len(calls),  # 2 steps x (forward + recompute)
            "gathered": sorted(gathered),  # the unsharded weights a forward sees: bf16 under the mixed-precision policy
            "pipeline_units": sum(isinstance(b, FSDPModule) for b in blocks),
            "pipeline_trained": not torch.equal(local(unet.conv_in.weight).detach(), before)}


def main() -> None:
    family, urls, out = sys.argv[1], sys.argv[2], Path(sys.argv[3]) if sys.argv[3] != "-" else None
    torch.set_num_threads(1)
    if family == "bf16":
        print(json.dumps(bf16_units(urls)))
        return
    for index, name in enumerate(family.split(",")):  # several families: one folder each, in one launch
        runs = out / name
        fit(name, urls, runs / "ddp", "ddp")
        fit(name, urls, runs / "fsdp", "fsdp2")
        half_way = f"epoch=0-step={STEPS // 2}.ckpt"
        fit(name, urls, runs / "fsdp-resumed", "fsdp2", str(runs / "fsdp" / "checkpoints" / half_way))
        if "--sharded" in sys.argv and index == 0:  # the first family: checkpoints as directories of per-rank shards,
            fit(name, urls, runs / "sharded", "fsdp2", sharded=True)  # and HSDP on a 2 x 1 mesh
            fit(name, urls, runs / "sharded-resumed", "fsdp2", str(runs / "sharded" / "checkpoints" / half_way),
                sharded=True)
            fit(name, urls, runs / "hsdp", "fsdp2", hsdp_replicas=2)
            fit(name, urls, runs / "hsdp-resumed", "fsdp2", str(runs / "hsdp" / "checkpoints" / half_way), hsdp_replicas=2)


if __name__ == "__main__":
    main()
