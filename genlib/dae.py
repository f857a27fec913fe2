"""Chapter 4: from denoising autoencoders to generative models.

One identity drives the chapter (Vincent, 2011; Alain & Bengio, 2014; Su, 2019): for data
``x0 ~ p`` and noise ``x = x0 + sigma * eps``, the denoiser that minimises ``E ||r(x) - x0||^2``
is the posterior mean, and

    r*(x) = E[x0 | x] = x + sigma^2 grad log p_sigma(x),      p_sigma = p * N(0, sigma^2 I).

So a trained denoiser *is* an estimate of the score of the noisy data. The module has four layers:

* **Closed forms** for Gaussian mixtures with isotropic components: :func:`optimal_denoiser`
  (posterior-weighted mean of the per-component posterior means), :func:`smoothed_log_density`
  and :func:`smoothed_score`, so the identity can be checked to machine precision,
  :func:`denoiser_error` to compare a trained denoiser with the optimum, and :func:`gaussian_kl`
  (two isotropic Gaussians, so the DDE generator's KL can be checked against a closed form).
* **Langevin sampling**: :func:`langevin` (one noise level) and :func:`annealed_langevin`
  (Song & Ermon, 2019: a geometric ladder of noise levels, step ``eps * sigma_i^2 / sigma_L^2``,
  optional final denoising step); :func:`mixture_weights_recovered` shows that plain Langevin
  with the *exact* score misses the weights of separated modes while annealing, given enough
  Langevin steps per level, finds them (a short ladder leaves a systematic bias of its own).
* **Denoising density estimators** (Bigdeli et al., 2020): a scalar energy ``e`` whose denoiser is
  ``x + sigma^2 grad e(x)`` (:func:`energy_denoiser`, :func:`dde_loss`), so at the optimum
  ``e = log p_sigma + const`` (a scalar, unlike the vector score network ``s(x, sigma)``);
  :class:`DDEGenerator` trains a generator against two such energies by minimising
  ``KL(q_sigma || p_sigma)`` (the sign is derived in its docstring).
* **Annealed denoising score matching**: :class:`NoiseConditionalScore` (an MLP for vectors, a
  small U-Net for images), :func:`dsm_loss`, :class:`ScoreModel` (trains on all levels, samples by
  annealed Langevin) and :class:`DAE`, the single-level special case trained with the plain
  denoising loss ``||r(x0 + sigma eps) - x0||^2``.

:func:`build_dae`, :func:`build_dde` and :func:`build_score` are the ``python -m genlib train``
builders. Following the design, this chapter module imports infrastructure only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from genlib import nets
from genlib.metrics import check_counts, check_positive, pairwise_sq_dists
from genlib.train import GenerativeModel, at_least_fp32, count_step, mirror_step_count

__all__ = [
    "ConvScoreBody", "DAE", "DDEGenerator", "MLPScoreBody", "NoiseConditionalScore", "ScoreModel",
    "annealed_langevin", "build_dae", "build_dde", "build_score", "data_smoothed_log_density", "denoiser_error",
    "dde_loss", "dsm_loss", "energy_denoiser", "gaussian_kl", "generator_updates", "geometric_sigmas", "langevin",
    "make_energy", "mixture_params", "mixture_weights_recovered", "optimal_denoiser", "posterior_responsibilities",
    "smoothed_log_density", "smoothed_mass_within", "smoothed_score",
]

ScoreFn = Callable[[Tensor, float], Tensor]
PerComponent = Tensor | Sequence[float]
"""A mixture's weights or standard deviations, one per component: a tensor ``[k]`` or a list of floats."""
ComponentMeans = Tensor | Sequence[Sequence[float]]
"""A mixture's means ``[k, d]``: a tensor or nested lists."""

# ----------------------------------------------------------------------------------------------
# Closed forms for a Gaussian mixture sum_j w_j N(mu_j, s_j^2 I) blurred by N(0, sigma^2 I)
# ----------------------------------------------------------------------------------------------


def _mixture(x: Tensor, weights: PerComponent, means: ComponentMeans,
             stds: PerComponent) -> tuple[Tensor, Tensor, Tensor]:
    """``weights [k]``, ``means [k, d]``, ``stds [k]`` as tensors of x's dtype and device, with checks."""
    w, mu, s = (torch.as_tensor(v, dtype=x.dtype, device=x.device) for v in (weights, means, stds))
    if x.ndim != 2 or mu.ndim != 2 or mu.shape[1] != x.shape[1]:
        raise ValueError(f"need x [n, d] and means [k, d], got {tuple(x.shape)} and {tuple(mu.shape)}")
    if w.shape != (len(mu),) or s.shape != (len(mu),):
        raise ValueError(f"weights and stds must have shape [{len(mu)}], got {tuple(w.shape)}, {tuple(s.shape)}")
    if bool((w < 0).any()) or not bool(w.sum() > 0):
        raise ValueError(f"weights must be >= 0 with a positive sum, got {w.tolist()}")
    if bool((s < 0).any()):
        raise ValueError(f"stds must be >= 0, got {s.tolist()}")
    return w / w.sum(), mu, s


def _blurred_variances(stds: Tensor, sigma: float) -> Tensor:
    """``s_j^2 + sigma^2`` [k]: each component's variance once N(0, sigma^2 I) noise is added, checked positive."""
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    var = stds**2 + sigma**2
    if not bool((var > 0).all()):
        raise ValueError(f"a component with std 0 needs sigma > 0 (its variance s_j^2 + sigma^2 is 0), "
                         f"got stds {stds.tolist()} and sigma {sigma}")
    return var


def _component_log_probs(x: Tensor, weights: PerComponent, means: ComponentMeans,
                         stds: PerComponent, sigma: float) -> tuple[Tensor, Tensor, Tensor]:
    """``log w_j + log N(x; mu_j, (s_j^2 + sigma^2) I)`` [n, k], with the means [k, d] and variances [k]."""
    w, mu, s = _mixture(x, weights, means, stds)
    var = _blurred_variances(s, sigma)
    sq_dist = (x[:, None, :] - mu[None]).pow(2).sum(-1)
    d = x.shape[1]
    return w.log() - sq_dist / (2 * var) - 0.5 * d * torch.log(2 * math.pi * var), mu, var


def smoothed_log_density(x: Tensor, weights: PerComponent, means: ComponentMeans,
                         stds: PerComponent, sigma: float) -> Tensor:
    """``log p_sigma(x)`` [n] at x [n, d] for the mixture blurred by N(0, sigma^2 I) (``sigma=0``: the mixture)."""
    return torch.logsumexp(_component_log_probs(x, weights, means, stds, sigma)[0], dim=1)


def posterior_responsibilities(x: Tensor, weights: PerComponent, means: ComponentMeans,
                               stds: PerComponent, sigma: float) -> Tensor:
    """``P(component j | x0 + sigma eps = x)`` [n, k], from logsumexp so far-away points do not underflow."""
    return torch.softmax(_component_log_probs(x, weights, means, stds, sigma)[0], dim=1)


def smoothed_score(x: Tensor, weights: PerComponent, means: ComponentMeans, stds: PerComponent, sigma: float) -> Tensor:
    """``grad_x log p_sigma(x)`` [n, d]: responsibility-weighted ``(mu_j - x) / (s_j^2 + sigma^2)``."""
    log_probs, mu, var = _component_log_probs(x, weights, means, stds, sigma)
    resp = torch.softmax(log_probs, dim=1)
    return torch.einsum("nk,nkd->nd", resp / var, mu[None] - x[:, None, :])


def smoothed_mass_within(points: Tensor, weights: PerComponent, means: ComponentMeans, stds: PerComponent,
                         sigma: float, radius: float) -> Tensor:
    """``P(|x - c| <= radius)`` [n] for x from the mixture blurred by N(0, sigma^2 I), for each centre c of
    points [n, d]: a weighted sum of non-central chi-square CDFs (each component is isotropic), in float64."""
    from scipy.stats import ncx2  # only here: the rest of the module needs no scipy

    check_positive("radius", radius)
    centres = points.detach().double().cpu()
    w, mu, s = _mixture(centres, weights, means, stds)
    var = _blurred_variances(s, sigma).numpy()
    sq_dist = (centres[:, None, :] - mu[None]).pow(2).sum(-1).numpy()  # [n, k]
    mass = ncx2.cdf(radius**2 / var, df=centres.shape[1], nc=sq_dist / var)
    return torch.from_numpy(mass) @ w


def data_smoothed_log_density(x: Tensor, data: Tensor, sigma: float, chunk: int = 8192) -> Tensor:
    """``log p_sigma(x)`` [n] (float64) of the data's empirical distribution blurred by N(0, sigma^2 I):
    ``log mean_j N(x; data_j, sigma^2 I)`` for x [n, ...] and data [N, ...] of the same shape, exact.

    The mixture of :func:`smoothed_log_density` with one equal-weight, zero-width component per data point,
    computed with GEMM distances over ``chunk`` data points at a time, so 60,000 images fit in memory."""
    check_positive("sigma", sigma)
    queries, keys = x.flatten(1), data.flatten(1)
    if queries.shape[1] != keys.shape[1] or len(keys) == 0:
        raise ValueError(f"need x [n, ...] and data [N, ...] of one shape, N >= 1, got {tuple(x.shape)} and "
                         f"{tuple(data.shape)}")
    # pairwise_sq_dists works in float64, one chunk at a time: 60,000 images at once would be 376 MB
    log_kernel_sums = torch.stack([torch.logsumexp(-pairwise_sq_dists(queries, part) / (2 * sigma**2), 1)
                                   for part in keys.split(chunk)]).logsumexp(0)
    dims = queries.shape[1]
    return log_kernel_sums - math.log(len(keys)) - 0.5 * dims * math.log(2 * math.pi * sigma**2)


def optimal_denoiser(x: Tensor, weights: PerComponent, means: ComponentMeans,
                     stds: PerComponent, sigma: float) -> Tensor:
    """``E[x0 | x0 + sigma eps = x]`` [n, d] for x0 from the mixture: the responsibility-weighted average of
    each component's posterior mean ``mu_j + s_j^2 / (s_j^2 + sigma^2) (x - mu_j)`` (x [n, d], means [k, d])."""
    log_probs, mu, var = _component_log_probs(x, weights, means, stds, sigma)
    resp = torch.softmax(log_probs, dim=1)
    shrink = (var - sigma**2) / var  # s_j^2 / (s_j^2 + sigma^2): how much of x a component trusts
    posterior_means = mu[None] + shrink[None, :, None] * (x[:, None, :] - mu[None])  # [n, k, d]
    return torch.einsum("nk,nkd->nd", resp, posterior_means)


def gaussian_kl(mean_q: Tensor, std_q: float | Tensor, mean_p: Tensor, std_p: float | Tensor) -> Tensor:
    """``KL(N(mean_q, std_q^2 I) || N(mean_p, std_p^2 I))`` [...] for means [..., d] and stds that broadcast to [...].

    ``d log(std_p / std_q) + (d std_q^2 + ||mean_q - mean_p||^2) / (2 std_p^2) - d / 2``; differentiable in all inputs.
    """
    mean_q = torch.as_tensor(mean_q)
    if not mean_q.is_floating_point():
        mean_q = mean_q.to(torch.get_default_dtype())
    mean_p = torch.as_tensor(mean_p, dtype=mean_q.dtype, device=mean_q.device)
    if mean_q.ndim < 1 or mean_p.ndim < 1 or mean_q.shape[-1] != mean_p.shape[-1]:
        raise ValueError(f"need means [..., d] with the same d, got {tuple(mean_q.shape)} and {tuple(mean_p.shape)}")
    std_q, std_p = (torch.as_tensor(v, dtype=mean_q.dtype, device=mean_q.device) for v in (std_q, std_p))
    if not bool((std_q > 0).all()) or not bool((std_p > 0).all()):
        raise ValueError(f"stds must be > 0, got {std_q.tolist()} and {std_p.tolist()}")
    batch = torch.broadcast_shapes(mean_q.shape[:-1], mean_p.shape[:-1])
    for name, std in (("std_q", std_q), ("std_p", std_p)):  # a per-coordinate std [d] would broadcast silently
        if torch.broadcast_shapes(std.shape, batch) != batch:
            raise ValueError(f"{name} must be a scalar or broadcast to the means' batch shape {tuple(batch)} "
                             f"(one std per Gaussian, isotropic), got shape {tuple(std.shape)}")
    d = mean_q.shape[-1]
    sq_dist = (mean_q - mean_p).pow(2).sum(-1)
    return d * torch.log(std_p / std_q) + (d * std_q**2 + sq_dist) / (2 * std_p**2) - d / 2


def mixture_params(toy: Any) -> tuple[Tensor, Tensor, Tensor]:
    """(weights [k], means [k, d], stds [k]) of a :class:`genlib.data.Toy` mixture (ring8, grid25, ...)."""
    if toy.modes is None or toy.std is None:
        raise ValueError(f"toy {toy.name!r} is not a Gaussian mixture; use ring8, grid25 or gaussian_mixture(...)")
    weights = toy.weights if toy.weights is not None else torch.full((len(toy.modes),), 1.0 / len(toy.modes))
    return weights, toy.modes, torch.full((len(toy.modes),), float(toy.std))


def denoiser_error(denoise: Callable[[Tensor], Tensor], x: Tensor, weights: PerComponent,
                   means: ComponentMeans, stds: PerComponent, sigma: float) -> float:
    """Mean Euclidean distance between ``denoise(x)`` and the optimal denoiser at points x [n, d]."""
    with torch.no_grad():
        return float((denoise(x) - optimal_denoiser(x, weights, means, stds, sigma)).norm(dim=1).mean())


# ----------------------------------------------------------------------------------------------
# Langevin dynamics
# ----------------------------------------------------------------------------------------------


def geometric_sigmas(sigma_max: float, sigma_min: float, n: int) -> Tensor:
    """``n`` noise levels [n] from ``sigma_max`` down to ``sigma_min`` with a constant ratio (n = 1: ``[sigma_min]``,
    the level the samples end at)."""
    if not 0 < sigma_min <= sigma_max or n < 1:
        raise ValueError(f"need 0 < sigma_min <= sigma_max and n >= 1, got {sigma_min}, {sigma_max}, {n}")
    if n == 1:
        return torch.tensor([float(sigma_min)])
    return torch.logspace(math.log10(sigma_max), math.log10(sigma_min), n, dtype=torch.float64).float()


def langevin(score_fn: Callable[[Tensor], Tensor], x0: Tensor, step_size: float, n_steps: int,
             generator: torch.Generator | None = None) -> Tensor:
    """Unadjusted Langevin: ``x <- x + step/2 * score(x) + sqrt(step) * z`` for ``n_steps``; x0 [n, ...] -> [n, ...].

    Every chain moves at once (one ``score_fn`` call per step); ``generator`` must live on x0's device.
    """
    if n_steps < 0 or step_size < 0:
        raise ValueError(f"need n_steps >= 0 and step_size >= 0, got {n_steps} and {step_size}")
    x = x0.clone()
    noise_scale = math.sqrt(step_size)
    for _ in range(n_steps):
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x + 0.5 * step_size * score_fn(x) + noise_scale * z
    return x


def annealed_langevin(score_fn: ScoreFn, x0: Tensor, sigmas: Sequence[float] | Tensor, eps: float,
                      steps_per_level: int, denoise: bool = True, generator: torch.Generator | None = None) -> Tensor:
    """Annealed Langevin (Song & Ermon, 2019): x0 [n, ...] -> samples [n, ...].

    For each level ``sigma_i`` (largest first) run :func:`langevin` with ``score_fn(x, sigma_i)`` and
    step ``eps * sigma_i^2 / sigma_L^2``, so every level moves about the same fraction of its own width;
    then, with ``denoise``, one Tweedie step ``x + sigma_L^2 score(x, sigma_L)`` removes the last noise.
    """
    levels = [float(s) for s in sigmas]
    if not levels:
        raise ValueError("annealed_langevin needs at least one noise level, got an empty sigmas")
    x = x0
    for sigma in levels:
        step = eps * sigma**2 / levels[-1] ** 2
        x = langevin(lambda v, s=sigma: score_fn(v, s), x, step, steps_per_level, generator)
    return x + levels[-1] ** 2 * score_fn(x, levels[-1]) if denoise else x


def mixture_weights_recovered(samples: Tensor, modes: Tensor) -> Tensor:
    """Fraction [k] of samples [n, d] whose nearest mode (modes [k, d]) is each mode."""
    nearest = torch.cdist(samples.float(), modes.to(samples).float()).argmin(dim=1)
    return torch.bincount(nearest, minlength=len(modes)).float() / len(samples)


# ----------------------------------------------------------------------------------------------
# Denoising density estimators (DDE)
# ----------------------------------------------------------------------------------------------


def energy_denoiser(energy: Callable[[Tensor], Tensor], x_noisy: Tensor, sigma: float,
                    create_graph: bool = True) -> Tensor:
    """DDE denoiser ``x + sigma^2 grad_x e(x)`` [n, ...] of a scalar energy ``e`` ([n, ...] -> [n]).

    ``create_graph`` keeps the input gradient differentiable, so a loss on the output trains ``e``.
    """
    x = x_noisy.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(energy(x).sum(), x, create_graph=create_graph)
    return x + sigma**2 * grad


def _squared_norm(v: Tensor) -> Tensor:
    """Per-sample squared L2 norm [n] of v [n, ...]."""
    return v.pow(2).flatten(1).sum(1)


def dde_loss(energy: Callable[[Tensor], Tensor], x: Tensor, x_noisy: Tensor, sigma: float) -> Tensor:
    """``mean_i ||x~_i + sigma^2 grad e(x~_i) - x_i||^2 / 2``: the denoising loss of the energy's denoiser."""
    return 0.5 * _squared_norm(energy_denoiser(energy, x_noisy, sigma) - x).mean()


def make_energy(shape: Sequence[int], width: int = 128, depth: int = 3, act: str = "auto") -> nn.Module:
    """Scalar energy ``[n, *shape]`` -> [n]: an MLP for vectors (default softplus: its input gradient, the
    score, must vary smoothly, so no ReLU), the DCGAN critic without normalisation for images (default its
    LeakyReLU, as in the DDE code's stacked-MNIST critic, whose input gradient is piecewise constant); another
    ``act`` names the activation for either."""
    if act == "auto":
        act = "leaky_relu" if _is_image(shape) else "softplus"
    if _is_image(shape):
        return nets.ConvCritic(shape[-1], shape[0], width, norm="none", act=act)
    return nn.Sequential(nn.Flatten(), nets.MLP(math.prod(shape), 1, width, depth, act), nn.Flatten(0))


def _is_image(shape: Sequence[int]) -> bool:
    """Images are [C, H, W]; anything else is treated as a vector."""
    return len(shape) == 3


def _make_generator(z_dim: int, shape: Sequence[int], width: int, depth: int, act: str) -> nn.Module:
    """Generator z [n, z_dim] -> ``[n, *shape]``: DCGAN ConvGenerator for images, MLP for vectors."""
    if _is_image(shape):
        return nets.ConvGenerator(z_dim, shape[-1], shape[0], width)
    return nets.MLP(z_dim, math.prod(shape), width, depth, act)


def generator_updates(steps: int, warmup: int, gen_every: int) -> int:
    """How many of a :class:`DDEGenerator`'s training steps 1..steps update the generator: those after the
    ``warmup`` steps whose number ``gen_every`` divides."""
    return steps // gen_every - min(warmup, steps) // gen_every


class DDEGenerator(GenerativeModel):
    """A generator trained with denoising density estimators (Bigdeli et al., 2020).

    Two scalar energies learn the noisy densities by denoising (:func:`dde_loss`): ``energy_real``
    on ``x + sigma eps`` for data x (so ``e_p = log p_sigma + C1``) and ``energy_fake`` on
    ``G(z) + sigma eps`` (so ``e_q = log q_sigma + C2``). Each :meth:`step` (1) updates ``e_p``
    (after warm-up only with ``train_real``), (2) updates ``e_q`` on fresh fakes, and (3) every
    ``gen_every`` steps after warm-up updates G to minimise ``mean[e_q(G(z) + eps) - e_p(G(z) + eps)]``;
    the first ``warmup`` steps train the two energies alone (no generator step). ``sigma`` defaults to
    the DDE code's levels: 0.2 for vectors, 0.6 for images on the [-1, 1] pixel range.
    With ``sigma_end`` (which then needs ``anneal_steps >= 1``) the noise level decays geometrically
    from ``sigma`` to ``sigma_end`` over ``anneal_steps`` steps after warm-up (the authors' code offers
    such a reduction): a wide blur lets the generator see distant modes, a narrow one resolves them;
    the energies follow it online. ``energy_act`` sets the energies' hidden activation (:func:`make_energy`:
    ``"auto"``: softplus for vectors, LeakyReLU for images). ``energy_only`` trains ``e_p`` alone (no ``e_q``, no
    generator): its loss never involves the generator, so this learns an ``e_p`` from the same distribution as a
    full run's (same sigma schedule; other random draws), at well under half the cost of a full step.

    **The sign.** ``KL(q_sigma || p_sigma) = E_{x ~ q_sigma}[log q_sigma(x) - log p_sigma(x)]
    = E_{z, eps}[e_q - e_p](G(z) + sigma eps) + C1 - C2``; the constants do not depend on G, so
    G *minimises* ``e_q - e_p`` (the source writes ``E = sigma^2 log p_sigma`` because its
    denoiser is ``x + grad E``: same sign, scaled by sigma^2). Minimising it pushes fakes uphill on
    the data's density and downhill on their own, which spreads them out.

    **Why backpropagating through e_q is right.** The exact gradient is
    ``E[(grad log q_sigma - grad log p_sigma)(x) . dx/dtheta] + E_{q_sigma}[d/dtheta log q_sigma(x)]``
    at fixed x; the second term is ``int d/dtheta q_sigma dx = 0``. So G's gradient flows through
    the input of both energies with their weights frozen, which is what the authors' code does
    (only the generator's optimiser steps on this loss).
    """

    def __init__(self, shape: Sequence[int] = (2,), z_dim: int = 8, width: int = 128, depth: int = 3,
                 sigma: float | None = None, lr: float = 1e-3, lr_g: float | None = None, gen_every: int = 10,
                 warmup: int = 0, sigma_end: float | None = None, anneal_steps: int = 0, train_real: bool = True,
                 energy_act: str = "auto", g_act: str = "relu", energy_only: bool = False,
                 betas: tuple[float, float] = (0.9, 0.999)):
        super().__init__()
        if gen_every < 1 or warmup < 0:
            raise ValueError(f"gen_every must be >= 1 and warmup >= 0, got {gen_every}, {warmup}")
        check_counts(1, depth=depth)
        self.shape, self.z_dim = tuple(shape), z_dim
        self.sigma_start = float(sigma if sigma is not None else (0.6 if _is_image(shape) else 0.2))
        self.sigma_end = self.sigma_start if sigma_end is None else float(sigma_end)
        if self.sigma_start <= 0 or self.sigma_end <= 0:
            raise ValueError(f"sigma and sigma_end must be > 0, got {self.sigma_start} and {self.sigma_end}")
        if anneal_steps < 0:
            raise ValueError(f"anneal_steps must be >= 0, got {anneal_steps}")
        if self.sigma_end != self.sigma_start and anneal_steps < 1:
            raise ValueError(f"sigma_end={self.sigma_end} differs from sigma={self.sigma_start}, so the noise level "
                             f"must decay over anneal_steps >= 1 steps, got anneal_steps={anneal_steps}")
        self.anneal_steps = anneal_steps
        if energy_only and not train_real:
            raise ValueError("energy_only trains e_p alone, so it needs train_real=True")
        self.gen_every, self.warmup, self.train_real, self.energy_only = gen_every, warmup, train_real, energy_only
        self.energy_real = make_energy(self.shape, width, depth, energy_act)
        self.energy_fake = make_energy(self.shape, width, depth, energy_act)
        self.generator = _make_generator(z_dim, self.shape, width, depth, g_act)
        rates = {"real": lr, "fake": lr, "g": lr if lr_g is None else lr_g}
        self.optimizers = {name: torch.optim.Adam(getattr(self, net).parameters(), lr=rates[name], betas=betas)
                           for name, net in (("real", "energy_real"), ("fake", "energy_fake"), ("g", "generator"))}
        # Buffers, so a resumed run continues the same schedule and reports the same last loss; the
        # Python mirror of the step count spares a device sync per step on CUDA.
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_loss_g", torch.zeros(()))
        mirror_step_count(self, "iteration", "_iteration")

    @property
    def sigma(self) -> float:
        """The noise level now: geometric from ``sigma`` to ``sigma_end`` over ``anneal_steps`` steps after warm-up."""
        if self.sigma_end == self.sigma_start:  # the constructor ensures anneal_steps >= 1 otherwise
            return self.sigma_start
        progress = min(max(self._iteration - self.warmup, 0) / self.anneal_steps, 1.0)
        return self.sigma_start * (self.sigma_end / self.sigma_start) ** progress

    def noise(self, n: int) -> Tensor:
        """Latent codes z ~ N(0, I) [n, z_dim]."""
        return torch.randn(n, self.z_dim, device=self.device)

    def generate(self, n: int) -> Tensor:
        """n fakes ``[n, *shape]`` in fp32 (bf16 autocast would round the noise the blur adds) from the live
        generator (differentiable unless under no_grad)."""
        return at_least_fp32(self.generator(self.noise(n)).reshape(n, *self.shape))

    def blur(self, x: Tensor) -> Tensor:
        """``x + sigma * eps``, the noisy version of a batch."""
        return x + self.sigma * torch.randn_like(x)

    def energy_loss(self, energy: nn.Module, x: Tensor) -> Tensor:
        """DDE loss of ``energy`` on clean samples x blurred at the current sigma."""
        return dde_loss(energy, x, self.blur(x), self.sigma)

    def fit_energy(self, player: str, energy: nn.Module, x: Tensor) -> Tensor:
        """One DDE step of ``energy`` on clean samples x; returns the loss."""
        loss = self.energy_loss(energy, x)
        self.update(player, loss)
        return loss.detach()

    def generator_loss(self, n: int) -> Tensor:
        """``mean[e_q - e_p]`` at n noisy fakes: ``KL(q_sigma || p_sigma)`` up to a constant."""
        noisy = self.blur(self.generate(n))
        return (self.energy_fake(noisy) - self.energy_real(noisy)).mean()

    def step(self, x: Tensor, index: Tensor) -> dict[str, Tensor]:
        """DDE steps for both energies, then (every ``gen_every`` steps after warm-up) one generator step;
        with ``energy_only`` the step of ``e_p`` alone."""
        iteration = count_step(self, "iteration", "_iteration")
        if self.energy_only:
            return {"loss_real": self.fit_energy("real", self.energy_real, x)}
        warming = iteration <= self.warmup
        losses = {"loss_real": self.fit_energy("real", self.energy_real, x) if warming or self.train_real
                  else self.energy_loss(self.energy_real, x).detach()}
        with torch.no_grad():
            fake = self.generate(len(x))
        losses["loss_fake"] = self.fit_energy("fake", self.energy_fake, fake)
        if not warming and iteration % self.gen_every == 0:
            loss_g = self.generator_loss(len(x))
            self.update("g", loss_g)
            self.last_loss_g.copy_(loss_g.detach())
        return {**losses, "loss_g": self.last_loss_g.clone()}

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """n samples ``[n, *shape]`` from the (EMA) generator."""
        return self.sampling_net()(self.noise(n)).reshape(n, *self.shape)

    def ema_source(self) -> nn.Module:
        """The generator."""
        return self.generator


# ----------------------------------------------------------------------------------------------
# Noise-conditional score networks and annealed denoising score matching
# ----------------------------------------------------------------------------------------------


class MLPScoreBody(nn.Module):
    """(x [n, d], log sigma [n]) -> [n, d]: an MLP on the concatenation."""

    def __init__(self, dim: int, width: int = 128, depth: int = 3, act: str = "silu"):
        super().__init__()
        self.net = nets.MLP(dim + 1, dim, width, depth, act)

    def forward(self, x: Tensor, log_sigma: Tensor) -> Tensor:
        return self.net(torch.cat([x, log_sigma[:, None]], dim=1))


def _groups(channels: int) -> int:
    """A GroupNorm group count that divides ``channels`` (up to 8)."""
    return math.gcd(channels, 8)


class _ResBlock(nn.Module):
    """Residual conv block [n, c_in, h, w] -> [n, c_out, h, w] with the noise embedding added as a channel bias."""

    def __init__(self, c_in: int, c_out: int, emb: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(_groups(c_in), c_in), nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.cond = nn.Linear(emb, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(_groups(c_out), c_out), nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)
        self.act = nn.SiLU()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(self.act(self.norm1(x))) + self.cond(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(self.act(self.norm2(h)))


class ConvScoreBody(nn.Module):
    """(x [n, C, H, W], log sigma [n]) -> [n, C, H, W]: a two-level U-Net (H, W divisible by 4).

    Widths ``width`` at full resolution and ``2 width`` at 1/2 and 1/4; one residual block per level
    on the way down and up, skip connections by concatenation, log sigma enters every block.
    """

    def __init__(self, channels: int, width: int = 32, emb: int = 64):
        super().__init__()
        w1, w2 = width, 2 * width
        self.embed = nn.Sequential(nn.Linear(1, emb), nn.SiLU(), nn.Linear(emb, emb), nn.SiLU())
        self.inc = nn.Conv2d(channels, w1, 3, 1, 1)
        self.enc1, self.down1 = _ResBlock(w1, w1, emb), nn.Conv2d(w1, w2, 4, 2, 1)
        self.enc2, self.down2 = _ResBlock(w2, w2, emb), nn.Conv2d(w2, w2, 4, 2, 1)
        self.mid = _ResBlock(w2, w2, emb)
        self.up2, self.dec2 = nn.ConvTranspose2d(w2, w2, 4, 2, 1), _ResBlock(2 * w2, w2, emb)
        self.up1, self.dec1 = nn.ConvTranspose2d(w2, w1, 4, 2, 1), _ResBlock(2 * w1, w1, emb)
        self.out = nn.Sequential(nn.GroupNorm(_groups(w1), w1), nn.SiLU(), nn.Conv2d(w1, channels, 3, 1, 1))

    def forward(self, x: Tensor, log_sigma: Tensor) -> Tensor:
        if x.shape[-1] % 4 or x.shape[-2] % 4:
            raise ValueError(f"ConvScoreBody needs H and W divisible by 4, got {tuple(x.shape[-2:])}")
        e = self.embed(log_sigma[:, None])
        h1 = self.enc1(self.inc(x), e)
        h2 = self.enc2(self.down1(h1), e)
        h = self.mid(self.down2(h2), e)
        h = self.dec2(torch.cat([self.up2(h), h2], 1), e)
        h = self.dec1(torch.cat([self.up1(h), h1], 1), e)
        return self.out(h)


class NoiseConditionalScore(nn.Module):
    """Score network ``s(x, sigma) ~ grad log p_sigma(x)``: x ``[n, *shape]``, sigma [n] or a float -> ``[n, *shape]``.

    The body sees (x, log sigma) and its output is divided by sigma (NCSNv2's parametrisation): the
    true score of noisy data scales like 1/sigma, so the body only has to produce O(1) numbers.
    ``arch='auto'`` gives images [C, H, W] a :class:`ConvScoreBody` and vectors an :class:`MLPScoreBody`;
    ``arch='mlp'`` uses the MLP on flattened images too: ~10x cheaper per step on a CPU, but without a
    spatial prior it learned far slower on Fashion-MNIST (loss 304 vs 67 after a minute), so it is for contrast.
    """

    def __init__(self, shape: Sequence[int], width: int = 128, depth: int = 3, act: str = "silu",
                 arch: str = "auto"):
        super().__init__()
        if arch not in ("auto", "mlp", "conv") or (arch == "conv" and not _is_image(shape)):
            raise ValueError(f"arch must be 'auto', 'mlp' or 'conv' (images only), got {arch!r} for shape {shape}")
        self.shape = tuple(shape)
        conv = _is_image(shape) and arch != "mlp"
        self.body = ConvScoreBody(shape[0], width) if conv else MLPScoreBody(math.prod(shape), width, depth, act)

    def forward(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        # a Python number is filled in on the device: no host-to-device copy, which a CUDA graph could not hold
        sigma = (x.new_full((x.shape[0],), sigma) if isinstance(sigma, (int, float))
                 else sigma.to(device=x.device, dtype=x.dtype).expand(x.shape[0]))
        if isinstance(self.body, MLPScoreBody):
            out = self.body(x.flatten(1), sigma.log()).view_as(x)
        else:
            out = self.body(x, sigma.log())
        return out / sigma.view(-1, *[1] * (x.dim() - 1))


def dsm_loss(score: Callable[[Tensor, Tensor], Tensor], x: Tensor, sigma: Tensor) -> Tensor:
    """NCSN loss ``mean_i sigma_i^2 / 2 ||s(x~_i, sigma_i) + (x~_i - x_i) / sigma_i^2||^2`` with ``x~ = x + sigma eps``.

    x [n, ...], sigma [n] (one level per sample). The weight sigma^2 makes every level's term O(1).
    """
    sigma_b = sigma.view(-1, *[1] * (x.dim() - 1))
    eps = torch.randn_like(x)
    # sigma * (s + (x~ - x) / sigma^2) = sigma * s + eps, written so no 1/sigma^2 is formed.
    return 0.5 * _squared_norm(sigma_b * score(x + sigma_b * eps, sigma) + eps).mean()


class ScoreModel(GenerativeModel):
    """Noise-conditional score network (Song & Ermon, 2019): a :class:`NoiseConditionalScore` trained on
    ``n_sigmas`` geometric noise levels at once (each sample gets a random level), sampled by
    :func:`annealed_langevin` with ``eps`` (default ``0.2 sigma_min^2``), ``steps_per_level`` and an
    optional final denoising step (NCSNv2's; on by default).

    Chains start from ``U[-1, 1]`` for images (the pixel range: NCSN's and NCSNv2's reference code start from
    uniform noise on theirs) and from ``init_std * N(0, I)`` for vectors (default ``sigma_max``: wide enough to
    cover data when sigma_max is about the data's spread).
    """

    graph_safe = True

    def __init__(self, shape: Sequence[int] = (2,), width: int = 128, depth: int = 3, sigma_max: float = 5.0,
                 sigma_min: float = 0.05, n_sigmas: int = 10, lr: float = 1e-3, eps: float | None = None,
                 steps_per_level: int = 50, final_denoise: bool = True, init_std: float | None = None,
                 act: str = "silu", arch: str = "auto"):
        super().__init__()
        check_counts(1, depth=depth)
        self.shape = tuple(shape)
        self.score = NoiseConditionalScore(self.shape, width, depth, act, arch)
        self.register_buffer("sigmas", geometric_sigmas(sigma_max, sigma_min, n_sigmas))
        # eps / sigma_L^2 is the step as a fraction of each level's variance: NCSN's images use 0.2
        # (2e-5 / 0.01^2), its toy 0.1; we default to 0.2 so fewer steps per level still mix.
        self.eps = 0.2 * sigma_min**2 if eps is None else eps
        self.steps_per_level, self.final_denoise = steps_per_level, final_denoise
        self.init_std = sigma_max if init_std is None else init_std
        self.optimizers = {"score": torch.optim.Adam(self.score.parameters(), lr=lr)}

    def loss(self, x: Tensor) -> Tensor:
        """DSM loss on a batch x ``[B, *shape]`` with a uniformly drawn noise level per sample."""
        levels = torch.randint(len(self.sigmas), (x.shape[0],), device=x.device)
        return dsm_loss(self.score, x, self.sigmas[levels])

    def step(self, x: Tensor, index: Tensor) -> dict[str, Tensor]:
        """One Adam step on :meth:`loss`."""
        loss = self.loss(x)
        self.update("score", loss)
        return {"loss": loss.detach()}

    def initial_points(self, n: int) -> Tensor:
        """Where the chains start: ``[n, *shape]``."""
        if _is_image(self.shape):
            return torch.rand(n, *self.shape, device=self.device) * 2 - 1
        return self.init_std * torch.randn(n, *self.shape, device=self.device)

    @torch.no_grad()
    def sample(self, n: int, eps: float | None = None, steps_per_level: int | None = None) -> Tensor:
        """n samples ``[n, *shape]`` by annealed Langevin with the (EMA) score network."""
        eps = self.eps if eps is None else eps
        steps_per_level = self.steps_per_level if steps_per_level is None else steps_per_level
        return annealed_langevin(self.sampling_net(), self.initial_points(n), self.sigmas, eps, steps_per_level,
                                 self.final_denoise)

    def ema_source(self) -> nn.Module:
        """The score network."""
        return self.score


class DAE(ScoreModel):
    """A denoising autoencoder at one noise level: ``r(x) = x + sigma^2 s(x, sigma)``, trained with
    ``mean ||r(x + sigma eps) - x||^2`` (so ``r -> r*`` and ``s -> grad log p_sigma``).

    Sampling is the source's recipe for a single level: Langevin on p_sigma with the score
    ``(r(x) - x) / sigma^2``, then one pass through r.
    """

    def __init__(self, shape: Sequence[int] = (2,), sigma: float = 0.2, width: int = 128, depth: int = 3,
                 lr: float = 1e-3, eps: float = 0.01, steps_per_level: int = 200, init_std: float = 2.0,
                 act: str = "silu"):
        super().__init__(shape, width, depth, sigma, sigma, 1, lr, eps, steps_per_level, True, init_std, act)
        self.sigma = float(sigma)  # a Python float: no device sync when denoising on a GPU

    def denoise(self, x: Tensor) -> Tensor:
        """r(x) ``[n, *shape]`` for noisy x ``[n, *shape]``."""
        return x + self.sigma**2 * self.score(x, self.sigma)

    def loss(self, x: Tensor) -> Tensor:
        """``mean_i ||r(x_i + sigma eps_i) - x_i||^2``."""
        return _squared_norm(self.denoise(x + self.sigma * torch.randn_like(x)) - x).mean()


# ----------------------------------------------------------------------------------------------
# Builders for ``python -m genlib train``
# ----------------------------------------------------------------------------------------------


def build_dde(spec: Any) -> DDEGenerator:
    """``python -m genlib train dde``: DDE generator with the spec's shape, z_dim, width and lr
    (the paper used Adam 1e-3); options such as ``sigma``, ``gen_every``, ``warmup``."""
    if spec.option("energy_only", False):
        raise ValueError("--opt energy_only trains e_p alone and leaves the generator untrained, so a run would "
                         "score noise; it is for probing e_p in Python (DDEGenerator(energy_only=True))")
    return spec.construct(DDEGenerator, skip=("energy_only",), shape=tuple(spec.shape), z_dim=spec.z_dim,
                          width=spec.width, lr=spec.lr)


def build_score(spec: Any) -> ScoreModel:
    """``python -m genlib train score``: annealed DSM; images default to sigma 2 -> 0.02 (NCSN's 1 -> 0.01
    on [0, 1] pixels, doubled for [-1, 1]); options ``sigma_max``, ``n_sigmas``, ``eps``, ``steps_per_level``..."""
    image = _is_image(spec.shape)
    fixed = {"shape": tuple(spec.shape), "width": spec.width, "lr": spec.lr}
    if image:
        fixed.update(sigma_max=2.0, sigma_min=0.02, steps_per_level=100)
    return spec.construct(ScoreModel, **fixed)


def build_dae(spec: Any) -> DAE:
    """``python -m genlib train dae``: a single-level denoising autoencoder (option ``sigma``)."""
    return spec.construct(DAE, shape=tuple(spec.shape), width=spec.width, lr=spec.lr)
