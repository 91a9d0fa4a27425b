"""`make bench-gpu`: what the framework does on one CUDA device, in one prepared script of under 8 minutes.

    python -m benchmarks.bench_gpu [--out benchmarks/RESULTS.md] [--budget-s 450]

Rows, in the order they run (a row that would start after the time budget says so instead):
  - the measured bf16 matmul peak (8192^3), the ceiling model FLOPs utilisation (MFU) is reported against;
  - training images/s and MFU in bf16 for the ddpm_cc3m_64 U-Net (64px) and a DiT-B/2 (4 x 32 x 32 latents), the
    model's own training step with AdamW, compile off, then on (inductor);
  - FID Inception feature extraction, images/s at 299px (the same network with random weights when the FID
    weights are not cached: the cost does not depend on their values);
  - a 200-step bf16 `genart fit` of every family from its shapes config, on shapes shards made here;
  - FSDP2 on one device (`--trainer.strategy fsdp2`, bf16-mixed, flow + DiT over that VAE) as a smoke test.
Without CUDA every row says "not measured" and the script returns at once (tests/test_bench_gpu.py runs it so).
It writes its rows between the markers below in RESULTS.md, and `make bench` keeps them there.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

START, END = "<!-- bench-gpu -->", "<!-- /bench-gpu -->"
FIT_CONFIGS = ("dcgan_shapes", "cgan_shapes", "vae_shapes", "ddpm_shapes", "edm_shapes", "flow_shapes",
               "flow_dit_shapes", "ldm_shapes")
ROWS = ("bf16 matmul peak", "U-Net 64px train, compile off", "DiT-B/2 train, compile off", "FID feature extraction",
        *(f"200-step bf16 fit: {name}" for name in FIT_CONFIGS), "FSDP2 on one device",
        "U-Net 64px train, compile on", "DiT-B/2 train, compile on")
REPO = Path(__file__).resolve().parent.parent


def section(device: str, rows: dict[str, str], seconds: float) -> str:
    lines = [START, "## GPU (`make bench-gpu`)", "", f"Device: {device}; {seconds:.0f} s wall for the whole script.", "",
             "| row | result |", "| --- | --- |", *(f"| {name} | {rows.get(name, 'not measured')} |" for name in ROWS),
             END]
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    """Put `text` in place of the GPU section of RESULTS.md (appended when there is none)."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    if START in old and END in old:
        head, rest = old.split(START, 1)
        new = head + text.rstrip("\n") + rest.split(END, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


def kept_section(path: Path) -> str:
    """The GPU section of an existing RESULTS.md ("" when none), for `make bench` to keep when it rewrites the file."""
    text = path.read_text() if path.exists() else ""
    return START + text.split(START, 1)[1].split(END, 1)[0] + END + "\n" if START in text and END in text else ""


# ---- measurements (CUDA only) ----

def train_throughput(kind: str, compile: bool, peak: float, flops: float | None = None) -> tuple[str, float | None]:
    """(row text, FLOPs of one step): the model's own training step in bf16 autocast with fused AdamW. FlopCounterMode
    does not see inside compiled graphs, so a compiled run is given the eager step's FLOPs."""
    from benchmarks.common import step_flops
    from genart_lightning.diffusion.flow import Flow
    from genart_lightning.models.diffusion import PixelDiffusion
    from genart_lightning.nn.dit import DiTBackbone
    from genart_lightning.nn.unet import UNetBackbone

    device = torch.device("cuda")
    if kind == "unet":
        batch, size, channels = 64, 64, 3
        backbone = UNetBackbone(base_channels=128, channel_mult=[1, 2, 3, 4], num_res_blocks=2, attention_levels=[1, 2, 3])
        model = PixelDiffusion(image_size=size, backbone=backbone, compile=compile)
    else:
        batch, size, channels = 64, 32, 4
        backbone = DiTBackbone(patch_size=2, hidden_size=768, depth=12, num_heads=12)
        model = PixelDiffusion(image_size=size, channels=channels, process=Flow(), clip_x0=False, backbone=backbone,
                               compile=compile)
    model = model.to(device).train()
    model.log = lambda *args, **kwargs: None  # no Trainer in this loop
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    data = {"image": torch.randn(batch, channels, size, size, device=device), "caption": ["a red circle"] * batch,
            "key": [str(i) for i in range(batch)]}

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.training_step(data, 0)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    started = time.perf_counter()
    for _ in range(3):  # warm-up: kernels, allocator, and the compilation when compile is on
        step()
    torch.cuda.synchronize()
    warmup = time.perf_counter() - started
    steps = 20
    started = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / steps
    if not compile:
        flops = step_flops(step)
    parameters = sum(p.numel() for p in model.backbone.parameters())
    utilisation = f"MFU {flops / seconds / peak:.1%} ({flops / 1e12:.2f} TFLOP/step, " if flops else "("
    return (f"{batch / seconds:.0f} images/s, {utilisation}batch {batch}, {parameters / 1e6:.0f}M parameters; "
            f"warm-up {warmup:.0f} s)"), flops


def fid_throughput() -> str:
    from benchmarks.bench_eval import inception_weights
    from genart_lightning.metrics.features import InceptionFeatures

    with tempfile.TemporaryDirectory() as tmp:
        weights, real = inception_weights(Path(tmp))
        extractor = InceptionFeatures(weights).cuda().eval()
    images = torch.rand(256, 3, 299, 299, device="cuda") * 2 - 1
    with torch.no_grad():
        extractor(images)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(5):
            extractor(images)
        torch.cuda.synchronize()
    rate = 5 * 256 / (time.perf_counter() - started)
    return f"{rate:.0f} images/s at 299px, batch 256" + ("" if real else " (random weights: FID weights not cached)")


def genart(*args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """`genart ARGS`; one past its `timeout` raises TimeoutExpired, which its row reports."""
    return subprocess.run([sys.executable, "-m", "genart_lightning.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def fsdp_smoke(tmp: Path, data: dict, timeout: float) -> str:
    started = time.perf_counter()
    done = genart("fit", "--config", str(REPO / "experiments/flow_dit_shapes.yaml"), "--trainer.strategy", "fsdp2",
                  "--model.init_args.train_text_encoder", "false",  # FSDP2 does not shard a trained text tower
                  "--trainer.precision", "bf16-mixed", "--trainer.accelerator", "gpu", "--trainer.devices", "1",
                  "--trainer.max_steps", "20", *data_args(data, tmp / "fsdp"), *first_stage_args("flow_dit_shapes", tmp),
                  cwd=tmp, timeout=timeout)
    if done.returncode:
        return "failed: " + (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
    return f"ok: 20 steps, {time.perf_counter() - started:.0f} s wall with start-up"


def data_args(data: dict, root: Path) -> list[str]:
    return ["--data.init_args.train_urls", data["train_urls"], "--data.init_args.val_urls", data["val_urls"],
            "--trainer.default_root_dir", str(root), "--trainer.limit_val_batches", "0",
            "--checkpoint.every_n_train_steps", "200",
            "--sample_grid.every_n_steps", "200", "--trainer.callbacks", "[]"]


def first_stage_args(name: str, tmp: Path) -> list[str]:
    """The latent configs train over the VAE the vae_shapes fit (run before them) wrote."""
    if name not in ("ldm_shapes", "flow_dit_shapes"):
        return []
    return ["--model.init_args.first_stage_ckpt", str(tmp / "vae_shapes" / "checkpoints" / "last.ckpt")]


def family_fit(name: str, tmp: Path, data: dict, timeout: float) -> str:
    started = time.perf_counter()
    done = genart("fit", "--config", str(REPO / f"experiments/{name}.yaml"), "--trainer.precision", "bf16-mixed",
                  "--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.max_steps", "200",
                  *data_args(data, tmp / name), *first_stage_args(name, tmp), cwd=tmp, timeout=timeout)
    if done.returncode:
        return "failed: " + (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
    return f"ok: {time.perf_counter() - started:.0f} s wall with start-up"


def measure(budget_s: float) -> dict[str, str]:
    from benchmarks.common import matmul_peak_flops
    from datamodules.synthetic import write_shapes_shards

    rows: dict[str, str] = {}
    started = time.perf_counter()

    def run(name: str, fn: Callable[[], str]) -> None:
        if time.perf_counter() - started > budget_s:
            rows[name] = f"not measured (past the {budget_s:.0f} s budget)"
            return
        try:
            rows[name] = fn()
        except Exception as exn:  # one failing row must not hide the others
            rows[name] = f"failed: {type(exn).__name__}: {str(exn).splitlines()[0][:200] if str(exn) else ''}"
        print(f"{name}: {rows[name]}", flush=True)

    peak = matmul_peak_flops("cuda", torch.bfloat16, size=8192)
    rows["bf16 matmul peak"] = f"{peak / 1e12:.0f} TFLOP/s (8192^3 matmul, measured)"
    eager_flops: dict[str, float | None] = {}

    def throughput(kind: str, compile: bool) -> str:
        text, eager_flops[kind] = train_throughput(kind, compile, peak, eager_flops.get(kind))
        return text

    models = (("unet", "U-Net 64px train"), ("dit", "DiT-B/2 train"))
    for kind, label in models:
        run(f"{label}, compile off", lambda kind=kind: throughput(kind, False))
    run("FID feature extraction", fid_throughput)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_shapes_shards(root / "shapes", 2000, image_size=32, seed=0, samples_per_shard=200)
        left = lambda: max(30.0, budget_s - (time.perf_counter() - started))  # noqa: E731
        for name in FIT_CONFIGS:
            run(f"200-step bf16 fit: {name}", lambda name=name: family_fit(name, root, data, left()))
        run("FSDP2 on one device", lambda: fsdp_smoke(root, data, left()))  # flow + DiT over the VAE fitted above
    for kind, label in models:
        run(f"{label}, compile on", lambda kind=kind: throughput(kind, True))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    parser.add_argument("--budget-s", type=float, default=360.0,
                        help="no row starts after this many seconds, and fits stop by then (default 360: the compile "
                             "rows after it keep the whole under 8 minutes)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if not torch.cuda.is_available():
        rows = {name: "not measured (no CUDA device on this machine)" for name in ROWS}
        device = "none"
        print("bench-gpu: no CUDA device; every GPU row is 'not measured'", flush=True)
    else:
        device = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
        rows = measure(args.budget_s)
    write_section(args.out, section(device, rows, time.perf_counter() - started))
    print(f"wrote the GPU rows into {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
