"""Shapes and stage arithmetic of the shared networks."""

import pytest
import torch

from genlib import nets


@pytest.mark.parametrize("resolution, expected", [(8, (4, 1)), (16, (4, 2)), (28, (7, 2)), (32, (4, 3)),
                                                  (64, (4, 4)), (12, (6, 1))])
def test_conv_stages(resolution, expected):
    base, stages = nets.conv_stages(resolution)
    assert (base, stages) == expected and base * 2**stages == resolution


@pytest.mark.parametrize("resolution", [7, 9, 44, 300])
def test_bad_resolutions_are_rejected(resolution):
    with pytest.raises(ValueError, match="resolution"):
        nets.conv_stages(resolution)


@pytest.mark.parametrize("resolution, channels", [(8, 1), (28, 1), (32, 3), (64, 3)])
def test_generator_critic_encoder_shapes(resolution, channels):
    gen = nets.ConvGenerator(16, resolution, channels, width=8)
    images = gen(torch.randn(5, 16))
    assert images.shape == (5, channels, resolution, resolution)
    assert images.abs().max() <= 1
    for norm in ("none", "batch", "layer"):
        assert nets.ConvCritic(resolution, channels, width=8, norm=norm)(images).shape == (5,)
    assert nets.ConvEncoder(12, resolution, channels, width=8)(images).shape == (5, 12)


def test_mlp_depth_width_and_activation():
    mlp = nets.MLP(2, 3, hidden=10, depth=2, act="tanh")
    assert mlp(torch.randn(4, 2)).shape == (4, 3)
    assert sum(isinstance(m, torch.nn.Linear) for m in mlp) == 3
    assert nets.count_parameters(mlp) == (2 * 10 + 10) + (10 * 10 + 10) + (10 * 3 + 3)
    with pytest.raises(ValueError, match="unknown activation"):
        nets.MLP(2, 2, act="swish2")


def test_dcgan_init_statistics():
    gen = nets.ConvGenerator(64, 64, 3, width=64)
    weights = torch.cat([m.weight.flatten() for m in gen.modules() if isinstance(m, torch.nn.ConvTranspose2d)])
    assert abs(weights.std().item() - 0.02) < 0.002 and abs(weights.mean().item()) < 0.001


def _conv_weight_shapes(module: torch.nn.Module) -> list[tuple[int, ...]]:
    return [tuple(m.weight.shape) for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]


def test_64px_nets_are_the_pytorch_examples_dcgan_layer_for_layer():
    from genlib.bench import ReferenceDCGAN

    reference = ReferenceDCGAN(nz=100, ngf=64, ndf=64)
    assert _conv_weight_shapes(nets.ConvGenerator(100, 64, 3, width=64)) == _conv_weight_shapes(reference.generator)
    assert _conv_weight_shapes(nets.ConvCritic(64, 3, width=64, norm="batch")) == \
        _conv_weight_shapes(reference.discriminator)
