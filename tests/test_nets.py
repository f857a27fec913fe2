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


@pytest.mark.parametrize("norm, per_sample", [("batch", False), ("layer", True), ("none", True)])
def test_norm_decides_whether_a_sample_depends_on_its_batchmates(norm, per_sample):
    torch.manual_seed(0)
    codes, batchmates = torch.randn(4, 8), torch.randn(12, 8)
    for net in (nets.ConvGenerator(8, 8, 1, width=8, norm=norm), nets.MLP(8, 5, hidden=16, depth=2, norm=norm)):
        net.train()  # BatchNorm uses the batch's statistics only in training mode
        alone, in_batch = net(codes), net(torch.cat([codes, batchmates]))[:4]
        assert torch.allclose(alone, in_batch, atol=1e-6) == per_sample
    conv_layers = [type(m).__name__ for m in nets.ConvGenerator(8, 16, 1, width=8, norm=norm).net]
    assert conv_layers.count({"batch": "BatchNorm2d", "layer": "GroupNorm", "none": "Identity"}[norm]) == 2
    mlp_layers = [type(m).__name__ for m in nets.MLP(8, 5, hidden=16, depth=2, norm=norm)]
    hidden_block = {"batch": ["Linear", "BatchNorm1d", "ReLU"], "layer": ["Linear", "GroupNorm", "ReLU"],
                    "none": ["Linear", "ReLU"]}[norm]
    assert mlp_layers == hidden_block * 2 + ["Linear"]


def test_mlp_depth_width_and_activation():
    mlp = nets.MLP(2, 3, hidden=10, depth=2, act="tanh")
    assert mlp(torch.randn(4, 2)).shape == (4, 3)
    assert sum(isinstance(m, torch.nn.Linear) for m in mlp) == 3
    assert nets.count_parameters(mlp) == (2 * 10 + 10) + (10 * 10 + 10) + (10 * 3 + 3)
    with pytest.raises(ValueError, match="unknown activation"):
        nets.MLP(2, 2, act="swish2")
    assert len(nets.MLP(2, 3, hidden=10, depth=2, norm="none")) == 5  # no placeholder layers without a norm
    for depth in (0, 2):  # rejected even where no layer would use it
        with pytest.raises(ValueError, match="norm must be"):
            nets.MLP(2, 2, depth=depth, norm="group")


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
