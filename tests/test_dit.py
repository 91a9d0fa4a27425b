"""The DiT backbone: shapes (non-square too), adaLN-Zero start, text conditioning, masks, gradient checkpointing."""

from __future__ import annotations

import pytest
import torch

from genart_lightning.diffusion.flow import Flow
from genart_lightning.models.diffusion import PixelDiffusion
from genart_lightning.nn.dit import DiT, DiTBackbone, sincos_position_embedding


def tiny_dit(**kwargs) -> DiT:
    settings = dict(in_channels=3, patch_size=2, hidden_size=32, depth=2, num_heads=2, context_dim=24, pooled_dim=16)
    return DiT(**{**settings, **kwargs})


def perturbed(net: DiT) -> DiT:
    """A fresh DiT outputs zeros (adaLN-Zero); give every weight signal so outputs depend on every input."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def inputs(b: int = 2, h: int = 8, w: int = 12):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, 3, h, w, generator=g), torch.tensor([10.0, 700.0])[:b], torch.randn(b, 5, 24, generator=g),
            torch.ones(b, 5, dtype=torch.bool), torch.randn(b, 16, generator=g))


@pytest.mark.parametrize(("patch", "h", "w"), [(1, 6, 10), (2, 8, 12), (4, 8, 16)])
def test_output_has_the_input_shape_and_starts_at_zero(patch, h, w):
    x, t, context, mask, pooled = inputs(h=h, w=w)
    out = tiny_dit(patch_size=patch)(x, t, context, mask, pooled)
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(out))  # adaLN-Zero: every block starts as identity


def test_position_embedding_is_2d_sincos_and_distinct_per_position_for_non_square_grids():
    emb = sincos_position_embedding(3, 5, 16)
    assert emb.shape == (15, 16)
    assert torch.unique(emb, dim=0).shape[0] == 15  # every patch has its own code
    rows, cols = emb[:, :8].reshape(3, 5, 8), emb[:, 8:].reshape(3, 5, 8)
    assert torch.equal(rows[:, 0], rows[:, 4]) and torch.equal(cols[0], cols[2])  # half codes the row, half the column
    torch.testing.assert_close(rows[1, 0, :4], torch.sin(1.0 / 10_000 ** (torch.arange(4) / 4)))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_embedding(2, 2, 6)


def test_time_pooled_text_and_unmasked_tokens_steer_the_output():
    net = perturbed(tiny_dit()).eval()
    x, t, context, mask, pooled = inputs()
    out = net(x, t, context, mask, pooled)
    assert not torch.allclose(net(x, t.flip(0), context, mask, pooled), out)
    assert not torch.allclose(net(x, t, context, mask, pooled.flip(0)), out)
    assert not torch.allclose(net(x, t, context + 1, mask, pooled), out)
    mask[:, 3:] = False  # padding: what stands there must not matter
    masked = net(x, t, context, mask, pooled)
    changed = context.clone()
    changed[:, 3:] += 5
    torch.testing.assert_close(net(x, t, changed, mask, pooled), masked)


def test_gradient_checkpointing_recomputes_each_block_and_gives_the_same_gradients():
    x, t, context, mask, pooled = inputs()
    grads, calls = {}, {}
    for checkpointing in (False, True):
        net = perturbed(tiny_dit(gradient_checkpointing=checkpointing)).train()
        calls[checkpointing] = 0

        def count(*_, key=checkpointing) -> None:  # a pre hook: a post hook misses early-stopped recomputes
            calls[key] += 1

        for block in net.blocks:
            block.register_forward_pre_hook(count)
        net(x, t, context, mask, pooled).square().mean().backward()
        grads[checkpointing] = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
    assert calls == {False: 2, True: 4}  # each of the 2 blocks runs again in backward
    torch.testing.assert_close(grads[True], grads[False])


def test_a_patch_size_that_does_not_divide_the_space_is_one_line_naming_both():
    with pytest.raises(ValueError, match="the dit backbone cuts 3x3 patches .* divisible by 3; the space gives 16x16"):
        PixelDiffusion(image_size=16, process=Flow(), backbone=DiTBackbone(patch_size=3, hidden_size=32, depth=1, num_heads=2))
    with pytest.raises(ValueError, match="hidden_size 30 is not divisible by num_heads 4"):
        DiT(hidden_size=30, num_heads=4)


def test_pooled_only_conditioning_builds_no_cross_attention():
    model = PixelDiffusion(image_size=16, process=Flow(), conditioning="pooled",
                           backbone=DiTBackbone(patch_size=2, hidden_size=32, depth=1, num_heads=2))
    assert model.backbone.context_embed is None and all(b.cross_attn is None for b in model.backbone.blocks)
    assert model.backbone.pooled_embed is not None
    assert set(model.encode_text(["a red circle"])) == {"pooled"}


def test_the_trained_size_given_explicitly_is_the_default_path_and_other_sizes_sample():
    torch.manual_seed(0)
    model = PixelDiffusion(image_size=16, process=Flow(), sample_steps=2,
                           backbone=DiTBackbone(patch_size=2, hidden_size=32, depth=1, num_heads=2))
    perturbed(model.ema.module).eval()
    captions = ["a red circle", "a blue square"]
    default = model.sample(2, captions, seed=3)
    torch.testing.assert_close(model.sample(2, captions, seed=3, height=16, width=16), default, rtol=0, atol=0)
    wide = model.sample(2, captions, seed=3, height=8, width=24)
    assert wide.shape == (2, 3, 8, 24) and wide.std() > 0
    assert (model.sampling_settings({"width": 24})["height"], model.sampling_settings({})["width"]) == (16, 16)
