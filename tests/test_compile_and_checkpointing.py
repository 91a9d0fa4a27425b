"""The `compile` switch of every family with a large network, and GAN gradient checkpointing."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch._dynamo.utils import counters

from datamodules.webdataset import TextImageDataModule
from genart_lightning.diffusion.flow import Flow
from genart_lightning.models.diffusion import PixelDiffusion
from genart_lightning.models.gan import DCGAN
from genart_lightning.models.gan_objectives import r1_penalty
from genart_lightning.models.vae import VAE
from genart_lightning.nn.dit import DiTBackbone

FAMILIES = {  # family -> (build with a compile setting, its compiled networks)
    "diffusion": (lambda compile: PixelDiffusion(image_size=16, process=Flow(), clip_x0=False, compile=compile,
                                                 text_encoder=None,
                                                 backbone=DiTBackbone(patch_size=4, hidden_size=32, depth=2, num_heads=2)),
                  lambda m: [m.backbone]),
    "vae": (lambda compile: VAE(image_size=16, base_channels=16, channel_mults=[1, 2], compile=compile),
            lambda m: [m.encoder, m.decoder]),
    "gan": (lambda compile: DCGAN(image_size=16, g_channels=16, d_channels=16, compile=compile),
            lambda m: [m.generator, m.discriminator]),
}


@pytest.mark.parametrize("family", ["diffusion", "vae", "gan"])
def test_compile_switch_trains_through_the_compiled_graph_with_eager_outputs(family: str, shapes_shards_16px: dict) -> None:
    """aot_eager: dynamo captures and AOTAutograd runs the graph (forward and backward), without inductor's minutes
    of code generation on this CPU; inductor itself is the test below."""
    build, networks = FAMILIES[family]
    torch.manual_seed(0)
    model = build("aot_eager")
    torch._dynamo.reset()
    counters.clear()
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(model, TextImageDataModule(shapes_shards_16px["train_urls"], batch_size=4, num_workers=0, image_size=16))
    assert counters["stats"]["unique_graphs"] > 0  # the switch compiled something, and training went through it
    eager = build(False)  # only the family under test is built
    eager.load_state_dict(model.state_dict())
    inputs = {"diffusion": lambda: (torch.randn(2, 3, 16, 16), torch.rand(2)),
              "vae": lambda: (torch.rand(2, 3, 16, 16) * 2 - 1,), "gan": lambda: (torch.randn(2, 64),)}[family]()
    compiled_net, eager_net = networks(model)[0].eval(), networks(eager)[0].eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled_net(*inputs), eager_net(*inputs), rtol=1e-5, atol=1e-5)
    assert compiled_net._compiled_call_impl is not None and eager_net._compiled_call_impl is None


def test_inductor_compiles_the_dit_and_matches_eager_forward_and_backward() -> None:
    torch.manual_seed(0)
    build = DiTBackbone(patch_size=4, hidden_size=32, depth=1, num_heads=2).build
    eager = build(3, None, None, False)
    with torch.no_grad():  # the DiT starts at zero output (adaLN-Zero): move every weight so outputs and grads are real
        for p in eager.parameters():
            p.add_(0.05 * torch.randn_like(p))
    compiled = copy.deepcopy(eager)
    compiled.compile()  # inductor, what `compile: true` uses
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    out_eager, out_compiled = eager(x, t), compiled(x, t)
    assert out_eager.abs().mean() > 1e-2  # a comparison of zeros with zeros would pass whatever inductor did
    torch.testing.assert_close(out_compiled, out_eager, rtol=1e-4, atol=1e-5)
    out_eager.square().mean().backward()
    out_compiled.square().mean().backward()
    for a, b in zip(compiled.parameters(), eager.parameters(), strict=True):
        assert b.grad.abs().max() > 0
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_unknown_backend_and_compile_with_r1_are_one_line() -> None:
    with pytest.raises(ValueError, match="compile='fast' is not a torch.compile backend; use true"):
        VAE(image_size=16, base_channels=16, channel_mults=[1, 2], compile="fast")
    with pytest.raises(ValueError, match="compile with r1_gamma > 0"):
        DCGAN(image_size=16, compile=True, r1_gamma=1.0)


def test_gan_gradient_checkpointing_recomputes_stages_and_changes_nothing_else() -> None:
    """Both nets with BatchNorm, D with spectral norm: with checkpointing, every generator block and discriminator
    stage runs again in backward, and the gradients (R1's gradient of a gradient too), BatchNorm statistics and
    spectral-norm vectors come out bit for bit as without it (a plain torch checkpoint: BatchNorm counts 3 batches
    more, and D's first layer's gradient is 3e-4 off, its recompute normalised by a sigma the R1 forward moved)."""
    results = {}
    for on in (False, True):
        torch.manual_seed(0)
        gan = DCGAN(image_size=16, g_channels=16, d_channels=16, d_norm="batch", spectral_norm=True,
                    gradient_checkpointing=on).train()
        calls = []
        for module in (*gan.generator.blocks, *gan.discriminator._stages):
            module.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        real, z = torch.rand(4, 3, 16, 16) * 2 - 1, torch.randn(4, 64)
        loss = gan.discriminator(gan.generator(z)).mean() + r1_penalty(gan.discriminator, real)
        loss.backward()
        results[on] = {
            "calls": len(calls),
            "grads": [p.grad.clone() for p in gan.parameters() if p.grad is not None],
            "buffers": {k: v.clone() for k, v in gan.state_dict().items()
                        if k.startswith(("generator.", "discriminator.")) and ("running" in k or "tracked" in k
                                                                              or "_u" in k or "_v" in k)},
        }
    blocks = len(gan.generator.blocks) + len(gan.discriminator._stages)
    g, d = len(gan.generator.blocks), len(gan.discriminator._stages)
    # off: G's blocks once, D's stages twice (on the fakes, on the reals for R1). On: every one again in backward,
    # R1's reals twice more (its gradient is taken in autograd.grad, then differentiated in loss.backward)
    assert results[False]["calls"] == g + 2 * d and blocks >= 4
    assert results[True]["calls"] == 2 * g + 2 * d + 3 * d
    assert any("running_mean" in k for k in results[True]["buffers"]) and any("_u" in k for k in results[True]["buffers"])
    for a, b in zip(results[True]["grads"], results[False]["grads"], strict=True):
        assert torch.equal(a, b)  # bit for bit: the same weights were differentiated
    for key, value in results[False]["buffers"].items():
        assert torch.equal(results[True]["buffers"][key], value), key
