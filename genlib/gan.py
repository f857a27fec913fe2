"""Chapter 2: the GAN objective, its Jensen-Shannon proof, mode collapse and seven remedies.

Three layers, from the blackboard to the GPU:

* **The objective on a grid** (densities tabulated on points ``x_i`` with cell size ``dx``):
  :func:`optimal_discriminator` ``D* = p / (p + q)``, :func:`gan_value_on_grid`
  ``V(D, G) = sum p log D + q log(1 - D) dx`` and :func:`js_divergence`, so that the notebook can
  check ``V(D*, G) = -log 4 + 2 JS(p || q)`` numerically (Goodfellow et al., 2014).
* **The losses on logits**: :func:`discriminator_bce` (the discriminator's loss *is* binary
  cross-entropy, real = 1, fake = 0), :func:`gan_value` (``= -discriminator_bce``),
  :func:`generator_loss` (``'minimax'`` or ``'non_saturating'``) and
  :func:`generator_logit_grad`, the closed-form gradient the notebook plots to show why the
  minimax generator loss saturates. Everything is computed from logits with ``logsigmoid``,
  never ``log(sigmoid(.))``, which underflows to ``-inf`` for confident discriminators.
* **Model families** (:class:`genlib.train.GenerativeModel`): :class:`GAN` holds the shared
  "discriminator step(s), then generator step" and hooks for the losses; each remedy against mode
  collapse overrides one or two hooks: :class:`UnrolledGAN`, :class:`DRAGAN`, :class:`EBGAN`,
  :class:`MADGAN`, :class:`MRGAN`, :class:`MinibatchDiscriminationGAN` and :class:`PacGAN`.
  Vectors (2-D toys) get MLPs, images ``[C, H, W]`` get DCGAN conv nets (``arch='auto'``).

:func:`compare_on_toy` trains several families on a 2-D mixture and reports
:func:`genlib.metrics.mode_coverage`; :func:`build_gan` is the ``python -m genlib train gan``
builder (one builder, the family chosen with ``--opt variant=...``). The energy chapter may reuse
:func:`gradient_penalty` and the losses here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from genlib import nets
from genlib.evaluate import coverage_runs
from genlib.metrics import check_counts
from genlib.results import summarize_coverage
from genlib.runtime import in_call_order
from genlib.train import GenerativeModel, SnapshotRecorder, at_least_fp32, update_batches
from genlib.train import snapshot_recorder as train_snapshots

__all__ = [
    "DRAGAN", "EBGAN", "GAN", "MADGAN", "MRGAN", "MinibatchDiscrimination", "MinibatchDiscriminationGAN",
    "MultiHeadGenerator", "PacGAN", "TOY_BATCH_SIZE", "TOY_METHOD_COST", "TOY_SETTINGS",
    "TOY_METHODS", "UnrolledGAN", "VARIANTS", "build_gan",
    "compare_on_toy", "discriminator_bce", "dragan_points", "gan_value", "gan_value_on_grid",
    "generator_logit_grad", "generator_loss", "gradient_penalty", "js_divergence", "make_adam",
    "optimal_discriminator", "pulling_away_term", "summarize", "toy_runs",
]

GENERATOR_LOSSES = ("minimax", "non_saturating")

# ----------------------------------------------------------------------------------------------
# The objective on a grid: optimal discriminator and the Jensen-Shannon divergence
# ----------------------------------------------------------------------------------------------


def optimal_discriminator(p: Tensor, q: Tensor) -> Tensor:
    """Elementwise ``D*(x) = p(x) / (p(x) + q(x))`` for data density ``p`` and generator density ``q``.

    Where both densities are 0 every value of D is optimal (it is multiplied by zero mass in V);
    we return 0.5, the "cannot tell" answer, instead of 0/0 = nan.
    """
    p, q = torch.as_tensor(p), torch.as_tensor(q)
    total = p + q
    safe_total = torch.where(total > 0, total, torch.ones_like(total))  # avoids 0/0 in the discarded branch
    return torch.where(total > 0, p / safe_total, torch.full_like(total, 0.5))


def gan_value_on_grid(p: Tensor, q: Tensor, d: Tensor, dx: float | Tensor) -> Tensor:
    """``V(D, G) = sum_i [p_i log D_i + q_i log(1 - D_i)] dx`` for densities and D tabulated on a grid.

    ``xlogy`` makes ``0 log 0 = 0``, so D* (which is 0 or 1 outside one support) gives a finite V.
    """
    p, q, d = torch.as_tensor(p), torch.as_tensor(q), torch.as_tensor(d)
    return ((torch.xlogy(p, d) + torch.xlogy(q, 1 - d)) * dx).sum()


def _kl_on_grid(p: Tensor, m: Tensor, dx: float | Tensor) -> Tensor:
    """``KL(p || m) = sum p log(p / m) dx`` for a mixture ``m`` that is positive wherever ``p`` is."""
    ratio = torch.where(m > 0, p / torch.where(m > 0, m, torch.ones_like(m)), torch.ones_like(m))
    return (torch.xlogy(p, ratio) * dx).sum()


def js_divergence(p: Tensor, q: Tensor, dx: float | Tensor) -> Tensor:
    """Jensen-Shannon divergence (natural log, in [0, log 2]) of densities tabulated on a grid.

    ``JS = KL(p || m) / 2 + KL(q || m) / 2`` with ``m = (p + q) / 2``; zeros are handled
    (``0 log 0 = 0``). ``dx`` is the cell size (a scalar, or a tensor broadcastable to ``p``).
    """
    p, q = torch.as_tensor(p), torch.as_tensor(q)
    m = (p + q) / 2
    return (_kl_on_grid(p, m, dx) + _kl_on_grid(q, m, dx)) / 2


# ----------------------------------------------------------------------------------------------
# Losses from logits
# ----------------------------------------------------------------------------------------------


def discriminator_bce(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Binary cross-entropy of D (reals labelled 1, fakes 0): ``-mean log D(x) - mean log(1 - D(G(z)))``.

    ``log D = logsigmoid(l)`` and ``log(1 - D) = logsigmoid(-l)`` for logit ``l``; this equals
    ``-V(D, G)`` estimated on the two batches, so minimising it is the discriminator's max over V.
    """
    return -F.logsigmoid(real_logits).mean() - F.logsigmoid(-fake_logits).mean()


def gan_value(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Minibatch estimate of ``V(D, G) = E_p log D(x) + E_q log(1 - D(x))`` from logits ([n] each)."""
    return -discriminator_bce(real_logits, fake_logits)


def generator_loss(fake_logits: Tensor, kind: str = "non_saturating") -> Tensor:
    """Generator loss on D's logits for fakes [n]: ``'minimax'`` = mean log(1 - D(G(z))) (the game's own
    term, saturates when D rejects fakes) or ``'non_saturating'`` = -mean log D(G(z)) (Goodfellow's fix)."""
    if kind == "minimax":
        return F.logsigmoid(-fake_logits).mean()
    if kind == "non_saturating":
        return -F.logsigmoid(fake_logits).mean()
    raise ValueError(f"generator loss must be one of {GENERATOR_LOSSES}, got {kind!r}")


def generator_logit_grad(d_fake: Tensor, kind: str = "non_saturating") -> Tensor:
    """Closed-form d(per-sample generator loss)/d(logit) as a function of ``D = D(G(z))`` in (0, 1).

    minimax: ``d log(1 - sigmoid(l)) / dl = -D`` -> 0 as D -> 0, so a generator the discriminator
    confidently rejects gets no signal; non-saturating: ``d(-log sigmoid(l)) / dl = -(1 - D)`` -> -1.
    (With respect to D itself the two are ``-1/(1 - D)`` and ``-1/D``; the logit is what backpropagates.)
    """
    d = torch.as_tensor(d_fake)
    if kind == "minimax":
        return -d
    if kind == "non_saturating":
        return -(1 - d)
    raise ValueError(f"generator loss must be one of {GENERATOR_LOSSES}, got {kind!r}")


def input_gradients(critic: Callable[[Tensor], Tensor], points: Tensor) -> Tensor:
    """``grad_x critic(x)`` [n, ...] at ``points`` [n, ...], kept in the graph (create_graph) so a penalty can be
    trained.

    Summing the outputs over the batch gives each sample's own gradient only if each output
    depends on its own input alone: no BatchNorm in the critic.
    """
    points = points.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(points).sum(), points, create_graph=True)
    return grad


def gradient_penalty(critic: Callable[[Tensor], Tensor], points: Tensor, target: float = 1.0) -> Tensor:
    """``mean_i (||grad_x critic(x_i)|| - target)^2`` at ``points`` [n, ...]; differentiable.

    ``target=1`` is the WGAN-GP / DRAGAN penalty; ``target=0`` gives ``mean ||grad||^2`` (R1 on reals).
    """
    squares = input_gradients(critic, points).flatten(1).pow(2).sum(1)
    if not target:
        return squares.mean()
    # sqrt's infinite slope at 0 times autograd's zero gives NaN weights where grad U = 0 exactly (a ReLU critic's
    # dead regions); the clamp keeps every value >= tiny unchanged and passes zero gradient below it.
    return (squares.clamp_min(torch.finfo(squares.dtype).tiny).sqrt() - target).pow(2).mean()


def check_dragan_noise(noise: str) -> None:
    """A ValueError unless ``noise`` is one of :func:`dragan_points`' perturbations (checking draws no random numbers,
    so a model's constructor can check it without moving the seeded stream)."""
    if noise not in ("uniform", "gaussian"):
        raise ValueError(f"noise must be 'uniform' or 'gaussian', got {noise!r}")


def dragan_points(real: Tensor, scale: float = 0.5, noise: str = "uniform") -> Tensor:
    """DRAGAN's penalty points [n, ...] near the real batch ``real`` [n, ...], with ``sigma = scale * std(real)``.

    ``noise="uniform"`` is the authors' reference code (Kodali et al., 2017, github.com/kodalinaveen3/DRAGAN):
    ``x + alpha * sigma * u``, ``u ~ U[0, 1)`` per element (one-sided: every point moves up in every coordinate),
    ``alpha ~ U[0, 1]`` per sample, a random point on the segment to the perturbed point. ``noise="gaussian"`` is
    the paper's text, ``x + delta`` with ``delta ~ N(0, c I)``, symmetric around the data; ``c = sigma^2`` keeps
    the reference code's scale. ``std`` is over all elements of the batch.
    """
    check_dragan_noise(noise)
    sigma = scale * real.std()
    if noise == "gaussian":
        return real + sigma * torch.randn_like(real)
    delta = sigma * torch.rand_like(real)  # drawn before alpha, as the recorded runs did
    alpha = torch.rand(real.shape[0], *([1] * (real.dim() - 1)), device=real.device, dtype=real.dtype)
    return real + alpha * delta


def pulling_away_term(codes: Tensor) -> Tensor:
    """EBGAN's pulling-away term on codes [n, c]: mean over i != j of cos^2(code_i, code_j) (needs n >= 2).

    Small when a batch's codes are mutually orthogonal, i.e. the generator's samples differ. A batch of
    one has no pair, so it raises ValueError (rather than returning 0 / 0 = nan).
    """
    if codes.dim() < 2 or codes.shape[0] < 2:
        raise ValueError(f"the pulling-away term needs codes [n, c] with n >= 2 (pairs i != j), "
                         f"got shape {tuple(codes.shape)}")
    s = F.normalize(at_least_fp32(codes.flatten(1)), dim=1)
    n = s.shape[0]
    with torch.autocast(s.device.type, enabled=False):  # an n x n product: fp32 costs nothing here
        cos2 = (s @ s.T).pow(2)
    return (cos2.sum() - cos2.diagonal().sum()) / (n * (n - 1))


def reconstruction_energy(recon: Tensor, x: Tensor) -> Tensor:
    """Per-sample autoencoder energy [n]: mean squared reconstruction error over each sample's elements."""
    return (recon - x).pow(2).flatten(1).mean(1)


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------


class Reshape(nn.Module):
    """Reshape [n, prod(shape)] to ``[n, *shape]``."""

    def __init__(self, shape: Sequence[int]):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.shape)


def _numel(shape: Sequence[int]) -> int:
    """Number of elements of one sample of ``shape``."""
    return math.prod(shape)


def _use_conv(arch: str, shape: Sequence[int]) -> bool:
    """``arch`` 'auto' -> conv nets for images [C, H, W], MLPs for vectors; or force 'mlp' / 'conv'."""
    if arch not in ("auto", "mlp", "conv"):
        raise ValueError(f"arch must be 'auto', 'mlp' or 'conv', got {arch!r}")
    if arch == "conv" and len(shape) != 3:
        raise ValueError(f"arch='conv' needs image samples [C, H, W], got shape {tuple(shape)}")
    return arch == "conv" or (arch == "auto" and len(shape) == 3)


def make_generator(z_dim: int, shape: Sequence[int], width: int, depth: int, conv: bool, act: str = "relu",
                   batchnorm: bool = False) -> nn.Module:
    """Generator z [n, z_dim] -> x ``[n, *shape]``: a DCGAN ConvGenerator for images (always BatchNorm), else an
    MLP with a linear output (BatchNorm after each hidden layer if ``batchnorm``)."""
    if conv:
        channels, resolution = shape[0], shape[-1]
        return nets.ConvGenerator(z_dim, resolution, channels, width)
    mlp = nets.MLP(z_dim, _numel(shape), width, depth, act, "batch" if batchnorm else "none")
    return mlp if len(shape) == 1 else nn.Sequential(mlp, Reshape(shape))


def make_discriminator(shape: Sequence[int], out_dim: int, width: int, depth: int, conv: bool,
                       norm: str = "batch", act: str = "leaky_relu", pack: int = 1) -> nn.Module:
    """Discriminator x ``[n, pack * C, H, W]`` (or ``[n, pack * d]``) -> [n, out_dim] raw scores (logits)."""
    if conv:
        channels, resolution = shape[0], shape[-1]
        return nets.ConvEncoder(out_dim, resolution, channels * pack, width, norm)
    return nn.Sequential(nn.Flatten(), nets.MLP(_numel(shape) * pack, out_dim, width, depth, act))


class MinibatchDiscrimination(nn.Module):
    """Salimans et al. (2016) minibatch discrimination: features f [n, A] -> [n, A + B].

    ``M_i = f_i T`` reshaped to [B, C]; ``o(x_i)_b = sum_{j != i} exp(-||M_{i,b} - M_{j,b}||_1)``
    (self excluded, as in the improved-gan code). A batch of near-identical samples gives ``o``
    close to ``n - 1``, a diverse one close to 0, so D can see a collapsed batch.
    """

    def __init__(self, in_features: int, kernels: int = 16, kernel_dim: int = 8, init_std: float = 0.1):
        super().__init__()
        self.kernels, self.kernel_dim = kernels, kernel_dim
        self.T = nn.Parameter(init_std * torch.randn(in_features, kernels * kernel_dim))

    def forward(self, f: Tensor) -> Tensor:
        m = (f @ self.T).reshape(f.shape[0], self.kernels, self.kernel_dim).transpose(0, 1)  # [B, n, C]
        closeness = torch.exp(-torch.cdist(m, m, p=1)).sum(-1) - 1.0  # [B, n]; the -1 removes j = i
        return torch.cat([f, closeness.T], dim=1)


class MultiHeadGenerator(nn.Module):
    """MAD-GAN's k generators sharing a trunk: z [n, z_dim], heads [n] in 0..k-1 -> x ``[n, *shape]``."""

    def __init__(self, trunk: nn.Module, heads: Sequence[nn.Module]):
        super().__init__()
        self.trunk, self.heads = trunk, nn.ModuleList(heads)

    @property
    def k(self) -> int:
        """Number of generators."""
        return len(self.heads)

    def forward(self, z: Tensor, heads: Tensor | None = None) -> Tensor:
        """Each row through the shared trunk and then its own head (random heads when None)."""
        if heads is None:
            heads = torch.randint(self.k, (z.shape[0],), device=z.device)
        h = self.trunk(z)
        out: Tensor | None = None
        for i, head in enumerate(self.heads):
            rows = (heads == i).nonzero().squeeze(1)
            if len(rows) == 0:
                continue
            y = head(h[rows])
            out = h.new_zeros(z.shape[0], *y.shape[1:]) if out is None else out
            out = out.index_copy(0, rows, y)  # out-of-place keeps autograd simple
        assert out is not None, "empty batch"
        return out


def make_multihead_generator(k: int, z_dim: int, shape: Sequence[int], width: int, depth: int, conv: bool,
                             act: str = "relu", batchnorm: bool = False) -> MultiHeadGenerator:
    """k generators that share early layers: MLP trunk + k two-layer heads, or a DCGAN body + k output convs."""
    if conv:
        body = list(make_generator(z_dim, shape, width, depth, True).net)
        last_conv = max(i for i, layer in enumerate(body) if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)))
        trunk = nn.Sequential(Reshape((z_dim, 1, 1)), *body[:last_conv])
        heads = [make_generator(z_dim, shape, width, depth, True).net[last_conv:] for _ in range(k)]
        return MultiHeadGenerator(trunk, heads)
    norm = "batch" if batchnorm else "none"
    trunk = nets.MLP(z_dim, width, width, max(depth - 2, 0), act, norm)
    trunk = nn.Sequential(trunk, *([nets.make_norm(norm, width, image=False)] if batchnorm else []),
                          nets.activation(act))
    heads = [make_generator(width, shape, width, 1, False, act, batchnorm) for _ in range(k)]
    return MultiHeadGenerator(trunk, heads)


# ----------------------------------------------------------------------------------------------
# The model families
# ----------------------------------------------------------------------------------------------


def make_adam(params: list[nn.Parameter], lr: float, betas: tuple[float, float]) -> torch.optim.Adam:
    """Adam, fused where this torch supports it (CPU and CUDA since torch 2.4; ~15% faster on tiny nets)."""
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)
    except RuntimeError:  # older torch: fused Adam is CUDA-only
        return torch.optim.Adam(params, lr=lr, betas=betas)


class GAN(GenerativeModel):
    """Vanilla GAN (Goodfellow et al., 2014): ``d_steps`` discriminator steps, then one generator step.

    Subclasses change the game through hooks: :meth:`build_discriminator`, :meth:`logits`,
    :meth:`d_losses` (must return ``loss_d``), :meth:`g_losses` (must return ``loss_g``),
    :meth:`generate` and :meth:`g_modules`. Each discriminator step takes fresh fakes and, with ``fresh_reals``
    (the default), its own real batch: the loop draws ``d_steps`` batches per step, as WGAN-GP's loop draws one per
    critic iteration (``fresh_reals=False`` reuses one). Adam for both players.

    The defaults are the 2-D toy setting measured to work within a few CPU-seconds (see
    :data:`TOY_METHODS`): 3-hidden-layer MLPs of width 64, BatchNorm in the generator (as in
    PacGAN's toy generator; it speeds up the spreading of mass early on), z 16, Adam 2e-3 with
    beta1 0.5 for both players, batch 128, and (in :func:`compare_on_toy`) a linear decay of the
    learning rates to 5 % over the run. The published toy settings (lr 1e-4 to 1e-3) need 10-100x
    more steps. For images use DCGAN's Adam 2e-4 (what :func:`build_gan` passes from the CLI).
    """

    conv_norm = "batch"  # DCGAN discriminators use BatchNorm; penalties and unrolling override it
    capturable_step = True  # no host reads in the game itself; a variant that has them says so

    def __init__(self, shape: Sequence[int] = (2,), z_dim: int = 16, width: int = 64, depth: int = 3,
                 lr_d: float = 2e-3, lr_g: float = 2e-3, beta1: float = 0.5, beta2: float = 0.999,
                 loss: str = "non_saturating", d_steps: int = 1, arch: str = "auto", g_act: str = "relu",
                 d_act: str = "leaky_relu", g_batchnorm: bool = True, lr_decay_steps: int = 0,
                 lr_final: float = 0.05, fresh_reals: bool = True):
        super().__init__()
        if loss not in GENERATOR_LOSSES:
            raise ValueError(f"loss must be one of {GENERATOR_LOSSES}, got {loss!r}")
        if d_steps < 1:
            raise ValueError(f"d_steps must be >= 1, got {d_steps}")
        check_counts(1, depth=depth)
        if lr_decay_steps < 0 or not 0 <= lr_final <= 1:
            raise ValueError(f"lr_decay_steps must be >= 0 (0: no decay) and lr_final a fraction in [0, 1], got "
                             f"{lr_decay_steps} and {lr_final}")
        self.shape, self.z_dim, self.width, self.depth = tuple(shape), z_dim, width, depth
        self.conv, self.loss, self.d_steps = _use_conv(arch, shape), loss, d_steps
        self.batches_per_step = d_steps if fresh_reals else 1  # fit draws a real batch per D update
        self.g_act, self.d_act, self.g_batchnorm = g_act, d_act, g_batchnorm
        self.generator = self.build_generator()
        self.discriminator = self.build_discriminator()
        betas = (beta1, beta2)
        self.optimizers = {
            "d": make_adam(list(self.discriminator.parameters()), lr_d, betas),
            "g": make_adam([p for m in self.g_modules() for p in m.parameters()], lr_g, betas),
        }
        self.base_lr = {"d": lr_d, "g": lr_g}
        self.lr_decay_steps, self.lr_final = lr_decay_steps, lr_final
        # A buffer, so checkpoints carry the schedule's position and resume it exactly.
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @property
    def graph_safe(self) -> bool:
        """A CUDA graph can replay the step unless the variant reads device values on the host or the learning
        rates follow a schedule (set from Python each step)."""
        return self.capturable_step and self.lr_decay_steps <= 0

    # -- networks -------------------------------------------------------------------------------
    def build_generator(self) -> nn.Module:
        """The generator network z [n, z_dim] -> ``[n, *shape]``."""
        return make_generator(self.z_dim, self.shape, self.width, self.depth, self.conv, self.g_act, self.g_batchnorm)

    def build_discriminator(self) -> nn.Module:
        """The discriminator network ``[n, *shape]`` -> [n, 1] logits."""
        return make_discriminator(self.shape, 1, self.width, self.depth, self.conv, self.conv_norm, self.d_act)

    def g_modules(self) -> list[nn.Module]:
        """Modules the generator's optimiser trains."""
        return [self.generator]

    # -- the game -------------------------------------------------------------------------------
    def noise(self, n: int) -> Tensor:
        """Latent codes z ~ N(0, I) [n, z_dim] on the model's device."""
        return torch.randn(n, self.z_dim, device=self.device)

    def generate(self, n: int) -> Tensor:
        """n fakes ``[n, *shape]`` from the live generator (with gradients unless under no_grad)."""
        return self.generator(self.noise(n))

    def logits(self, x: Tensor) -> Tensor:
        """Discriminator logits [n] for samples x ``[n, *shape]``, in fp32 (under bf16 autocast too, so the losses
        and their logged values keep fp32's precision)."""
        return at_least_fp32(self.discriminator(x).squeeze(-1))

    def d_losses(self, real: Tensor, fake: Tensor) -> dict[str, Tensor]:
        """Discriminator losses on a real and a (detached) fake batch; ``loss_d`` is minimised."""
        return {"loss_d": discriminator_bce(self.logits(real), self.logits(fake))}

    def g_losses(self, real: Tensor) -> dict[str, Tensor]:
        """Generator losses for a fresh fake batch the size of ``real``; ``loss_g`` is minimised."""
        return {"loss_g": generator_loss(self.logits(self.generate(len(real))), self.loss)}

    def schedule_lr(self) -> None:
        """Linear decay of both learning rates to ``lr_final`` times their start over ``lr_decay_steps`` steps.

        Short CPU runs end far sharper when the step size shrinks at the end; 0 keeps it constant.
        """
        if self.lr_decay_steps <= 0:
            return
        fraction = max(self.lr_final, 1.0 - (1.0 - self.lr_final) * int(self.updates) / self.lr_decay_steps)
        for player, optimizer in self.optimizers.items():
            for group in optimizer.param_groups:
                group["lr"] = self.base_lr[player] * fraction

    def step(self, x: Tensor, index: Tensor) -> dict[str, Tensor]:
        """``d_steps`` discriminator updates, each on fresh fakes and (with ``fresh_reals``, the default) its own
        batch of the ``batches_per_step`` that ``x`` joins, then one generator update with the last batch."""
        self.schedule_lr()
        self.updates += 1
        for real in update_batches(x, self.batches_per_step, self.d_steps):
            with torch.no_grad():
                fake = self.generate(len(real))
            d_losses = self.d_losses(real, fake)
            self.update("d", d_losses["loss_d"])
        g_losses = self.g_losses(real)
        self.update("g", g_losses["loss_g"])
        return {**d_losses, **g_losses}

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """n samples ``[n, *shape]`` from the EMA generator when kept, else the live one."""
        return self.sampling_net()(self.noise(n))

    def ema_source(self) -> nn.Module:
        """The generator (averaged by the loop's EMA on CUDA)."""
        return self.generator


class UnrolledGAN(GAN):
    """Unrolled GAN (Metz et al., 2017): the generator plays against D after ``unroll`` more D steps.

    D itself takes ordinary steps. For the generator's loss we copy D's parameters and Adam state,
    apply ``unroll`` differentiable Adam steps (the same update rule as ``torch.optim.Adam`` without
    weight decay, run with :func:`torch.func.functional_call` on the same real and fake batch) and
    evaluate the fakes with the unrolled D. With ``second_order=True`` (the paper's method)
    the generator's gradient flows through the unrolled updates, so G anticipates how D will react;
    ``second_order=False`` is the cheaper stop-gradient variant (G only sees the looked-ahead D).
    Reference toy setting: 5 unroll steps, D lr 1e-4, G lr 1e-3, beta1 0.5, 2x128 tanh MLPs (pass
    ``g_act='tanh', d_act='tanh'``); the defaults here are the shared toy nets, so that the comparison
    differs only in the unrolling (with tanh nets, 1000 steps at lr 2e-3, it covered 4 of 8 ring modes
    on each of 3 seeds; with the shared nets 7 of 8 on seed 0). Cost: about 6x to 8x the CPU time of a GAN run
    for unroll 5 (chapter 2's recorded tables).
    """

    conv_norm = "layer"  # functional_call would otherwise update BatchNorm statistics while unrolling

    capturable_step = False  # the unrolled Adam steps read D's step count on the host

    def __init__(self, unroll: int = 5, second_order: bool = True, **kw: Any):
        self.unroll, self.second_order = unroll, second_order
        super().__init__(**kw)

    def unrolled_parameters(self, real: Tensor, fake: Tensor) -> dict[str, Tensor]:
        """D's parameters after ``unroll`` differentiable Adam steps on the batch (real, fake)."""
        optimizer = self.optimizers["d"]
        group = optimizer.param_groups[0]
        (beta1, beta2), lr, eps = group["betas"], group["lr"], group["eps"]
        names, params = zip(*self.discriminator.named_parameters())
        states = [optimizer.state.get(p, {}) for p in params]
        avg = [s["exp_avg"] if s else torch.zeros_like(p) for s, p in zip(states, params)]
        avg_sq = [s["exp_avg_sq"] if s else torch.zeros_like(p) for s, p in zip(states, params)]
        t0 = int(states[0]["step"]) if states[0] else 0
        current = [p if self.second_order else p.detach().requires_grad_(True) for p in params]
        fake = fake if self.second_order else fake.detach()
        for t in range(t0 + 1, t0 + self.unroll + 1):
            weights = dict(zip(names, current))
            loss = discriminator_bce(functional_call(self.discriminator, weights, (real,)).squeeze(-1),
                                     functional_call(self.discriminator, weights, (fake,)).squeeze(-1))
            grads = torch.autograd.grad(loss, current, create_graph=self.second_order)
            avg = [beta1 * m + (1 - beta1) * g for m, g in zip(avg, grads)]
            avg_sq = [beta2 * v + (1 - beta2) * g * g for v, g in zip(avg_sq, grads)]
            # sqrt(v + eps^2) instead of sqrt(v) + eps: same step, but a finite derivative where v = 0.
            current = [p - lr * (m / (1 - beta1**t)) / (v / (1 - beta2**t) + eps**2).sqrt()
                       for p, m, v in zip(current, avg, avg_sq)]
            if not self.second_order:
                current = [p.detach().requires_grad_(True) for p in current]
        return dict(zip(names, current))

    def g_losses(self, real: Tensor) -> dict[str, Tensor]:
        """Generator loss against the unrolled discriminator."""
        fake = self.generate(len(real))
        weights = self.unrolled_parameters(real, fake)
        logits = at_least_fp32(functional_call(self.discriminator, weights, (fake,)).squeeze(-1))
        return {"loss_g": generator_loss(logits, self.loss)}


class DRAGAN(GAN):
    """DRAGAN (Kodali et al., 2017): ``lambda * mean(||grad logit(x_hat)|| - 1)^2`` at points near the data (the
    gradient of D's logit; the paper writes D).

    ``x_hat`` from :func:`dragan_points` (``noise``: the reference code's one-sided uniform perturbation on a
    segment by default, or the paper's Gaussian ``x + delta``); lambda 10 as in the paper. The paper's aim: keep D
    smooth around real data, against the sharp gradients it blames for mode collapse (on chapter 2's ring it did not
    prevent one).
    """

    conv_norm = "layer"  # a per-sample gradient penalty needs per-sample outputs (no BatchNorm)

    def __init__(self, penalty: float = 10.0, perturbation: float = 0.5, noise: str = "uniform", **kw: Any):
        check_dragan_noise(noise)  # here, not at the first step
        self.penalty, self.perturbation, self.perturbation_noise = penalty, perturbation, noise
        super().__init__(**kw)

    def d_losses(self, real: Tensor, fake: Tensor) -> dict[str, Tensor]:
        """BCE plus the DRAGAN gradient penalty (reported as ``penalty``)."""
        bce = discriminator_bce(self.logits(real), self.logits(fake))
        penalty = gradient_penalty(self.logits, dragan_points(real, self.perturbation, self.perturbation_noise),
                                   target=1.0)
        return {"loss_d": bce + self.penalty * penalty, "penalty": penalty.detach()}


class AutoEncoder(nn.Module):
    """EBGAN's discriminator: x ``[n, *shape]`` -> (reconstruction ``[n, *shape]``, code [n, code_dim])."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        code = self.encoder(x)
        return self.decoder(code), code


class EBGAN(GAN):
    """Energy-based GAN (Zhao et al., 2017): D is an autoencoder with energy ``D(x) = mse(AE(x), x)``.

    ``L_D = D(x) + max(0, margin - D(G(z)))``, ``L_G = D(G(z)) + pt_weight * PT`` where PT is the
    pulling-away term on the encoder's codes of the fakes (0 disables it; the paper uses 0.1).
    Energies are per-sample mean squared errors, so ``margin`` is in squared data units.
    """

    conv_norm = "batch"

    def __init__(self, margin: float = 1.0, pt_weight: float = 0.1, code_dim: int = 32, **kw: Any):
        self.margin, self.pt_weight, self.code_dim = margin, pt_weight, code_dim
        super().__init__(**kw)

    def build_discriminator(self) -> nn.Module:
        """Autoencoder: encoder ``[n, *shape]`` -> [n, code_dim], decoder back to ``[n, *shape]``."""
        if self.conv:
            channels, resolution = self.shape[0], self.shape[-1]
            encoder = nets.ConvEncoder(self.code_dim, resolution, channels, self.width, self.conv_norm)
        else:
            encoder = make_discriminator(self.shape, self.code_dim, self.width, self.depth - 1, False, act=self.d_act)
        decoder = make_generator(self.code_dim, self.shape, self.width, self.depth - 1, self.conv, self.d_act)
        return AutoEncoder(encoder, decoder)

    def energy(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(energy [n], code [n, code_dim]) of samples x, in fp32."""
        recon, code = self.discriminator(x)
        return reconstruction_energy(at_least_fp32(recon), at_least_fp32(x)), at_least_fp32(code)

    def d_losses(self, real: Tensor, fake: Tensor) -> dict[str, Tensor]:
        """Low energy on reals, energy at least ``margin`` on fakes (hinge)."""
        e_real, e_fake = self.energy(real)[0], self.energy(fake)[0]
        return {"loss_d": e_real.mean() + F.relu(self.margin - e_fake).mean(), "energy_real": e_real.mean().detach()}

    def g_losses(self, real: Tensor) -> dict[str, Tensor]:
        """Fakes' energy plus the pulling-away term."""
        e_fake, code = self.energy(self.generate(len(real)))
        pt = pulling_away_term(code)
        return {"loss_g": e_fake.mean() + self.pt_weight * pt, "pt": pt.detach()}


class MADGAN(GAN):
    """MAD-GAN (Ghosh et al., 2018): ``k`` generators sharing early layers and a (k+1)-way discriminator.

    D learns class ``k`` for reals and class ``i`` for generator i's samples (softmax
    cross-entropy), so each generator is pushed towards a region the others do not cover;
    generator i minimises ``-log D_real(G_i(z))``. A batch's fakes come from the generators in turn
    (row r from generator ``r mod k``). Sampling picks a generator uniformly per sample.
    The cosine-similarity variant (MAD-GAN-Sim) is not implemented.
    """

    capturable_step = False  # its generator routes rows to their heads with nonzero (a data-dependent shape)

    def __init__(self, k: int = 4, **kw: Any):
        if k < 2:
            raise ValueError(f"MAD-GAN needs k >= 2 generators, got {k}")
        self.k = k
        super().__init__(**kw)

    def build_generator(self) -> nn.Module:
        """Shared trunk with k heads."""
        return make_multihead_generator(self.k, self.z_dim, self.shape, self.width, self.depth, self.conv, self.g_act,
                                        self.g_batchnorm)

    def build_discriminator(self) -> nn.Module:
        """(k+1)-way classifier: logits [n, k+1], the last class is 'real'."""
        return make_discriminator(self.shape, self.k + 1, self.width, self.depth, self.conv, self.conv_norm, self.d_act)

    def logits(self, x: Tensor) -> Tensor:
        """All k+1 class logits [n, k+1], in fp32."""
        return at_least_fp32(self.discriminator(x))

    def heads(self, n: int) -> Tensor:
        """Which generator makes each of n training fakes: [0, 1, ..., k-1, 0, 1, ...]."""
        return torch.arange(n, device=self.device) % self.k

    def generate(self, n: int) -> Tensor:
        """n fakes, row r from generator r mod k."""
        return self.generator(self.noise(n), self.heads(n))

    def real_class(self, n: int) -> Tensor:
        """Labels [n] of the 'real' class, k."""
        return torch.full((n,), self.k, device=self.device)

    def d_losses(self, real: Tensor, fake: Tensor) -> dict[str, Tensor]:
        """Cross-entropy: reals -> class k, generator i's fakes -> class i."""
        real_loss = F.cross_entropy(self.logits(real), self.real_class(len(real)))
        return {"loss_d": real_loss + F.cross_entropy(self.logits(fake), self.heads(len(fake)))}

    def g_losses(self, real: Tensor) -> dict[str, Tensor]:
        """Every generator pushes its samples towards the 'real' class."""
        fake = self.generate(len(real))
        return {"loss_g": F.cross_entropy(self.logits(fake), self.real_class(len(fake)))}


class MRGAN(GAN):
    """Mode-regularised GAN (Che et al., 2017), the regularised (not manifold-diffusion) version.

    An encoder E maps data to codes; the generator (with E, one optimiser) minimises
    ``L_G + lambda_rec * ||x - G(E(x))||^2 + lambda_mode * (-log D(G(E(x))))``.
    The reconstruction term forces G to reach every real x, i.e. every mode, and the mode term
    asks those reconstructions to look real. The paper prints the mode term as ``+lambda_2 log
    D(G(E(x)))`` inside ``T_G``; with D = P(real) minimising that would make reconstructions look
    fake, so we use the non-saturating form that rewards them for looking real. D is the vanilla
    discriminator on reals vs G(z). ``||.||^2`` is summed over a sample's elements, averaged over the batch.
    """

    def __init__(self, lambda_rec: float = 0.2, lambda_mode: float = 0.4, **kw: Any):
        self.lambda_rec, self.lambda_mode = lambda_rec, lambda_mode
        super().__init__(**kw)

    def build_generator(self) -> nn.Module:
        """The generator, with the encoder E built beside it (trained by the generator's optimiser)."""
        if self.conv:
            channels, resolution = self.shape[0], self.shape[-1]
            self.encoder = nets.ConvEncoder(self.z_dim, resolution, channels, self.width, "batch")
        else:
            self.encoder = make_discriminator(self.shape, self.z_dim, self.width, self.depth, False, act=self.d_act)
        return super().build_generator()

    def g_modules(self) -> list[nn.Module]:
        """Generator and encoder."""
        return [self.generator, self.encoder]

    def g_losses(self, real: Tensor) -> dict[str, Tensor]:
        """GAN loss + reconstruction + mode regulariser."""
        adversarial = generator_loss(self.logits(self.generate(len(real))), self.loss)
        recon = self.generator(self.encoder(real))
        rec = (recon - real).pow(2).flatten(1).sum(1).mean()
        mode = generator_loss(self.logits(recon), "non_saturating")
        return {"loss_g": adversarial + self.lambda_rec * rec + self.lambda_mode * mode, "recon": rec.detach()}


class MinibatchDiscriminationGAN(GAN):
    """GAN whose discriminator ends with a :class:`MinibatchDiscrimination` layer (Salimans et al., 2016).

    D sees whole batches of reals or of fakes (never mixed), so the closeness features tell a
    collapsed fake batch from a diverse real one. Cost grows as batch^2 * kernels * kernel_dim;
    the defaults (8 kernels of dimension 4; improved-gan used 100 x 5) keep toys cheap on a CPU.
    """

    def __init__(self, kernels: int = 8, kernel_dim: int = 4, features: int = 64, **kw: Any):
        self.kernels, self.kernel_dim, self.features = kernels, kernel_dim, features
        super().__init__(**kw)

    def build_discriminator(self) -> nn.Module:
        """Features -> minibatch layer -> linear logit."""
        body = make_discriminator(self.shape, self.features, self.width, self.depth - 1, self.conv, self.conv_norm,
                                  self.d_act)
        return nn.Sequential(body, nets.activation("leaky_relu"),
                             MinibatchDiscrimination(self.features, self.kernels, self.kernel_dim),
                             nn.Linear(self.features + self.kernels, 1))


class PacGAN(GAN):
    """PacGAN (Lin et al., 2018): D judges ``pack`` samples at once, concatenated (features or channels).

    Packs are made of reals only or of fakes only; a collapsed generator yields packs of
    look-alikes that D can reject. A batch is truncated to a multiple of ``pack``.
    """

    def __init__(self, pack: int = 4, **kw: Any):
        if pack < 1:
            raise ValueError(f"pack must be >= 1, got {pack}")
        self.pack = pack
        super().__init__(**kw)

    def build_discriminator(self) -> nn.Module:
        """Discriminator on ``pack`` concatenated samples."""
        return make_discriminator(self.shape, 1, self.width, self.depth, self.conv, self.conv_norm, self.d_act,
                                  self.pack)

    def logits(self, x: Tensor) -> Tensor:
        """Logits [n // pack] of consecutive packs of x ``[n, *shape]``, in fp32."""
        groups = x.shape[0] // self.pack
        if groups == 0:
            raise ValueError(f"a batch of {x.shape[0]} cannot make one pack of {self.pack}")
        packed = x[: groups * self.pack].reshape(groups, self.pack * x.shape[1], *x.shape[2:])
        return at_least_fp32(self.discriminator(packed).squeeze(-1))


VARIANTS: dict[str, type[GAN]] = {
    "gan": GAN, "unrolled": UnrolledGAN, "dragan": DRAGAN, "ebgan": EBGAN, "madgan": MADGAN, "mrgan": MRGAN,
    "minibatch": MinibatchDiscriminationGAN, "pacgan": PacGAN,
}

# ----------------------------------------------------------------------------------------------
# The toy comparison
# ----------------------------------------------------------------------------------------------

# The toy comparison's batch size; the per-method settings below sit on top of GAN's toy defaults.
TOY_BATCH_SIZE = 128
_UNROLLED_NOTEBOOK_NETS: dict[str, Any] = {"z_dim": 256, "width": 128, "depth": 2, "beta1": 0.5,
                                           "g_batchnorm": False, "lr_decay_steps": 0}
TOY_SETTINGS: dict[str, tuple[int, dict[str, Any]]] = {
    "tuned": (TOY_BATCH_SIZE, {}),
    "tuned-no-decay": (TOY_BATCH_SIZE, {"lr_decay_steps": 0}),
    "tuned-narrow": (TOY_BATCH_SIZE, {"width": 32, "depth": 2}),
    "collapse": (512, _UNROLLED_NOTEBOOK_NETS | {"lr_d": 1e-4, "lr_g": 1e-3, "g_act": "relu", "d_act": "relu"}),
    "unrolled-notebook": (512, _UNROLLED_NOTEBOOK_NETS | {"lr_d": 1e-4, "lr_g": 1e-3, "g_act": "tanh",
                                                         "d_act": "tanh"}),
}
"""Chapter 2's toy settings by name: (batch size, constructor overrides on top of GAN's defaults).

``tuned``: genlib's toy defaults (3 x 64 MLPs, BatchNorm in G, Adam 2e-3, linear decay), kind to the vanilla GAN;
``tuned-no-decay`` turns the learning-rate decay off; ``tuned-narrow`` makes the nets smaller (2 x 32 MLPs, not 3 x 64).
``unrolled-notebook``: the unrolled-GAN authors' toy notebook (Metz et al., 2017): 2 x 128 tanh MLPs, z 256,
batch 512, Adam with beta1 0.5, D 1e-4 and G 1e-3, no BatchNorm, no decay. ``collapse``: the same setting with
ReLU units instead of tanh, a variation in which our vanilla GAN collapses onto 0-1 ring modes."""
TOY_METHODS: dict[str, tuple[type[GAN], dict[str, Any]]] = {
    "GAN": (GAN, {}),
    "GAN (minimax)": (GAN, {"loss": "minimax"}),
    "Unrolled": (UnrolledGAN, {"unroll": 5}),  # the paper's method; about 6x to 8x the cost of a GAN run
    "DRAGAN": (DRAGAN, {"penalty": 1.0}),  # lambda 1: chapter 2 measures the paper's 10 and its Gaussian noise
    "EBGAN": (EBGAN, {}),
    "MAD-GAN": (MADGAN, {"k": 4}),
    "MRGAN": (MRGAN, {}),
    "Minibatch": (MinibatchDiscriminationGAN, {}),
    "PacGAN": (PacGAN, {"pack": 2}),  # pack 4 kept 7-8 ring modes but only ~1.5 % hq after 1000 steps
}


TOY_METHOD_COST: dict[str, float] = {"Unrolled": 6.0, "Minibatch": 15.0}
"""CPU cost of a toy run relative to a GAN run (the recorded tables; 1 if absent): with several workers
the costly runs are handed out first."""


def compare_on_toy(methods: Sequence[str] | Mapping[str, tuple[type[GAN], dict[str, Any]]],
                   toy_name: str = "ring8", seeds: Sequence[int] = (0, 1, 2), steps: int = 1000,
                   batch_size: int = TOY_BATCH_SIZE, n_data: int = 20_000, n_samples: int = 2500,
                   device: str = "cpu", threads: int | None = 1, progress: bool = False,
                   keep_samples: bool = False, workers: int = 1, keep_models: bool = False,
                   **overrides: Any) -> list[dict[str, Any]]:
    """Train each method with each seed on toy ``toy_name`` through :func:`genlib.train.fit`.

    ``methods`` are names in :data:`TOY_METHODS` or a mapping name -> (class, kwargs); ``overrides``
    go to every constructor. The learning rates decay linearly over the run to 5 % (override with
    ``lr_decay_steps=0``). Each run is seeded with its seed (weights, noise and a fresh dataset
    of ``n_data`` points). Returns one row per run: method, seed, modes (covered, out of
    ``total_modes``), hq (fraction of ``n_samples`` within 3 std of a mode) and seconds (training
    time), with ``keep_samples`` the scored samples, and with ``keep_models`` model, the trained GAN on the CPU (in
    eval mode, as it was scored). ``threads`` sets torch's CPU threads for the
    duration (None leaves them): these tiny MLPs are faster on one thread than on two, and far
    faster when the cores are shared. ``workers`` > 1 trains that many runs at once, each in its own
    process on one thread (see :func:`toy_runs`); the rows are the same.
    """
    table = methods if isinstance(methods, Mapping) else {name: TOY_METHODS[name] for name in methods}
    runs = [(name, seed) for name in table for seed in seeds]
    return in_call_order(toy_runs(runs, toy_name, steps, batch_size, table, n_data=n_data, n_samples=n_samples,
                                  device=device, threads=threads, progress=progress, keep_samples=keep_samples,
                                  workers=workers, keep_models=keep_models, **overrides))


def toy_runs(runs: Sequence[tuple[str, int]], toy_name: str, steps: int, batch_size: int = TOY_BATCH_SIZE,
             methods: Mapping[str, tuple[type[GAN], dict[str, Any]]] | None = None, *, n_data: int = 20_000,
             n_samples: int = 2500, device: str = "cpu", threads: int | None = 1, progress: bool = False,
             keep_samples: bool = False, workers: int = 1, keep_models: bool = False,
             **overrides: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    """The runs of :func:`compare_on_toy` one by one: yields ``(i, row)`` for each ``(method, seed)`` of
    ``runs`` as it finishes (in order on one worker), so a caller can save each row at once. ``methods``
    maps names to (class, kwargs) (default :data:`TOY_METHODS`); the other arguments are
    :func:`compare_on_toy`'s."""
    table = TOY_METHODS if methods is None else methods
    jobs = [(partial(table[name][0], shape=(2,), **{"lr_decay_steps": steps, **table[name][1], **overrides}), seed,
             f"{name} seed {seed}") for name, seed in runs]
    for i, row in coverage_runs(jobs, toy_name, steps, batch_size, workers=workers, progress=progress,
                                cost=[TOY_METHOD_COST.get(name, 1.0) for name, _ in runs], threads=threads,
                                n_data=n_data, n_samples=n_samples, device=device, keep_samples=keep_samples,
                                keep_model=keep_models):
        yield i, {"method": runs[i][0], "seed": runs[i][1], **row}


_PER_POINT_FAMILIES: tuple[type[GAN], ...] = (GAN, UnrolledGAN, DRAGAN, MRGAN, MADGAN)
"""The families whose discriminator gives each point its own ``D(x)``, the probability of 'real': a
sigmoid of one logit, or for MAD-GAN the softmax probability of its 'real' class. EBGAN (an
autoencoder's energy), PacGAN (one logit per pack) and MinibatchDiscriminationGAN (a logit that depends
on the rest of the batch) have none."""


def _require_family(model: GAN, families: tuple[type[GAN], ...], what: str, why: str) -> None:
    """TypeError naming ``families`` unless ``model`` is one of them and not another genlib family.

    (The other families subclass GAN too, so an isinstance check alone would let them through.)
    """
    outside = tuple(cls for cls in VARIANTS.values() if cls not in families and cls is not GAN)
    if not isinstance(model, families) or isinstance(model, outside):
        supported = ", ".join(cls.__name__ for cls in families)
        raise TypeError(f"{what} supports {supported}, not {type(model).__name__}: {why}")


def discriminator_probability(model: GAN, points: Tensor) -> Tensor:
    """``D(x)`` in (0, 1), the probability of 'real', at ``points [m, ...]`` -> ``[m]``.

    The sigmoid of the discriminator's logit; for :class:`MADGAN` the softmax probability of its 'real'
    class (the last of k + 1). TypeError for EBGAN, PacGAN and MinibatchDiscriminationGAN, whose
    discriminators give no per-point probability (an energy; one logit per pack; a logit that depends
    on the rest of the batch).
    """
    _require_family(model, _PER_POINT_FAMILIES, "discriminator_probability",
                    "it needs a D(x) per point (EBGAN's D is an energy, PacGAN's scores packs of samples, "
                    "minibatch discrimination's depends on the rest of the batch)")
    if isinstance(model, MADGAN):
        return torch.softmax(model.logits(points), dim=-1)[:, -1]
    return torch.sigmoid(model.logits(points).reshape(len(points)))


def snapshot_recorder(model: GAN, every: int = 50, lim: float = 2.6, resolution: int = 64, n_fakes: int = 512,
                      seed: int = 0) -> SnapshotRecorder:
    """A :class:`genlib.train.SnapshotRecorder` of a 2-D GAN: fakes of fixed codes and ``D(x)``
    (:func:`discriminator_probability`) on a grid over [-lim, lim]^2; step 0 is recorded at once.

    For GAN, UnrolledGAN, DRAGAN and MRGAN with 2-D samples. Other families raise TypeError: EBGAN,
    PacGAN and MinibatchDiscriminationGAN have no per-point ``D(x)``, and MADGAN's generator draws a
    random generator for each code, so its fakes would not be fixed and recording would change the run.
    Other sample shapes raise ValueError.
    """
    _require_family(model, (GAN, UnrolledGAN, DRAGAN, MRGAN), "snapshot_recorder",
                    "it needs fixed fakes and a D(x) per point (MADGAN draws a random generator for each code; "
                    "EBGAN, PacGAN and minibatch discrimination have no per-point D(x))")
    if tuple(model.shape) != (2,):
        raise ValueError(f"snapshot_recorder draws D(x) on a 2-D grid: it needs a model of 2-D points, "
                         f"got sample shape {tuple(model.shape)}")
    return train_snapshots(model, discriminator_probability, every, lim, resolution, n_fakes, seed)


def summarize(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per method: mean / min / max modes covered, mean hq fraction and mean seconds over the seeds."""
    return summarize_coverage(list(rows), "method")


# ----------------------------------------------------------------------------------------------
# The CLI builder
# ----------------------------------------------------------------------------------------------


def build_gan(spec: Any) -> GAN:
    """Builder for ``python -m genlib train gan``: the family from ``--opt variant=`` (see VARIANTS).

    Uses the spec's shape, z_dim, width (MLP width or conv base width) and lr (both players); images
    get DCGAN conv nets (Adam 2e-4 with beta1 0.5 by the CLI defaults). Any other constructor argument
    can be set with ``--opt name=value``, e.g. ``--opt variant=pacgan --opt pack=2``.
    """
    variant = spec.option("variant", "gan")
    if variant not in VARIANTS:
        raise ValueError(f"unknown GAN variant {variant!r}; known: {', '.join(VARIANTS)}")
    return spec.construct(VARIANTS[variant], skip=("variant",), shape=tuple(spec.shape), z_dim=spec.z_dim,
                          width=spec.width, lr_d=spec.lr, lr_g=spec.lr)
