"""U-Net: shapes, text conditioning that really reaches the output, masking, checkpointing and memory format."""

from __future__ import annotations

import pytest
import torch

from genart_lightning.nn.attention import SelfAttention2d
from genart_lightning.nn.unet import UNet, UNetBackbone


def tiny_unet(**kwargs) -> UNet:
    torch.manual_seed(0)
    config = dict(in_channels=3, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), head_channels=8)
    net = UNet(**{**config, **kwargs})
    with torch.no_grad():  # zero-initialised output layers would hide every input dependence
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return net.eval()


def inputs(b: int = 2, size: int = 16, channels: int = 3, tokens: int = 5, dim: int = 12):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, channels, size, size, generator=g)
    t = torch.tensor([10, 900][:b])
    context = torch.randn(b, tokens, dim, generator=g)
    mask = torch.ones(b, tokens, dtype=torch.bool)
    return x, t, context, mask, torch.randn(b, 6, generator=g)


@pytest.mark.parametrize("attention_block", ["transformer", "plain"])
@pytest.mark.parametrize(("channel_mult", "attention_levels", "size"), [((1,), (0,), 8), ((1, 2), (1,), 16), ((1, 2, 2), (0, 2), 16)])
def test_output_has_the_input_shape(channel_mult, attention_levels, size, attention_block):
    net = tiny_unet(in_channels=4, channel_mult=channel_mult, attention_levels=attention_levels, attention_block=attention_block)
    x = torch.randn(3, 4, size, size)
    assert net(x, torch.tensor([0, 1, 999])).shape == x.shape


@pytest.mark.parametrize("attention_block", ["transformer", "plain"])
def test_non_square_inputs_at_multiples_of_the_backbones_size_step_go_through(attention_block):
    spec = UNetBackbone(channel_mult=[1, 2, 2], attention_levels=[1, 2], attention_block=attention_block)
    assert spec.size_multiple() == 4
    spec.check_input((3, 8, 20))
    with pytest.raises(ValueError, match="divisible by 4; the space gives 8x18"):
        spec.check_input((3, 8, 18))
    net = tiny_unet(channel_mult=(1, 2, 2), attention_levels=(1, 2), attention_block=attention_block)
    x = torch.randn(2, 3, 8, 20)
    assert net(x, torch.tensor([10, 900])).shape == x.shape


def test_timestep_and_text_change_the_output_but_masked_tokens_do_not():
    net = tiny_unet(context_dim=12, pooled_dim=6)
    x, t, context, mask, pooled = inputs()
    with torch.no_grad():
        base = net(x, t, context, mask, pooled)
        assert not torch.allclose(base, net(x, t.flip(0), context, mask, pooled), atol=1e-4)
        assert not torch.allclose(base, net(x, t, context + 1, mask, pooled), atol=1e-4)  # cross-attention path
        assert not torch.allclose(base, net(x, t, context, mask, pooled + 1), atol=1e-4)  # pooled-embedding path
        mask[:, 3:] = False
        masked = net(x, t, context, mask, pooled)
        context[:, 3:] = 100.0  # padding tokens: must be ignored
        torch.testing.assert_close(net(x, t, context, mask, pooled), masked)


def test_gradient_checkpointing_recomputes_each_layer_and_gives_the_same_gradients():
    x, t, context, mask, pooled = inputs()
    grads, calls = [], {}
    for checkpointing in (False, True):
        net = tiny_unet(context_dim=12, pooled_dim=6, gradient_checkpointing=checkpointing).train()
        layers = [*net.down, net.middle, *net.up]
        calls[checkpointing] = 0

        def count(*_, key=checkpointing) -> None:  # a pre hook: a post hook misses early-stopped recomputes
            calls[key] += 1

        for layer in layers:
            layer.register_forward_pre_hook(count)
        net(x, t, context, mask, pooled).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert calls == {False: len(layers), True: 2 * len(layers)}  # with the switch every layer runs again in backward
    torch.testing.assert_close(grads[0], grads[1])


def test_channels_last_gives_the_same_output():
    net = tiny_unet(context_dim=12)
    x, t, context, mask, _ = inputs()
    with torch.no_grad():
        expected = net(x, t, context, mask)
        net.to(memory_format=torch.channels_last)
        torch.testing.assert_close(net(x.contiguous(memory_format=torch.channels_last), t, context, mask), expected, atol=1e-5, rtol=1e-4)


def test_plain_attention_block_starts_as_identity_and_mixes_all_positions():
    torch.manual_seed(0)
    block = SelfAttention2d(16, head_channels=8)
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(block(x), x)  # zero output projection: the residual alone at init
    torch.nn.init.normal_(block.proj_out.weight, std=0.1)
    far = x.clone()
    far[:, :, 7, 7] += 1.0
    with torch.no_grad():
        assert not torch.allclose(block(x)[:, :, 0, 0], block(far)[:, :, 0, 0], atol=1e-5)  # one corner reaches the other


def test_plain_unet_has_no_transformer_parts_and_checkpoints_the_same():
    plain = tiny_unet(attention_block="plain")
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in plain.modules())
    assert sum(isinstance(m, SelfAttention2d) for m in plain.modules()) == 4  # level 1: 1 down + 2 up, and the middle
    x, t, *_ = inputs()
    grads = []
    for checkpointing in (False, True):
        net = tiny_unet(attention_block="plain", gradient_checkpointing=checkpointing).train()
        net(x, t).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_bad_configuration_and_input_size_are_named():
    with pytest.raises(ValueError, match=r"attention_levels \[3\] outside 0..1"):
        UNet(channel_mult=(1, 2), attention_levels=(3,))
    with pytest.raises(ValueError, match="unknown attention_block 'linear'"):
        UNet(attention_block="linear")
    with pytest.raises(ValueError, match="attention_block='plain' has no cross-attention"):
        UNet(attention_block="plain", context_dim=12)
    with pytest.raises(ValueError, match="must be divisible by 2"):
        tiny_unet()(torch.randn(1, 3, 15, 15), torch.tensor([1]))


@pytest.mark.parametrize("coordinates", [False, True])
def test_coordinates_let_the_unet_tell_left_from_right_far_from_the_borders(coordinates):
    """A constant input, a target of +1 on the left half and -1 on the right: the centre columns are further from
    every border than this net sees, so only the coordinate channels can tell them apart."""
    torch.manual_seed(0)
    net = UNet(in_channels=1, base_channels=8, channel_mult=(1,), num_res_blocks=1, attention_levels=(), head_channels=8,
               coordinates=coordinates)
    x, t = torch.zeros(4, 1, 32, 32), torch.zeros(4)
    target = torch.ones(4, 1, 32, 32)
    target[..., 16:] = -1
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(25):
        opt.zero_grad()
        (net(x, t) - target).square().mean().backward()
        opt.step()
    with torch.no_grad():
        centre = net(x, t)[0, 0, 13:19, 13:19]  # 12 3x3 convs: these see no border
    right_side = (centre.sign() == target[0, 0, 13:19, 13:19]).float().mean().item()
    assert right_side == 1.0 if coordinates else right_side <= 0.5
