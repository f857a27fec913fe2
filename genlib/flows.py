"""Chapter 5: a map of generative families, and normalizing flows with exact likelihood.

Source: the Chinese blog post "生成模型" (``seeds/003_*.txt``): autoregressive models, autoencoders,
VAEs, GANs and flows side by side, then the change of variables ``p(x) = pi(z) |det dz/dx|`` and the
coupling layer ``x_2' = F(x_1) * x_2 + H(x_1)`` whose Jacobian is triangular. Where each idea lives:

* **Flows.** A :class:`Flow` maps ``x -> (y, log|det dy/dx|)`` and back. Coupling layers
  (:class:`AdditiveCoupling` = NICE, :class:`AffineCoupling` = RealNVP) use a binary mask
  (:func:`alternating_mask`, :func:`half_mask`, :func:`checkerboard_mask`, :func:`channel_mask`);
  :class:`Permutation`, :class:`LogitTransform` and :class:`Squeezed` (a layer acting at a coarser
  scale) complete the kit. :class:`NormalizingFlow` chains layers over a standard-normal base;
  :class:`RealNVP` (vectors) and :class:`RealNVPImage` (multiscale images) are two such chains, and
  :func:`layerwise` returns every intermediate state for the notebook's widget.
* **Discrete data.** :func:`dequantize` and :func:`bits_per_dim` fix the likelihood convention for
  8-bit images (stated in :func:`bits_per_dim`).
* **Training.** :class:`FlowModel` fits any flow by maximum likelihood through :func:`genlib.train.fit`.
* **The map.** Small members of the other families on the same data: :class:`AutoregressiveModel`
  (a MADE over binarised pixels or a Gaussian-mixture autoregression in 2-D), :class:`Autoencoder`
  and :class:`VAE` (ELBO and its bits/dim bound). They stay in this module because the chapter is
  one idea ("which families give a likelihood, and how"), as every chapter has one module.

Every model is a :class:`genlib.train.GenerativeModel`; ``build_*`` functions serve the CLI registry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genlib.data import to_float
from genlib.metrics import check_counts
from genlib.nets import MLP, ConvEncoder, ConvGenerator, stage_widths
from genlib.train import GenerativeModel, evaluating

if TYPE_CHECKING:
    from genlib.cli import TrainSpec

LOG_2PI = math.log(2 * math.pi)
T = TypeVar("T")

# ======================================================================================
# Invertible layers
# ======================================================================================


class Flow(nn.Module):
    """An invertible map with a tractable Jacobian: ``forward(x) -> (y, logdet [B])``, ``inverse(y) -> x``.

    ``logdet`` is ``log |det dy/dx|`` per sample, so the inverse has log-determinant ``-logdet``."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse(self, y: Tensor) -> Tensor:
        raise NotImplementedError


def choose(what: str, value: str, options: dict[str, T]) -> T:
    """``options[value]``, or a ValueError naming ``what`` and the valid choices."""
    if value not in options:
        raise ValueError(f"{what} must be one of {sorted(options)}, got {value!r}")
    return options[value]


def zero_logdet(x: Tensor) -> Tensor:
    """A zero log-determinant ``[B]`` for volume-preserving layers."""
    return x.new_zeros(x.shape[0])


def sum_per_sample(x: Tensor) -> Tensor:
    """Sum over every dimension but the first: ``[B, ...] -> [B]``."""
    return x.flatten(1).sum(1)


# ---- masks: 1 marks the coordinates that pass through unchanged and condition the rest ----


def alternating_mask(dim: int, parity: int) -> Tensor:
    """Vector mask ``[dim]``: ones at even (parity 0) or odd (parity 1) positions."""
    return (torch.arange(dim) % 2 == parity).float()


def half_mask(dim: int, parity: int) -> Tensor:
    """Vector mask ``[dim]``: ones on the first half (parity 0) or the second half (parity 1)."""
    first = (torch.arange(dim) < dim // 2).float()
    return first if parity == 0 else 1 - first


def checkerboard_mask(shape: Sequence[int], parity: int) -> Tensor:
    """Image mask ``[C, H, W]``: ones where ``(i + j) % 2 == parity``, the same in every channel."""
    c, h, w = shape
    ij = torch.arange(h)[:, None] + torch.arange(w)[None, :]
    return (ij % 2 == parity).float().expand(c, h, w).contiguous()


def channel_mask(shape: Sequence[int], parity: int) -> Tensor:
    """Image mask ``[C, H, W]``: ones on the first half of the channels (parity 0) or the second."""
    c, h, w = shape
    return half_mask(c, parity)[:, None, None].expand(c, h, w).contiguous()


# ---- coupling layers ----


def zero_init(layer: nn.Module) -> nn.Module:
    """Zero the weights and bias of ``layer`` so that a coupling built on it starts as the identity."""
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class Coupling(Flow):
    """Shared part of the coupling layers: the mask ``[event]`` and the conditioner net.

    The net sees only the masked coordinates ``x * mask`` (plus, for images, the mask itself: a
    convolution is translation-equivariant and must be told which pixels are given). Its output
    is multiplied by ``1 - mask``, so the masked coordinates pass through and the Jacobian is triangular."""

    def __init__(self, mask: Tensor, net: nn.Module, mask_as_input: bool = False):
        super().__init__()
        self.register_buffer("mask", mask)
        self.net = net
        self.mask_as_input = mask_as_input

    def conditioner(self, x: Tensor) -> Tensor:
        """The net's output ``[B, k * C, ...]`` computed from the unchanged coordinates of ``x``, in x's dtype."""
        given = x * self.mask
        if self.mask_as_input:
            given = torch.cat([given, self.mask.expand_as(x)], dim=1)
        # Under autocast the net returns bf16; s and t must keep x's precision for the logdet sum.
        return self.net(given).to(x.dtype)


class AdditiveCoupling(Coupling):
    """NICE: ``y = x + (1 - m) * t(m * x)``; volume preserving (logdet 0). The net outputs ``t`` [B, C, ...]."""

    def shift(self, x: Tensor) -> Tensor:
        """The shift ``t`` restricted to the transformed coordinates."""
        return self.conditioner(x) * (1 - self.mask)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x + self.shift(x), zero_logdet(x)

    def inverse(self, y: Tensor) -> Tensor:
        # shift(y) == shift(x): the net reads only the coordinates the layer leaves unchanged.
        return y - self.shift(y)


class AffineCoupling(Coupling):
    """RealNVP: ``y = m x + (1 - m) (x exp(s) + t)`` with ``s = scale * tanh(s_raw)``; logdet = sum s.

    The net outputs ``[s_raw, t]`` stacked on dim 1 (``[B, 2C, ...]``); ``scale`` is learned per channel
    (per coordinate for vectors; init 1). The tanh bound keeps one layer from blowing up the volume early in
    training."""

    def __init__(self, mask: Tensor, net: nn.Module, mask_as_input: bool = False):
        super().__init__(mask, net, mask_as_input)
        self.scale = nn.Parameter(torch.ones(mask.shape[0], *([1] * (mask.dim() - 1))))

    def log_scale_and_shift(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(s, t)`` like ``x``, both zero on the masked coordinates."""
        s_raw, t = self.conditioner(x).chunk(2, dim=1)
        free = 1 - self.mask
        return self.scale * torch.tanh(s_raw) * free, t * free

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self.log_scale_and_shift(x)
        return x * torch.exp(s) + t, sum_per_sample(s)

    def inverse(self, y: Tensor) -> Tensor:
        s, t = self.log_scale_and_shift(y)
        return (y - t) * torch.exp(-s)


def coupling_mlp(dim: int, outputs: int, hidden: int, depth: int, act: str = "relu") -> MLP:
    """Conditioner for vectors: MLP ``[B, dim] -> [B, outputs * dim]``, last layer zero-initialised."""
    net = MLP(dim, outputs * dim, hidden, depth, act)
    zero_init(net[-1])
    return net


class ResidualBlock(nn.Module):
    """``x + conv(relu(conv(relu(x))))`` at constant width; keeps deep conditioners trainable."""

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(width, width, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def coupling_resnet(c_in: int, c_out: int, width: int, blocks: int) -> nn.Sequential:
    """Conditioner for images: small residual conv net ``[B, c_in, H, W] -> [B, c_out, H, W]``, last conv zero."""
    return nn.Sequential(nn.Conv2d(c_in, width, 3, padding=1), *[ResidualBlock(width) for _ in range(blocks)],
                         nn.ReLU(), zero_init(nn.Conv2d(width, c_out, 3, padding=1)))


# ---- volume-preserving and elementwise layers ----


class Permutation(Flow):
    """Permute dim 1 (features or channels) by a fixed permutation: ``reverse`` or seeded ``random``."""

    def __init__(self, size: int, kind: str = "reverse", seed: int = 0):
        super().__init__()
        choose("permutation", kind, {"reverse": None, "random": None})
        if kind == "reverse":
            perm = torch.arange(size - 1, -1, -1)
        else:
            perm = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x[:, self.perm], zero_logdet(x)

    def inverse(self, y: Tensor) -> Tensor:
        return y[:, self.inv_perm]


class LogitTransform(Flow):
    """``x -> logit(alpha + (1 - 2 alpha) (x + 1) / 2)``: unbounded coordinates for the couplings.

    ``alpha`` keeps dequantised pixels at 0 or 255 away from the logit's infinities. The pixel range [-1, 1]
    maps onto [logit(alpha), logit(1 - alpha)], and the whole real line comes from ``(-1 - e, 1 + e)``,
    ``e = 2 alpha / (1 - 2 alpha)``, so a flow on top puts some of its mass outside [-1, 1]. RealNVP used 0.05
    on CIFAR-10, as logit(alpha + (1 - alpha) v) for v in [0, 1] (in this symmetric form 0.05 gives e = 0.111);
    the default 1e-6 suits data with many pixels at 0 or 255 (half of Fashion-MNIST's pixels are 0): with 0.05
    that spike sits in a sliver of width 0.07 at logit(0.05), which the couplings must model as a near-point mass
    (chapter 5 measures the difference)."""

    def __init__(self, alpha: float = 1e-6):
        super().__init__()
        if not 0 < alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
        self.alpha = alpha

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        w = self.alpha + (1 - 2 * self.alpha) * (x + 1) / 2
        y = torch.log(w) - torch.log1p(-w)
        # dy/dx = (1 - 2 alpha) / 2 * 1 / (w (1 - w)), elementwise.
        logdet = math.log((1 - 2 * self.alpha) / 2) - torch.log(w) - torch.log1p(-w)
        return y, sum_per_sample(logdet)

    def inverse(self, y: Tensor) -> Tensor:
        return 2 * (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha) - 1


def squeeze(x: Tensor, times: int = 1) -> Tensor:
    """Space to channels, ``times`` times: ``[B, C, H, W] -> [B, 4^k C, H / 2^k, W / 2^k]``.

    Output channel ``4 c + 2 di + dj`` holds pixel ``(2 i + di, 2 j + dj)`` of channel ``c``, so the
    last ``n`` channels at one level become the last ``4 n`` channels at the next."""
    for _ in range(times):
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)
    return x


def unsqueeze(x: Tensor, times: int = 1) -> Tensor:
    """Inverse of :func:`squeeze`."""
    for _ in range(times):
        b, c, h, w = x.shape
        x = x.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, 2 * h, 2 * w)
    return x


class Squeezed(Flow):
    """Apply ``layer`` to the last ``active`` channels of the image squeezed ``level`` times.

    This is the multiscale architecture without a ragged state: the channels factored out at earlier
    scales are the leading channels of the squeezed layout and pass through, so every layer maps a
    full ``[B, C, H, W]`` image to another and :func:`layerwise` can show each state as an image."""

    def __init__(self, layer: Flow, level: int, active: int):
        super().__init__()
        self.layer, self.level, self.active = layer, level, active

    def _map_active(self, x: Tensor,
                    fn: Callable[[Tensor], tuple[Tensor, Tensor | None]]) -> tuple[Tensor, Tensor | None]:
        """Squeeze, map the active channels by ``fn -> (y, logdet or None)``, unsqueeze."""
        h = squeeze(x, self.level)
        y, logdet = fn(h[:, -self.active:])
        return unsqueeze(torch.cat([h[:, :-self.active], y], dim=1), self.level), logdet

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._map_active(x, self.layer)

    def inverse(self, y: Tensor) -> Tensor:
        return self._map_active(y, lambda a: (self.layer.inverse(a), None))[0]


# ======================================================================================
# Flows with a standard-normal base
# ======================================================================================


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """``log N(z; 0, I)`` summed per sample: ``[B, ...] -> [B]``."""
    return sum_per_sample(-0.5 * z.pow(2) - 0.5 * LOG_2PI)


class NormalizingFlow(Flow):
    """``z = f_L(...f_1(x))`` with ``z ~ N(0, I)``: ``log p(x) = log N(z) + sum_l logdet_l``.

    ``event_shape`` is the shape of one sample (``(dim,)`` or ``(C, H, W)``); z has the same shape."""

    def __init__(self, layers: Sequence[Flow], event_shape: Sequence[int]):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.event_shape = tuple(event_shape)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [B, *event] -> (z [B, *event], log|det dz/dx| [B])``."""
        logdet = zero_logdet(x)
        for layer in self.layers:
            x, step_logdet = layer(x)
            logdet = logdet + step_logdet
        return x, logdet

    def inverse(self, z: Tensor) -> Tensor:
        """``z [B, *event] -> x [B, *event]``."""
        for layer in reversed(self.layers):
            z = layer.inverse(z)
        return z

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log-density ``[B]`` (nats) of ``x [B, *event]``."""
        z, logdet = self(x)
        return standard_normal_log_prob(z) + logdet

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        """``n`` samples ``[n, *event]``; ``temperature < 1`` shrinks z towards the mode (Glow's trick)."""
        device = next(self.parameters()).device
        return self.inverse(temperature * torch.randn(n, *self.event_shape, device=device))


class RealNVP(NormalizingFlow):
    """RealNVP for vectors ``[B, dim]``: ``n_layers`` couplings with masks of alternating parity.

    ``coupling``: ``affine`` (RealNVP) or ``additive`` (NICE); ``mask``: ``alternating`` or ``half``
    (identical for dim 2); ``permutation``: ``None``, ``reverse`` or ``random``, inserted between
    couplings. With a permutation, the permutation does the mixing and the mask parity stays 0, unless
    parity 0 would transform none of the coordinates that no coupling has transformed yet (once all
    have been, none of those the previous coupling left unchanged); then it is 1. That happens where
    the permutation maps the mask onto itself: reversing an odd number of coordinates keeps even
    positions even, and with a fixed parity they would never be transformed. A configuration that still leaves
    an input coordinate untransformed (one coupling; a few random permutations over three layers) is refused."""

    def __init__(self, dim: int, n_layers: int = 8, hidden: int = 128, depth: int = 2, coupling: str = "affine",
                 mask: str = "alternating", permutation: str | None = None, act: str = "relu"):
        if dim < 2:
            raise ValueError(f"a coupling flow needs dim >= 2, got {dim}")
        check_counts(1, n_layers=n_layers, hidden=hidden, depth=depth)
        make_mask = choose("mask", mask, {"alternating": alternating_mask, "half": half_mask})
        layer_class = choose("coupling", coupling, {"affine": AffineCoupling, "additive": AdditiveCoupling})
        outputs = 2 if coupling == "affine" else 1
        layers: list[Flow] = []
        order = torch.arange(dim)  # order[j]: the input coordinate at position j after the permutations so far
        untouched = torch.ones(dim, dtype=torch.bool)  # input coordinates no coupling has transformed yet
        passed = untouched  # input coordinates the previous coupling left unchanged
        for i in range(n_layers):
            parity = i % 2
            if permutation:
                target = untouched if untouched.any() else passed
                parity = 0 if target[order][make_mask(dim, 0) == 0].any() else 1
            layer_mask = make_mask(dim, parity)
            layers.append(layer_class(layer_mask, coupling_mlp(dim, outputs, hidden, depth, act)))
            passed = torch.zeros(dim, dtype=torch.bool)
            passed[order[layer_mask == 1]] = True
            untouched = untouched & passed
            if permutation and i < n_layers - 1:
                layers.append(Permutation(dim, permutation, seed=i))
                order = order[layers[-1].perm]
        if untouched.any():  # such an output is a copy of its input: always a standard normal marginal
            raise ValueError(f"input coordinates {untouched.nonzero().flatten().tolist()} pass through all {n_layers} "
                             f"couplings unchanged (mask {mask!r}, permutation {permutation!r}); use more layers")
        super().__init__(layers, (dim,))


class RealNVPImage(NormalizingFlow):
    """Multiscale RealNVP for images ``[B, C, H, W]`` with values in (-1, 1) (dequantised, see :func:`dequantize`).

    Layers: a :class:`LogitTransform`; then at each of ``n_scales`` scales 3 checkerboard affine
    couplings, a squeeze (H, W halve, channels x4), 3 channel-mask couplings and the factoring-out of
    half the channels (they are final z); the last scale has 4 checkerboard couplings and no squeeze.
    H and W must be divisible by ``2 ** (n_scales - 1)`` (28 = 4 * 7: at most 3 scales). Conditioners
    are residual conv nets with ``blocks`` blocks, width ``width`` at full resolution doubling per scale
    (at most 4x: coarse scales cost few pixels but would dominate the parameter count). ``forward``
    includes the logit's logdet, so ``log_prob`` is the density of x. That density lives on
    ``(-1 - e, 1 + e)^D``, ``e = 2 alpha / (1 - 2 alpha)`` (see :class:`LogitTransform`), not on
    [-1, 1)^D: the mass outside the pixel range is lost to the pixel cells, which only loosens the
    bits/dim bound of :func:`bits_per_dim`."""

    def __init__(self, shape: Sequence[int], n_scales: int = 2, width: int = 64, blocks: int = 2,
                 alpha: float = 1e-6):
        c, h, w = shape
        if n_scales < 1 or h % 2 ** (n_scales - 1) or w % 2 ** (n_scales - 1):
            raise ValueError(f"image {h}x{w} cannot be squeezed {n_scales - 1} times (n_scales={n_scales})")
        widths = stage_widths(n_scales - 1, width, max_mult=4)

        def coupling(level: int, active: int, make_mask: Callable[[Sequence[int], int], Tensor], parity: int) -> Flow:
            event = (active, h >> level, w >> level)
            net = coupling_resnet(2 * active, 2 * active, widths[level], blocks)
            return Squeezed(AffineCoupling(make_mask(event, parity), net, mask_as_input=True), level, active)

        layers: list[Flow] = [LogitTransform(alpha)]
        active = c  # channels of the level-`level` layout still being transformed
        for level in range(n_scales):
            last = level == n_scales - 1
            layers += [coupling(level, active, checkerboard_mask, i % 2) for i in range(4 if last else 3)]
            if not last:
                active *= 4
                layers += [coupling(level + 1, active, channel_mask, i % 2) for i in range(3)]
                active //= 2  # factor out: the leading half of the channels is left alone from here on
        super().__init__(layers, (c, h, w))


@torch.no_grad()
def layerwise(flow: NormalizingFlow, x: Tensor, inverse: bool = False) -> list[Tensor]:
    """Every state of ``flow`` on input ``x``: ``[x, f_1(x), f_2(f_1(x)), ..., z]`` (L + 1 tensors like x).

    With ``inverse=True``, ``x`` is a base sample z and the states run z -> data (the generative direction)."""
    states = [x]
    for layer in (reversed(flow.layers) if inverse else flow.layers):
        states.append(layer.inverse(states[-1]) if inverse else layer(states[-1])[0])
    return states


# ======================================================================================
# Discrete data: dequantisation and bits per dimension
# ======================================================================================


def dequantize(x: Tensor, noise: Tensor | None = None) -> Tensor:
    """Uniform dequantisation: images in [-1, 1] from uint8 (``k / 127.5 - 1``) -> ``(k + u) / 128 - 1``.

    ``u ~ U[0, 1)`` (or the given ``noise`` like x), so the result fills the cube [-1, 1)^D: integer
    ``k`` owns the cell of width 2 / 256 that starts at ``k / 128 - 1``."""
    k = torch.round((x + 1) * 127.5).clamp(0, 255)
    u = torch.rand_like(x) if noise is None else noise
    # u within an ulp of 1 would make k + u round up to k + 1 (float32: for u > 1 - 2^-16): keep it in k's cell
    u = u.clamp(max=1 - 128 * torch.finfo(x.dtype).eps)
    return (k + u) / 128 - 1


def discrete_bits_per_dim(log_prob: Tensor | float, dims: int) -> Tensor | float:
    """``-log P(x) / (D ln 2)``: bits per dimension of a probability mass ``log P`` (nats), e.g. binary images."""
    return -log_prob / (dims * math.log(2))


def bits_per_dim(log_prob: Tensor | float, dims: int, bins: int = 256, width: float = 2.0) -> Tensor | float:
    """Bits per dimension of 8-bit data from the log-density (nats) of its dequantised version.

    Convention: the model's density ``p`` lives on the range the data were mapped to, of ``width``
    per dimension (2 for [-1, 1), 1 for [0, 1)), split into ``bins`` equal cells (256 for 8 bits). The
    cell of pixel values k has volume ``(width / bins)^D`` and probability ``log P(k) >= E_u log p(x~)
    + D log(width / bins)`` (Jensen), so ``bits/dim = (-log p(x~) + D log(bins / width)) / (D ln 2)``.
    With ``width=1`` ([0, 1) scale) this is the usual ``(-log p(x~) + D log 256) / (D ln 2)``; a
    density on [-1, 1) is ``2^-D`` times the one on [0, 1), which the ``width`` term accounts for."""
    return discrete_bits_per_dim(log_prob + dims * math.log(width / bins), dims)


# ======================================================================================
# Training by maximum likelihood
# ======================================================================================


class FlowModel(GenerativeModel):
    """Maximum-likelihood training of any :class:`NormalizingFlow` (Adam, gradient-norm clipping).

    With ``discrete=True`` (8-bit images) each batch is dequantised and ``bits_per_dim`` is reported
    beside ``nll`` (nats per sample). Likelihoods are computed in fp32 even under CUDA autocast:
    a log-determinant summed over thousands of dimensions needs the precision. With ``decay_steps``
    the learning rate follows a cosine from ``lr`` to 0 over that many steps (short runs end sharper)."""

    def __init__(self, flow: NormalizingFlow, lr: float = 1e-3, clip: float = 100.0, discrete: bool = False,
                 temperature: float = 1.0, decay_steps: int | None = None):
        super().__init__()
        self.flow, self.clip, self.discrete, self.temperature = flow, clip, discrete, temperature
        self.dims = math.prod(flow.event_shape)
        self.lr, self.decay_steps = lr, decay_steps
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))  # in the checkpoint: exact resume
        self.optimizers = {"flow": torch.optim.Adam(flow.parameters(), lr=lr)}

    graph_safe = True  # with a schedule, prepare_for_graph moves it onto the device

    def current_lr(self) -> float:
        """The learning rate of the next step: constant, or cosine-decayed over ``decay_steps``."""
        if not self.decay_steps:
            return self.lr
        return self._cosine_lr(min(int(self.steps_done) / self.decay_steps, 1.0))

    def _cosine_lr(self, progress: float | Tensor) -> float | Tensor:
        """The cosine schedule at ``progress`` in [0, 1]: a Python float, or a 0-dim tensor computed on its device."""
        cos = progress.mul(math.pi).cos() if isinstance(progress, Tensor) else math.cos(math.pi * progress)
        return 0.5 * self.lr * (1 + cos)

    def prepare_for_graph(self) -> None:
        """With a schedule, keep the learning rate as a tensor on the device (capturable Adam reads it there), so
        that a replayed step computes it from ``steps_done`` instead of having it set from Python."""
        if self.decay_steps:
            for group in self.optimizers["flow"].param_groups:
                group["lr"] = torch.tensor(self.current_lr(), dtype=torch.float32, device=self.device)

    def schedule_lr(self) -> None:
        """Set the learning rate of the next step: on the device when it is a tensor (:meth:`prepare_for_graph`),
        else from Python."""
        if not self.decay_steps:
            return
        for group in self.optimizers["flow"].param_groups:
            if isinstance(group["lr"], Tensor):
                group["lr"].copy_(self._cosine_lr((self.steps_done.double() / self.decay_steps).clamp_(max=1.0)))
            else:
                group["lr"] = self.current_lr()

    def nll(self, x: Tensor, flow: NormalizingFlow | None = None) -> Tensor:
        """``-log p(x)`` per sample ``[B]`` (of the dequantised x when discrete), in nats, fp32."""
        flow = self.flow if flow is None else flow
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            return -flow.log_prob(dequantize(x) if self.discrete else x)

    def report(self, nll: Tensor | float) -> dict[str, Tensor | float]:
        """The logged quantities for a mean ``nll``: itself, plus bits/dim for discrete data."""
        out = {"nll": nll}
        if self.discrete:
            out["bits_per_dim"] = bits_per_dim(-nll, self.dims)
        return out

    def step(self, x: Tensor, index: Tensor) -> dict[str, Tensor]:
        nll = self.nll(x).mean()
        self.backward("flow", nll)
        # On a loss in nats per image the gradient norm is in the thousands, so a clip of 100 acts on nearly every
        # step, as a normalisation; measured on chapter 5's live flow it gives lower bits/dim than no clip.
        nn.utils.clip_grad_norm_(self.flow.parameters(), self.clip)
        self.schedule_lr()
        self.optimizers["flow"].step()
        self.steps_done += 1
        return self.report(nll.detach())

    @torch.no_grad()
    def evaluate(self, data: Tensor, batch_size: int = 500) -> dict[str, float]:
        """Mean ``nll`` (and ``bits_per_dim``) over a whole dataset (uint8 images or float vectors)."""
        net = self.sampling_net().eval()
        return self.report(dataset_mean(lambda x: self.nll(x, net), data, self.device, batch_size))

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """``n`` samples; images are clamped to [-1, 1] (the logit layer's inverse reaches slightly beyond it)."""
        x = self.sampling_net().sample(n, self.temperature)
        return x.clamp(-1, 1) if self.discrete else x

    def ema_source(self) -> nn.Module:
        return self.flow


@torch.no_grad()
def dataset_mean(per_sample: Callable[[Tensor], Tensor], data: Tensor, device: torch.device,
                 batch_size: int = 500) -> float:
    """The mean over ``data`` [N, ...] of ``per_sample(x)`` [B], taken in batches on ``device``, each batch as
    floats (uint8 images mapped to [-1, 1] by :func:`~genlib.data.to_float`): a held-out score of a whole set."""
    total, count = 0.0, 0
    for chunk in data.split(batch_size):
        chunk = chunk.to(device)
        x = to_float(chunk) if chunk.dtype == torch.uint8 else chunk.float()
        total, count = total + float(per_sample(x).sum()), count + len(chunk)
    return total / count


def independent_pixels_log_prob(train: Tensor, test: Tensor, levels: int = 256, smoothing: float = 1.0) -> Tensor:
    """Baseline: ``log P(test image)`` [M] (nats) under independent per-pixel categoricals over ``levels`` values,
    fitted to integer images train [N, ...] (counts plus ``smoothing``) and scored on test [M, ...] of one shape.

    On 8-bit images its dequantised density is ``P / (2/256)^D``, so :func:`bits_per_dim` of that density equals
    :func:`discrete_bits_per_dim` of this mass: the baseline sits in either column of chapter 5's table."""
    train_flat, test_flat = train.flatten(1).long(), test.flatten(1).long()
    if train_flat.shape[1] != test_flat.shape[1]:
        raise ValueError(f"train and test images differ in shape: {tuple(train.shape)}, {tuple(test.shape)}")
    if min(train_flat.min(), test_flat.min()) < 0 or max(train_flat.max(), test_flat.max()) >= levels:
        raise ValueError(f"pixel values must be integers in [0, {levels})")
    dims = train_flat.shape[1]
    pixels = torch.arange(dims, device=train_flat.device)
    counts = torch.bincount((pixels * levels + train_flat).flatten(), minlength=dims * levels).view(dims, levels)
    log_probs = (counts + smoothing).double().log() - math.log(len(train_flat) + levels * smoothing)
    return log_probs[pixels, test_flat].sum(1)


def gaussian_log_density(train: Tensor, test: Tensor, ridge: float = 1e-6) -> Tensor:
    """Baseline: ``log N(test; mean, cov)`` [M] (nats, float64) of one full-covariance Gaussian fitted by maximum
    likelihood to train [N, ...] (``ridge`` added to the covariance's diagonal), at test [M, ...]."""
    train_flat, test_flat = train.flatten(1), test.flatten(1).double()
    chunks = train_flat.split(8192)  # float64 a chunk at a time: 60,000 images at once would be 376 MB
    mean = sum(chunk.double().sum(0) for chunk in chunks) / len(train_flat)
    cov = sum(centred.T @ centred for centred in (chunk.double() - mean for chunk in chunks))
    cov = cov / len(train_flat) + ridge * torch.eye(len(mean), dtype=torch.float64, device=mean.device)
    return torch.distributions.MultivariateNormal(mean, covariance_matrix=cov).log_prob(test_flat)


# ======================================================================================
# The map: autoregressive model, autoencoder, VAE on the same data
# ======================================================================================


def binarize(x: Tensor) -> Tensor:
    """Images in [-1, 1] -> {0, 1} by thresholding at mid-grey (pixel >= 128), same shape."""
    return (x > 0).float()


class MaskedLinear(nn.Linear):
    """``nn.Linear`` whose weight is multiplied by a fixed 0/1 ``mask [out, in]``."""

    def __init__(self, mask: Tensor):
        super().__init__(mask.shape[1], mask.shape[0])
        self.register_buffer("mask", mask)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Sequential):
    """Masked autoencoder (Germain et al. 2015): ``x [B, D] -> params [B, k, D]`` where
    ``params[:, :, i]`` depends on ``x[:, :i]`` only (natural order), so ``p(x) = prod_i p(x_i | x_<i)``."""

    def __init__(self, dim: int, k: int, hidden: int = 256, depth: int = 2):
        in_deg = torch.arange(1, dim + 1)
        # hidden degrees spread evenly over 1..D-1: with fewer hidden units than D - 1, degrees
        # 1..hidden alone would cut every later coordinate off from all but the first `hidden` inputs
        hid_deg = torch.linspace(1, max(dim - 1, 1), hidden).round().long()  # degree d sees x_1..x_d
        out_deg = in_deg.repeat(k)  # output j * D + i belongs to coordinate i
        layers: list[nn.Module] = []
        prev = in_deg
        for _ in range(depth):
            layers += [MaskedLinear((hid_deg[:, None] >= prev[None, :]).float()), nn.ReLU()]
            prev = hid_deg
        layers.append(MaskedLinear((out_deg[:, None] > prev[None, :]).float()))
        super().__init__(*layers)
        self.dim, self.k = dim, k

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).reshape(len(x), self.k, self.dim)


class ScoredModel(GenerativeModel):
    """A family whose training loss is the batch mean of a per-sample score, :meth:`sample_losses` (``-log p``, or
    the negative ELBO), minimised by its one optimiser ``self.optimizers[self.player]`` and named by ``report``:
    :meth:`evaluate` takes the same score over a held-out set."""

    player: str = ""
    """The key of the family's one optimiser (and so of its state in checkpoints)."""

    def sample_losses(self, x: Tensor) -> Tensor:
        """The per-sample training loss [B] of data ``x`` [B, ...] (floats, as the sampler hands them)."""
        raise NotImplementedError

    def step(self, x: Tensor, index: Tensor) -> dict[str, Tensor]:
        loss = self.sample_losses(x).mean()
        self.update(self.player, loss)
        return self.report(loss.detach())

    @torch.no_grad()
    def evaluate(self, data: Tensor, batch_size: int = 500) -> dict[str, float]:
        """The mean of :meth:`sample_losses` over a whole dataset (uint8 images or float vectors), in eval mode, as
        ``report`` names it (with bits/dim where defined)."""
        with evaluating(self):
            return self.report(dataset_mean(self.sample_losses, data, self.device, batch_size))


class AutoregressiveModel(ScoredModel):
    """An autoregressive family member: a :class:`MADE` with a per-coordinate likelihood.

    ``bernoulli``: binarised images (:func:`binarize`), ``p(x_i | x_<i)`` Bernoulli; samples are
    returned as images in {-1, 1}. ``gmm``: real vectors (2-D toys), ``p(x_i | x_<i)`` a mixture of
    ``components`` Gaussians. Reports ``nll`` (nats) and, for binary data, ``bits_per_dim = nll / (D ln 2)``.
    Sampling needs D sequential passes: the price of the chain rule the source points out."""

    player = "made"

    def __init__(self, shape: Sequence[int], likelihood: str = "bernoulli", hidden: int = 256, depth: int = 2,
                 components: int = 8, lr: float = 1e-3):
        super().__init__()
        check_counts(1, hidden=hidden, depth=depth, components=components)
        k = choose("likelihood", likelihood, {"bernoulli": 1, "gmm": 3 * components})
        self.shape, self.likelihood, self.dims = tuple(shape), likelihood, math.prod(shape)
        self.made = MADE(self.dims, k, hidden, depth)
        self.optimizers = {self.player: torch.optim.Adam(self.made.parameters(), lr=lr)}

    def prepare(self, x: Tensor) -> Tensor:
        """Data ``[B, *shape]`` -> the modelled vectors ``[B, D]`` (binarised for ``bernoulli``)."""
        return (binarize(x) if self.likelihood == "bernoulli" else x).flatten(1)

    def _conditionals(self, params: Tensor) -> torch.distributions.Distribution:
        """Per-coordinate conditionals from MADE outputs ``[B, k, D]`` (batch shape ``[B, D]``)."""
        if self.likelihood == "bernoulli":
            return torch.distributions.Bernoulli(logits=params[:, 0])
        logits, mean, log_std = params.chunk(3, dim=1)  # each [B, K, D]
        mix = torch.distributions.Categorical(logits=logits.movedim(1, -1))
        comp = torch.distributions.Normal(mean.movedim(1, -1), log_std.clamp(-7, 5).exp().movedim(1, -1))
        return torch.distributions.MixtureSameFamily(mix, comp)

    def log_prob(self, v: Tensor) -> Tensor:
        """Exact ``log p(v)`` ``[B]`` of prepared vectors ``v [B, D]`` (a probability for binary v)."""
        return self._conditionals(self.made(v)).log_prob(v).sum(1)

    def report(self, nll: Tensor | float) -> dict[str, Tensor | float]:
        """The logged quantities for a mean ``nll``: itself, plus bits/dim for binary data."""
        out = {"nll": nll}
        if self.likelihood == "bernoulli":
            out["bits_per_dim"] = discrete_bits_per_dim(-nll, self.dims)
        return out

    def sample_losses(self, x: Tensor) -> Tensor:
        """``-log p`` [B] of data ``x`` (binarised first for ``bernoulli``)."""
        return -self.log_prob(self.prepare(x))

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        v = torch.zeros(n, self.dims, device=self.device)
        for i in range(self.dims):  # coordinate i only depends on the ones already drawn
            v[:, i] = self._conditionals(self.made(v)).sample()[:, i]
        v = 2 * v - 1 if self.likelihood == "bernoulli" else v
        return v.reshape(n, *self.shape)


def encoder_decoder(shape: Sequence[int], z_dim: int, width: int, enc_out: int,
                    dec_channels: int, out_act: str) -> tuple[nn.Module, nn.Module]:
    """An (encoder ``[B, *shape] -> [B, enc_out]``, decoder ``[B, z] -> [B, dec_channels, ...]``) pair:
    DCGAN-style conv nets for images, MLPs for vectors (the decoder output flattened then)."""
    if len(shape) == 3:
        c, res, _ = shape
        return (ConvEncoder(enc_out, res, c, width),
                ConvGenerator(z_dim, res, dec_channels, width, out_act=out_act))
    dim = shape[0]
    return MLP(dim, enc_out, width, 2), MLP(z_dim, dec_channels * dim, width, 2)


class Autoencoder(GenerativeModel):
    """Deterministic autoencoder with an L2 loss (the source's element-wise supervision).

    It has no prior over codes; to sample, codes are drawn from a Gaussian fitted to the training
    codes (running mean and covariance): exactly the uncontrolled code distribution that motivates the VAE."""

    def __init__(self, shape: Sequence[int], z_dim: int = 16, width: int = 64, lr: float = 1e-3,
                 momentum: float = 0.01):
        super().__init__()
        self.shape, self.momentum = tuple(shape), momentum
        images = len(self.shape) == 3
        self.encoder, self.decoder = encoder_decoder(self.shape, z_dim, width, z_dim, self.shape[0] if images else 1,
                                                     "tanh" if images else "none")
        self.register_buffer("code_mean", torch.zeros(z_dim))
        self.register_buffer("code_cov", torch.eye(z_dim))
        self.optimizers = {"ae": torch.optim.Adam(self.parameters(), lr=lr)}

    def decode(self, z: Tensor) -> Tensor:
        """Codes ``[B, z] -> [B, *shape]``."""
        return self.decoder(z).reshape(len(z), *self.shape)

    def step(self, x: Tensor, index: Tensor) -> dict[str, Tensor]:
        z = self.encoder(x)
        loss = (self.decode(z) - x).pow(2).flatten(1).sum(1).mean()
        self.update("ae", loss)
        # The step runs under the trainer's bf16 autocast; the running moments must stay fp32 (lerp_ needs
        # matching dtypes, and a bf16 covariance would round the sampler's Gaussian).
        with torch.no_grad(), torch.autocast(z.device.type, enabled=False):
            codes = z.detach().float()
            self.code_mean.lerp_(codes.mean(0), self.momentum)
            self.code_cov.lerp_(torch.cov(codes.T).reshape_as(self.code_cov), self.momentum)
        return {"recon": loss.detach()}

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        cov = self.code_cov + 1e-5 * torch.eye(len(self.code_cov), device=self.device)
        codes = torch.distributions.MultivariateNormal(self.code_mean, cov).sample((n,))
        return self.decode(codes)


class VAE(ScoredModel):
    """Variational autoencoder: ``ELBO(x) = E_q(z|x) log p(x|z) - KL(q(z|x) || N(0, I)) <= log p(x)``.

    ``likelihood``: ``bernoulli`` (binarised images, pixel logits) or ``gaussian`` (mean and log-std per
    coordinate; 8-bit images are dequantised first, as for the flows, so bits/dim are comparable).
    Reports ``neg_elbo`` (nats) and for images the ``bits_per_dim`` upper bound. ``encoder``
    (``x -> [mu, log_var]``, ``[B, 2 z]``) and ``decoder`` (``z -> [B, k * C, ...]``) may be given."""

    player = "vae"

    def __init__(self, shape: Sequence[int], z_dim: int = 16, width: int = 64, likelihood: str = "bernoulli",
                 lr: float = 1e-3, encoder: nn.Module | None = None, decoder: nn.Module | None = None):
        super().__init__()
        k = choose("likelihood", likelihood, {"bernoulli": 1, "gaussian": 2})  # decoder outputs per coordinate
        self.shape, self.z_dim, self.likelihood = tuple(shape), z_dim, likelihood
        self.images, self.dims = len(self.shape) == 3, math.prod(self.shape)
        if encoder is None or decoder is None:
            enc, dec = encoder_decoder(self.shape, z_dim, width, 2 * z_dim, k * self.shape[0] if self.images else k,
                                       "none")
            encoder, decoder = encoder if encoder is not None else enc, decoder if decoder is not None else dec
        self.encoder, self.decoder = encoder, decoder
        self.optimizers = {self.player: torch.optim.Adam(self.parameters(), lr=lr)}

    def prepare(self, x: Tensor) -> Tensor:
        """Data -> what is modelled: binarised, dequantised (8-bit images, gaussian) or as is (vectors)."""
        if self.likelihood == "bernoulli":
            return binarize(x)
        return dequantize(x) if self.images else x

    def decode(self, z: Tensor) -> torch.distributions.Distribution:
        """``p(x | z)`` with batch shape ``[B, *shape]``."""
        out = self.decoder(z).reshape(len(z), -1, *self.shape[1:]) if self.images else self.decoder(z)
        if self.likelihood == "bernoulli":
            return torch.distributions.Bernoulli(logits=out.reshape(len(z), *self.shape))
        mean, log_std = out.chunk(2, dim=1)
        return torch.distributions.Normal(mean, log_std.clamp(-7, 5).exp())

    def elbo(self, v: Tensor, samples: int = 1) -> Tensor:
        """ELBO ``[B]`` (nats) of prepared data ``v``, the reconstruction term averaged over ``samples`` draws."""
        mu, log_var = self.encoder(v).chunk(2, dim=1)
        kl = 0.5 * (mu.pow(2) + log_var.exp() - 1 - log_var).sum(1)
        eps = torch.randn(samples, *mu.shape, device=mu.device, dtype=mu.dtype)
        z = (mu + eps * (0.5 * log_var).exp()).flatten(0, 1)  # reparameterisation: gradients reach the encoder
        recon = sum_per_sample(self.decode(z).log_prob(v.repeat(samples, *[1] * (v.dim() - 1))))
        return recon.reshape(samples, -1).mean(0) - kl

    def report(self, neg_elbo: Tensor | float) -> dict[str, Tensor | float]:
        """The logged quantities for a mean ``neg_elbo``: itself, plus the bits/dim bound for images."""
        out = {"neg_elbo": neg_elbo}
        if self.likelihood == "bernoulli":
            out["bits_per_dim"] = discrete_bits_per_dim(-neg_elbo, self.dims)
        elif self.images:
            out["bits_per_dim"] = bits_per_dim(-neg_elbo, self.dims)
        return out

    def sample_losses(self, x: Tensor) -> Tensor:
        """The negative ELBO [B] of data ``x`` (prepared as in training; one draw of z per sample)."""
        return -self.elbo(self.prepare(x))

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """Images: the decoder's mean (pixel probabilities mapped to [-1, 1]); vectors: a draw of ``p(x | z)``."""
        px = self.decode(torch.randn(n, self.z_dim, device=self.device))
        if not self.images:
            return px.sample()
        return (2 * px.mean - 1) if self.likelihood == "bernoulli" else px.mean.clamp(-1, 1)


# ======================================================================================
# Builders for the CLI registry (``genlib.cli.FAMILIES``)
# ======================================================================================


def _is_image(spec: TrainSpec) -> bool:
    """Whether the spec's samples are images ``(C, H, W)``."""
    return len(spec.shape) == 3


def max_scales(shape: Sequence[int], cap: int = 5) -> int:
    """The most scales (at most ``cap``) a :class:`RealNVPImage` can have on ``shape``: 28 -> 3, 64 -> 5."""
    side, scales = min(shape[1:]), 1
    while scales < cap and side % 2 == 0 and side // 2 >= 4:
        side, scales = side // 2, scales + 1
    return scales


def build_realnvp(spec: TrainSpec) -> FlowModel:
    """RealNVP from a :class:`genlib.cli.TrainSpec`: vector flow for ``(dim,)``, multiscale for images.

    Options: vectors only: ``layers`` (couplings, 8); images only: ``scales`` (default the most possible, up to 5),
    ``blocks`` (residual blocks per conditioner, 2), ``alpha`` (the logit's squeeze, 1e-6); both: ``clip``
    (gradient norm, 100), ``decay_steps`` (cosine learning-rate decay, 0 = constant)."""
    if _is_image(spec):
        flow = RealNVPImage(spec.shape, spec.option("scales", max_scales(spec.shape)), spec.width,
                            spec.option("blocks", 2), spec.option("alpha", 1e-6))
    else:
        flow = RealNVP(spec.shape[0], spec.option("layers", 8), spec.width)
    return FlowModel(flow, spec.lr, spec.option("clip", 100.0), discrete=spec.data.dtype == torch.uint8,
                     decay_steps=spec.option("decay_steps", 0) or None)


def build_autoregressive(spec: TrainSpec) -> AutoregressiveModel:
    """MADE over binarised pixels (images) or Gaussian-mixture autoregression (vectors); option ``hidden``."""
    likelihood = "bernoulli" if _is_image(spec) else "gmm"
    return AutoregressiveModel(spec.shape, likelihood, spec.option("hidden", 256), lr=spec.lr)


def build_autoencoder(spec: TrainSpec) -> Autoencoder:
    """Autoencoder with ``z_dim`` codes and width ``width``; it takes no ``--opt`` keys."""
    return Autoencoder(spec.shape, spec.z_dim, spec.width, spec.lr)


def build_vae(spec: TrainSpec) -> VAE:
    """VAE; option ``likelihood`` (default ``bernoulli`` for images, ``gaussian`` for vectors)."""
    likelihood = spec.option("likelihood", "bernoulli" if _is_image(spec) else "gaussian")
    return VAE(spec.shape, spec.z_dim, spec.width, likelihood, spec.lr)
