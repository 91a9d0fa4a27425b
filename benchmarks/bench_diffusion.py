"""Diffusion training throughput: our PixelDiffusion step vs a diffusers UNet2DModel / UNet2DConditionModel step.

Matched: parameter count (within ~5%), resolution, batch, optimizer (AdamW lr 1e-4), loss (eps MSE), and for the
conditional pair the same frozen text encoder run on the captions every step, the same cross-attention width and
a pooled-text vector added to the time embedding (diffusers' "projection" class embedding). Ours runs through
`Trainer.fit` as a user runs it (family defaults: Min-SNR weighting, caption dropout, EMA update each step);
the baseline is the plain loop of diffusers' training examples. Both alternate in one process.

On a GPU both run in bf16 autocast and the result adds model FLOPs utilisation against the measured bf16 matmul
peak; on CPU the same figure is reported against the measured fp32 matmul peak of one thread.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from benchmarks.common import (
    CLOCK,
    Comparison,
    baseline_steps,
    fix_threads,
    interleaved_fit,
    loader,
    matmul_peak_flops,
    optimizer_step_ms,
    parameter_count,
    step_flops,
)
from genart_lightning.models.diffusion import PixelDiffusion
from genart_lightning.nn.text_encoder import FrozenTextEncoder
from genart_lightning.nn.unet import UNetBackbone

IMAGE_SIZE, BATCH, BASE_CHANNELS = 32, 8, 32
CAPTIONS = ["a red circle on a white background", "a small blue square", "a large green triangle", "a yellow star"]
# diffusers configs chosen to match our U-Net's parameter count (ours: base 32, mult (1, 2, 2), 2 res blocks,
# attention at the two lower resolutions and in the middle); GroupNorm groups must divide every width.
# Unconditional: the same widths, and ADM's scale-shift time embedding as ours, which matches the count to 0.01%
# (with diffusers' default additive embedding it has 7% fewer parameters, all in the embedding projections).
UNCONDITIONAL = {"block_out_channels": (32, 64, 64), "resnet_time_scale_shift": "scale_shift"}
CONDITIONAL = {"block_out_channels": (32, 64, 64), "norm_num_groups": 16}


def diffusers_unet(text: FrozenTextEncoder | None) -> nn.Module:
    """The diffusers U-Net matched to ours: unconditional UNet2DModel, or UNet2DConditionModel over `text`."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    common = {"sample_size": IMAGE_SIZE, "in_channels": 3, "out_channels": 3, "layers_per_block": 2}
    if text is None:
        return UNet2DModel(
            **common,
            **UNCONDITIONAL,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=32,
        )
    return UNet2DConditionModel(
        **common,
        **CONDITIONAL,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text.token_dim,
        attention_head_dim=2,  # UNet2DConditionModel reads this as the number of heads: 2 x 32 channels, as ours
        class_embed_type="projection",
        projection_class_embeddings_input_dim=text.pooled_dim,
    )


def diffusers_loop(unet: nn.Module, text: FrozenTextEncoder | None, batches: DataLoader, gpu: bool) -> Callable[[int], float]:
    """diffusers' training-example step (add_noise, eps MSE, AdamW); returns `run(n) -> seconds per step`."""
    from diffusers import DDPMScheduler

    device = torch.device("cuda" if gpu else "cpu")
    scheduler = DDPMScheduler(num_train_timesteps=1000)

    def loss(batch: dict) -> torch.Tensor:
        x0 = batch["image"].to(device, non_blocking=True)
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), device=device)
        kwargs = {}
        if text is not None:
            emb = text(batch["caption"])
            kwargs = {"encoder_hidden_states": emb.tokens, "encoder_attention_mask": emb.mask, "class_labels": emb.pooled}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            pred = unet(scheduler.add_noise(x0, noise, t), t, **kwargs).sample
        return F.mse_loss(pred.float(), noise.float())

    return baseline_steps(loss, unet, batches, device)


def flops_per_step(net: nn.Module, text: FrozenTextEncoder | None, ours: bool, device: torch.device) -> float:
    """Forward + backward FLOPs of one training step of `net` on one batch (the text encoder excluded)."""
    x = torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
    t = torch.randint(0, 1000, (BATCH,), device=device)
    kwargs = {}
    if text is not None:
        emb = text(CAPTIONS * (BATCH // len(CAPTIONS)))
        if ours:
            kwargs = {"context": emb.tokens, "context_mask": emb.mask, "pooled": emb.pooled}
        else:
            kwargs = {"encoder_hidden_states": emb.tokens, "encoder_attention_mask": emb.mask, "class_labels": emb.pooled}

    def step() -> None:
        out = net(x, t, **kwargs)
        (out if ours else out.sample).float().square().mean().backward()

    flops = step_flops(step)
    net.zero_grad(set_to_none=True)
    return flops


def compare(conditional: bool, quick: bool, peak: float, gpu: bool) -> Comparison:
    """One ours-vs-diffusers pair, alternating blocks of `block` steps."""
    torch.manual_seed(0)
    block, rounds = (1, 2) if quick else (2, 6)
    model = PixelDiffusion(image_size=IMAGE_SIZE, backbone=UNetBackbone(base_channels=BASE_CHANNELS),
                           text_encoder="genart-tiny" if conditional else None)
    device = torch.device("cuda" if gpu else "cpu")
    text = FrozenTextEncoder("genart-tiny").to(device) if conditional else None
    theirs_net = diffusers_unet(text).to(device)
    batch = {
        "image": torch.rand(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE) * 2 - 1,
        "caption": CAPTIONS * (BATCH // len(CAPTIONS)),
        "key": [f"{i:06d}" for i in range(BATCH)],
    }
    baseline = diffusers_loop(theirs_net, text, loader(batch, block * (rounds + 1) + 1), gpu)
    opt_ms = optimizer_step_ms([model.configure_optimizers()["optimizer"]])
    ours_flops = flops_per_step(model.backbone.to(device), text, True, device)
    theirs_flops = flops_per_step(theirs_net, text, False, device)
    ours, theirs = interleaved_fit(model, batch, baseline, block, rounds, gpu=gpu)
    kind = "UNet2DConditionModel" if conditional else "UNet2DModel"
    result = Comparison(
        section=f"2. Diffusion training throughput, {'text-conditional' if conditional else 'unconditional'} ({'GPU bf16' if gpu else 'CPU'})",
        metric=f"images/{CLOCK} s",
        ours_label=f"Trainer.fit on PixelDiffusion ({parameter_count(model.backbone) / 1e6:.2f}M U-Net params)",
        baseline_label=f"diffusers {kind} loop ({parameter_count(theirs_net) / 1e6:.2f}M params)",
        ours=[BATCH / s for s in ours],
        baseline=[BATCH / s for s in theirs],
        higher_is_better=True,
        goal=1.0,
        goal_text="images/s ratio >= 1.0",
        setup=(
            f"{IMAGE_SIZE}px, batch {BATCH}, AdamW lr 1e-4, eps prediction, {block} steps per block; ours: base_channels "
            f"{BASE_CHANNELS}, channel_mult (1, 2, 2), 2 res blocks, attention at levels 1, 2 ({model.hparams.backbone['init_args']['attention_block']} "
            f"blocks, the family default {'with' if conditional else 'without'} a text encoder); diffusers: "
            f"{CONDITIONAL if conditional else UNCONDITIONAL}"
            + ("; both encode the captions with the same frozen genart-tiny text encoder every step" if conditional else "")
        ),
        note=(
            "both U-Nets have full transformer blocks (attention, cross-attention, MLP) at 16px and 8px"
            if conditional
            else "ours runs the family's unconditional default, DDPM's plain attention block (GroupNorm, one qkv "
            "projection, scaled_dot_product_attention, output projection) at 16px and 8px, the block UNet2DModel has "
            "too: same layout, widths and parameter count, so the ratio measures implementation and framework (ours "
            "also does Min-SNR weighting and an EMA update per step, and gains the fused AdamW step). With latent "
            "diffusion's transformer blocks (attention + 4x MLP + LayerNorms), the previous default, ours measured "
            "0.81-0.85 against a wider (32, 64, 80) UNet2DModel of equal parameter count. Against UNet2DModel's default "
            "additive time embedding (same widths, 1.71M params, 7% fewer) the ratio measured 1.01-1.08 in four runs. "
            "Measured on CPU without gain, so not kept: channels_last; GroupNorm affine folded into the scale-shift"
        ),
    )
    result.extra["fast path: fused AdamW"] = (
        f"optimizer step {opt_ms['as configured']:.2f} ms as configured (fused) vs {opt_ms['torch default']:.2f} ms "
        "with torch's default for-loop kernel (what the diffusers loop uses)"
    )
    per_flop = (result.ours_median * ours_flops) / (result.baseline_median * theirs_flops)
    result.extra["model FLOPs per second, ours / baseline"] = f"{per_flop:.3f} (the ratio with each side's work per image factored out)"
    for name, flops, rates in (("ours", ours_flops, result.ours), ("baseline", theirs_flops, result.baseline)):
        achieved = flops / BATCH * sorted(rates)[len(rates) // 2]
        result.extra[f"{name} model FLOPs per step"] = f"{flops / 1e9:.1f} GFLOP (forward + backward)"
        result.extra[f"{name} model FLOPs utilisation"] = (
            f"{achieved / 1e9:.1f} GFLOP/s = {achieved / peak:.0%} of the measured matmul peak {peak / 1e9:.0f} GFLOP/s"
        )
    return result


def main(quick: bool = False) -> list[Comparison]:
    """Unconditional and text-conditional pairs."""
    fix_threads()
    gpu = torch.cuda.is_available()
    peak = matmul_peak_flops("cuda" if gpu else "cpu", torch.bfloat16 if gpu else torch.float32)
    return [compare(conditional, quick, peak, gpu) for conditional in (False, True)]


if __name__ == "__main__":
    for result in main():
        print(result.line())
        for key, value in result.extra.items():
            print(f"  {key}: {value}")
