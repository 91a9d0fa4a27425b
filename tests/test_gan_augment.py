"""Discriminator augmentation (DiffAugment ops, ADA's controller): what each op does, that G's gradients pass
through, that p follows D's overconfidence, and that a GAN trained with it really shows D augmented images."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from test_gan import TINY, batches

from genart_lightning.models.gan import DCGAN
from genart_lightning.nn.augment import DiscriminatorAugment, color, cutout, translation


def test_ops_change_images_as_described_and_pass_gradients():
    torch.manual_seed(0)
    x = (torch.rand(8, 3, 16, 16) * 2 - 1).requires_grad_()
    shifted = translation(x)
    # whole-pixel shifts of at most 2 (1/8 of 16): each image equals its original moved by some (dy, dx)
    for i in range(8):
        assert any(torch.equal(shifted[i, :, max(dy, 0):16 + min(dy, 0), max(dx, 0):16 + min(dx, 0)],
                               x[i, :, max(-dy, 0):16 + min(-dy, 0), max(-dx, 0):16 + min(-dx, 0)])
                   for dy in range(-2, 3) for dx in range(-2, 3))
    cut = cutout(x)
    zeroed = (cut == 0).all(dim=1).float().sum(dim=(1, 2))
    assert ((zeroed >= 16) & (zeroed <= 64)).all()  # an 8x8 square, partly outside the image at most by half a side
    coloured = color(x)
    assert not torch.allclose(coloured, x)
    (shifted.sum() + cut.sum() + coloured.sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert torch.equal(DiscriminatorAugment(p=0.0)(x), x)


def test_ada_raises_p_while_d_is_overconfident_and_lowers_it_after():
    augment = DiscriminatorAugment(target=0.6, interval=1, speed_images=100)
    for step in range(1, 6):
        augment.observe(torch.ones(10))  # D calls every real image real
        augment.update(step)
    assert float(augment.p) == pytest.approx(0.5)
    for step in range(6, 8):
        augment.observe(-torch.ones(10))
        augment.update(step)
    assert float(augment.p) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="unknown augmentation 'flip'"):
        DiscriminatorAugment(["flip"])


def test_d_sees_augmented_images_in_training(tmp_path: Path):
    torch.manual_seed(0)
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    seen = {}
    for policy in ((), ("translation", "cutout")):
        torch.manual_seed(1)
        model = DCGAN(**TINY, augment=policy)
        inputs: list[torch.Tensor] = []
        model.discriminator.register_forward_pre_hook(lambda m, args, inputs=inputs: inputs.append(args[0].detach().clone()))
        L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, default_root_dir=tmp_path).fit(model, batches(images, 8))
        seen[policy] = inputs[0]  # the first D call scores the real batch
    assert torch.equal(seen[()], images)
    assert not torch.equal(seen[("translation", "cutout")], images)


def noise_sensitivity(model: DCGAN) -> float:
    """mean |G(z1) - G(z2)| / mean |z1 - z2| of the EMA-free generator in eval mode: how much G listens to its noise."""
    torch.manual_seed(123)
    z1, z2 = torch.randn(64, model.z_dim), torch.randn(64, model.z_dim)
    model.generator.eval()
    with torch.no_grad():
        return float((model.generator(z1, None) - model.generator(z2, None)).abs().mean() / (z1 - z2).abs().mean())


def test_mode_seeking_term_makes_g_listen_to_its_noise(tmp_path: Path):
    torch.manual_seed(0)
    images = (torch.rand(1, 3, 16, 16) * 2 - 1).expand(64, -1, -1, -1).contiguous()  # one image: the easy collapse
    sensitivity = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(1)
        model = DCGAN(**TINY, diversity_weight=weight)
        L.Trainer(accelerator="cpu", max_steps=40, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, default_root_dir=tmp_path).fit(model, batches(images, 8))
        sensitivity[weight] = noise_sensitivity(model)
    assert sensitivity[1.0] > 1.5 * sensitivity[0.0], sensitivity  # measured 0.33 against 0.16
