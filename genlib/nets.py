"""Networks shared by every chapter: an MLP for 2-D toys and convolutional
generator / critic / encoder parametrised by image resolution and width.

Resolutions are ``base * 2**k`` with ``base`` in 4..7, so 8, 16, 28 (Fashion-MNIST),
32 and 64 all work: the generator starts from a ``base x base`` map and doubles it
``k`` times; the critic and encoder mirror it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

NORMS = ("batch", "layer", "none")
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "leaky_relu": lambda: nn.LeakyReLU(0.2), "silu": nn.SiLU,
               "elu": nn.ELU, "softplus": nn.Softplus}
INPLACE_SAFE = ("relu", "leaky_relu")
"""Activations whose gradient needs only their output, so they may overwrite their input (saves a tensor a layer)."""


def activation(name: str, inplace: bool = False) -> nn.Module:
    """A fresh activation module by name (``relu``, ``tanh``, ``leaky_relu``, ``silu``, ``elu``, ``softplus``);
    ``inplace`` is honoured by those in :data:`INPLACE_SAFE` and ignored by the rest."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
    module = ACTIVATIONS[name]()
    if inplace and name in INPLACE_SAFE:
        module.inplace = True
    return module


class MLP(nn.Sequential):
    """Fully connected net ``in_dim -> hidden x depth -> out_dim``; input [n, in_dim], output [n, out_dim].

    ``norm`` after each hidden linear layer: ``'none'``, ``'batch'`` or ``'layer'`` (see :func:`make_norm`)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 128, depth: int = 3, act: str = "relu",
                 norm: str = "none"):
        check_norm(norm)
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden)]
            if norm != "none":  # no Identity placeholder: layer indices (and checkpoint keys) stay as without norm
                layers += [make_norm(norm, hidden, image=False)]
            layers += [activation(act)]
            width = hidden
        layers += [nn.Linear(width, out_dim)]
        super().__init__(*layers)


@torch.no_grad()
def relu_activity(net: nn.Sequential, inputs: Tensor) -> list[tuple[int, float]]:
    """For each ReLU of ``net`` (in order), on ``inputs`` [n, in_dim]: (units off for every input, share of
    unit-input pairs on). A unit off for every input passes no gradient to its own weights: it is dead."""
    if not isinstance(net, nn.Sequential):
        raise TypeError(f"net must be an nn.Sequential (e.g. an MLP), got {type(net).__name__}")
    activity, hidden = [], inputs
    for layer in net:
        hidden = layer(hidden)
        if isinstance(layer, nn.ReLU):
            on = hidden.reshape(len(hidden), -1) > 0
            activity.append((int((~on.any(0)).sum()), on.float().mean().item()))
    return activity


def conv_stages(resolution: int) -> tuple[int, int]:
    """Split ``resolution`` into (base size in 4..7, number of 2x stages); e.g. 64 -> (4, 4), 28 -> (7, 2)."""
    if resolution < 8 or resolution > 256:
        raise ValueError(f"resolution must be between 8 and 256, got {resolution}")
    base, stages = resolution, 0
    while base % 2 == 0 and base // 2 >= 4:
        base, stages = base // 2, stages + 1
    if base > 7:
        raise ValueError(f"resolution {resolution} is not base * 2**k with base in 4..7 (e.g. 8, 16, 28, 32, 64)")
    return base, stages


def stage_widths(stages: int, width: int, max_mult: int = 8) -> list[int]:
    """Channel widths from the finest to the coarsest feature map: width, 2 width, ... capped at max_mult width."""
    return [width * min(2**i, max_mult) for i in range(stages + 1)]


class ConvGenerator(nn.Module):
    """DCGAN generator: z [n, z_dim] -> image [n, channels, resolution, resolution] in [-1, 1].

    At 64x64 with width 64 it is layer for layer the PyTorch-examples DCGAN generator: a transposed
    convolution to 8 width x 4 x 4, then stride-2 transposed convolutions halving the channels, the
    last one straight to the image channels. ``norm`` is ``'batch'`` (DCGAN's), ``'layer'`` or ``'none'``
    (:func:`make_norm`); IMLE needs one under which a sample's output does not depend on the rest of its batch
    (``'layer'`` or ``'none'``).
    """

    def __init__(self, z_dim: int, resolution: int = 64, channels: int = 3, width: int = 64, out_act: str = "tanh",
                 norm: str = "batch"):
        super().__init__()
        if out_act not in ("tanh", "none"):
            raise ValueError(f"out_act must be 'tanh' or 'none', got {out_act!r}")
        base, stages = conv_stages(resolution)
        widths = stage_widths(stages - 1, width)[::-1]  # coarsest first, e.g. 64: [8w, 4w, 2w, w]
        self.z_dim, self.resolution, self.channels = z_dim, resolution, channels
        # A bias before BatchNorm is cancelled; before GroupNorm(1) only its mean over channels is, and the norm's
        # own per-channel shift follows it, so only a generator without norm gets biases.
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(z_dim, widths[0], base, 1, 0, bias=norm == "none"), make_norm(norm, widths[0]),
            nn.ReLU(True)]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=norm == "none"), make_norm(norm, c_out),
                       nn.ReLU(True)]
        # Without tanh the output is a mean or a logit (VAE decoders), and a bias sets its background level.
        layers += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1, bias=out_act == "none")]
        if out_act == "tanh":
            layers += [nn.Tanh()]
        self.net = nn.Sequential(*layers)
        init_dcgan(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.reshape(z.shape[0], self.z_dim, 1, 1))


class ConvEncoder(nn.Module):
    """DCGAN encoder / critic: image [n, channels, r, r] -> [n, out_dim].

    At 64x64 with width 64 it has the layers of the PyTorch-examples DCGAN discriminator (stride-2
    convolutions doubling the channels from width to 8 width, then one convolution over the 4 x 4 map), except
    that its first and last convolutions keep their biases (65 more parameters at 3 channels and out_dim 1).
    ``norm`` is ``'batch'``, ``'layer'`` (GroupNorm with one group, safe with gradient
    penalties, which assume each sample's output depends on that sample only) or ``'none'``; ``act`` names the
    hidden activation (:func:`activation`; DCGAN's LeakyReLU(0.2) by default)."""

    def __init__(self, out_dim: int, resolution: int = 64, channels: int = 3, width: int = 64, norm: str = "none",
                 act: str = "leaky_relu"):
        super().__init__()
        base, stages = conv_stages(resolution)
        widths = stage_widths(stages - 1, width)  # finest first, e.g. 64: [w, 2w, 4w, 8w]
        layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 4, 2, 1), activation(act, inplace=True)]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=norm == "none"), make_norm(norm, c_out),
                       activation(act, inplace=True)]
        layers += [nn.Conv2d(widths[-1], out_dim, base, 1, 0), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        init_dcgan(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvCritic(ConvEncoder):
    """Scalar critic / discriminator / energy: image [n, channels, r, r] -> [n] (raw score, no sigmoid)."""

    def __init__(self, resolution: int = 64, channels: int = 3, width: int = 64, norm: str = "none",
                 act: str = "leaky_relu"):
        super().__init__(1, resolution, channels, width, norm, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


def make_norm(kind: str, channels: int, image: bool = True) -> nn.Module:
    """Normalisation layer by name for [n, channels, H, W] (``image``) or [n, channels] inputs: ``batch``,
    ``layer`` (GroupNorm(1): each sample normalised on its own, so its output does not depend on the rest of the
    batch) or ``none``."""
    check_norm(kind)
    if kind == "batch":
        return nn.BatchNorm2d(channels) if image else nn.BatchNorm1d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    return nn.Identity()


def check_norm(kind: str) -> None:
    """Raise a clear error unless ``kind`` is one of ``NORMS``."""
    if kind not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(map(repr, NORMS))}, got {kind!r}")


def init_dcgan(module: nn.Module) -> None:
    """DCGAN initialisation: conv weights N(0, 0.02), norm scales N(1, 0.02), biases 0."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(layer.weight, 0.0, 0.02)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.normal_(layer.weight, 1.0, 0.02)
            nn.init.zeros_(layer.bias)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
