"""Shapes and stage arithmetic of the shared networks."""

import copy

import pytest
import torch
from torch import nn

from genlib import nets


@pytest.mark.parametrize("resolution, expected", [(8, (4, 1)), (16, (4, 2)), (28, (7, 2)), (32, (4, 3)),
                                                  (64, (4, 4)), (12, (6, 1))])
def test_conv_stages(resolution, expected):
    base, stages = nets.conv_stages(resolution)
    assert (base, stages) == expected and base * 2**stages == resolution


@pytest.mark.parametrize("resolution", [7, 9, 44, 300, 512])
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
    convolutions = (torch.nn.Conv2d, torch.nn.ConvTranspose2d)
    return [tuple(m.weight.shape) for m in module.modules() if isinstance(m, convolutions)]


def test_64px_nets_are_the_pytorch_examples_dcgan_layer_for_layer():
    from genlib.bench import ReferenceDCGAN

    reference = ReferenceDCGAN(nz=100, ngf=64, ndf=64)
    assert _conv_weight_shapes(nets.ConvGenerator(100, 64, 3, width=64)) == _conv_weight_shapes(reference.generator)
    assert _conv_weight_shapes(nets.ConvCritic(64, 3, width=64, norm="batch")) == \
        _conv_weight_shapes(reference.discriminator)


def test_conv_stages_accepts_256_and_widths_are_capped_at_8_times():
    assert nets.conv_stages(256) == (4, 6)
    assert nets.stage_widths(5, 8) == [8, 16, 32, 64, 64, 64]
    gen = nets.ConvGenerator(16, 128, 3, width=4)
    assert [m.out_channels for m in gen.modules() if isinstance(m, nn.ConvTranspose2d)] == [32, 32, 16, 8, 4, 3]
    critic = nets.ConvCritic(128, 3, width=4)
    assert [m.out_channels for m in critic.modules() if isinstance(m, nn.Conv2d)] == [4, 8, 16, 32, 32, 1]


def test_dcgan_init_of_norm_scales_and_biases():
    torch.manual_seed(0)
    for net in (nets.ConvGenerator(64, 64, 3, width=64, norm="batch"), nets.ConvCritic(64, 3, width=64, norm="batch"),
                nets.ConvGenerator(16, 32, 3, width=64, norm="layer")):
        scales = torch.cat([m.weight.flatten() for m in net.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))])
        assert abs(scales.mean().item() - 1.0) < 0.005 and abs(scales.std().item() - 0.02) < 0.004
        biases = [m.bias for m in net.modules() if getattr(m, "bias", None) is not None]
        assert biases and all(torch.count_nonzero(b) == 0 for b in biases)
    plain = nets.ConvGenerator(16, 32, 3, width=8, norm="none")  # a generator without norm has conv biases, all 0
    conv_biases = [m.bias for m in plain.modules() if isinstance(m, nn.ConvTranspose2d) and m.bias is not None]
    assert len(conv_biases) == 3 and all(torch.count_nonzero(b) == 0 for b in conv_biases)


def test_a_normed_generator_has_no_conv_biases_like_the_reference_dcgan():
    gen = nets.ConvGenerator(16, 64, 3, width=8, norm="batch")
    assert all(m.bias is None for m in gen.modules() if isinstance(m, nn.ConvTranspose2d))
    # genlib.bench.ReferenceDCGAN(nz=16, ngf=8)'s generator: 4x4 kernels, no conv biases, BatchNorm scale + shift
    channels = [16, 64, 32, 16, 8, 3]
    expected = sum(16 * a * b for a, b in zip(channels[:-1], channels[1:])) + 2 * sum(channels[1:-1])
    assert nets.count_parameters(gen) == expected


@pytest.mark.parametrize("norm", ["batch", "none"])
def test_a_critic_has_biases_on_its_first_and_last_convolutions_and_on_the_others_only_without_a_norm(norm):
    """As the DCGAN discriminator plus the 65 biases its docstring names; a bias before a norm is cancelled."""
    critic = nets.ConvCritic(64, 3, width=8, norm=norm)
    channels = [3, 8, 16, 32, 64, 1]  # stride-2 convolutions from width 8 to 8 * width, then 4x4 -> 1 score
    weights = sum(16 * a * b for a, b in zip(channels[:-1], channels[1:]))
    inner = sum(channels[2:-1])  # the channels of the three convolutions between the first and the last
    expected = weights + channels[1] + channels[-1] + (2 * inner if norm == "batch" else inner)  # norm: scale + shift
    assert nets.count_parameters(critic) == expected
    convolutions = [m for m in critic.modules() if isinstance(m, nn.Conv2d)]
    assert [m.bias is not None for m in convolutions] == [True] + [norm == "none"] * 3 + [True]


def test_generator_output_goes_through_tanh_only_when_asked():
    torch.manual_seed(0)
    z = torch.randn(4, 8)
    gen = nets.ConvGenerator(8, 8, 1, width=8, norm="none")
    assert isinstance(gen.net[-1], nn.Tanh)
    with torch.no_grad():
        gen.net[-2].weight.mul_(1e4)  # huge pre-activations: only a tanh keeps them in [-1, 1]
    out = gen(z)
    assert out.abs().max() <= 1 and out.abs().max() > 0.99
    raw = nets.ConvGenerator(8, 8, 1, width=8, norm="none", out_act="none")
    assert isinstance(raw.net[-1], nn.ConvTranspose2d)


def test_layer_norm_normalises_each_sample_over_all_its_features():
    torch.manual_seed(0)
    for shape, image in [((5, 6), False), ((5, 6, 3, 3), True)]:
        x = torch.randn(*shape) * 3 + 1
        flat = x.flatten(1)
        expected = ((flat - flat.mean(1, keepdim=True)) / (flat.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt())
        norm = nets.make_norm("layer", 6, image=image)
        torch.testing.assert_close(norm(x).flatten(1), expected, rtol=1e-5, atol=1e-5)  # fresh: scale 1, shift 0


def test_every_leaky_relu_of_the_encoder_has_dcgan_s_slope():
    slopes = {m.negative_slope for m in nets.ConvEncoder(4, 32, 3, width=8, norm="batch").modules()
              if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.2}


HIDDEN = (nn.LeakyReLU, nn.SiLU, nn.Softplus)


@pytest.mark.parametrize("act, kind", [(None, nn.LeakyReLU), ("leaky_relu", nn.LeakyReLU), ("silu", nn.SiLU),
                                       ("softplus", nn.Softplus)])
def test_the_critic_s_hidden_activation_is_chosen_by_name_and_leaky_relu_by_default(act, kind):
    critic = nets.ConvCritic(32, 1, width=8) if act is None else nets.ConvCritic(32, 1, width=8, act=act)
    hidden = [m for m in critic.modules() if isinstance(m, HIDDEN)]
    assert len(hidden) == 3 and all(type(m) is kind for m in hidden)  # 32x32: three stride-2 stages


def test_the_critic_rejects_an_unknown_activation():
    with pytest.raises(ValueError, match="unknown activation"):
        nets.ConvCritic(32, 1, width=8, act="gelu_typo")


def test_inplace_is_honoured_only_where_the_gradient_needs_only_the_output():
    assert nets.activation("leaky_relu", inplace=True).inplace and nets.activation("relu", inplace=True).inplace
    assert not nets.activation("silu", inplace=True).inplace and not nets.activation("leaky_relu").inplace
    # the encoder's in-place LeakyReLUs (DCGAN's) keep double backward exact: its gradient penalty's gradient
    # equals that of a copy whose activations do not overwrite their input
    torch.manual_seed(0)
    critic = nets.ConvCritic(16, 1, width=4).double()
    assert all(m.inplace for m in critic.modules() if isinstance(m, nn.LeakyReLU))
    copy_ = copy.deepcopy(critic)
    for m in copy_.modules():
        if isinstance(m, nn.LeakyReLU):
            m.inplace = False
    x = torch.randn(5, 1, 16, 16, dtype=torch.float64)
    grads = []
    for net in (critic, copy_):
        points = x.clone().requires_grad_(True)
        slope = torch.autograd.grad(net(points).sum(), points, create_graph=True)[0]
        grads.append(torch.autograd.grad(slope.pow(2).sum(), list(net.parameters()), materialize_grads=True))
    for inplace_grad, plain_grad in zip(*grads):
        torch.testing.assert_close(inplace_grad, plain_grad, rtol=0, atol=0)


def test_a_smooth_critic_has_a_smooth_input_gradient_where_leaky_relu_s_is_piecewise_constant():
    # Along a short segment in image space a LeakyReLU net's input gradient stays exactly constant (it changes
    # only at kinks, and a 1e-6 segment crosses none); a SiLU net's changes (what an energy whose gradient is a
    # score needs).
    torch.manual_seed(0)
    start, direction = torch.randn(2, 1, 1, 28, 28, dtype=torch.float64)
    segment = start + torch.linspace(0, 1e-6, 3, dtype=torch.float64).view(3, 1, 1, 1) * direction
    for act, piecewise_constant in (("leaky_relu", True), ("silu", False)):
        critic = nets.ConvCritic(28, 1, width=8, act=act).double()
        points = segment.clone().requires_grad_(True)
        grads = torch.autograd.grad(critic(points).sum(), points)[0]
        change = (grads[1:] - grads[:-1]).abs().max().item() / grads.abs().max().item()
        assert (change == 0.0) == piecewise_constant, (act, change)


def test_relu_activity_counts_dead_units_and_the_share_on_by_hand():
    torch.manual_seed(0)
    net = nets.MLP(2, 1, hidden=5, depth=2)
    with torch.no_grad():
        net[0].bias[0] = -100.0  # unit 0 of the first layer is off for every input below
    inputs = torch.randn(300, 2)
    first = torch.relu(inputs @ net[0].weight.T + net[0].bias)  # the same layers, written out
    second = torch.relu(first @ net[2].weight.T + net[2].bias)
    expected = [(int((h.max(0).values <= 0).sum()), (h > 0).float().mean().item()) for h in (first, second)]
    assert nets.relu_activity(net, inputs) == expected
    assert expected[0][0] >= 1
    assert nets.relu_activity(nets.MLP(2, 1, depth=2, act="tanh"), inputs) == []  # ReLUs only
    with pytest.raises(TypeError, match="Sequential"):
        nets.relu_activity(nets.ConvGenerator(4, 8, 1, 8), torch.randn(3, 4))
