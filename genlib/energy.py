"""Chapter 3: the energy view of GANs, GAN = "dig pits" + "jump in".

Source: Su Jianlin, "GANs from the energy viewpoint (1): GAN = digging pits + jumping in"
(kexue.fm/archives/6316, ``seeds/002_*.txt``), after Kumar et al., "Maximum Entropy Generators
for Energy-Based Models" (MEG, 2019).

**Sign convention (the whole module uses it).** ``U(x)`` is an *energy*: LOW on real data.

* The critic digs pits under the reals and raises the fakes onto the slopes; it minimises
  ``E_p[U] - E_q[U] + lam * E_p[||grad_x U||^2]`` (:func:`critic_loss` plus
  :func:`zero_centred_penalty`): the penalty asks for small slopes where the reals are. That
  does not make every real a minimum: in 1-D the optimum has ``U' ∝ (F_p - F_q) / p``
  (:func:`optimal_critic_slope_1d`), so U has a pit where ``F_p - F_q`` turns from negative to
  positive. N(1,1) fakes against N(0,1) data give none (``F_p > F_q`` everywhere: U only rises);
  wider N(0, 1.2^2) fakes give one under the data's single mode. On the 2-D ring the trained
  critic shows a pit near each mode.
* The generator lets the fakes roll downhill; it minimises ``E_z[U(G(z))]``
  (:func:`generator_energy_loss`), optionally minus ``weight * H(G(Z))`` so the fakes spread
  out instead of all rolling into one pit (:func:`knn_entropy`, or MEG's mutual-information
  surrogate :func:`jsd_mutual_information`); :func:`densest_disc` measures how crowded they are.

A usual GAN discriminator logit (high = real) is ``-U``; the WGAN critic ``f`` is ``-U`` too.
Hinge (:func:`hinge_critic_loss`) and EBGAN's margin (:func:`margin_loss`, for a non-negative
energy such as :class:`AutoencoderEnergy`, built on :func:`genlib.gan.reconstruction_energy`) are
written in the energy sign. Input gradients for the penalties come from :func:`genlib.gan.input_gradients`
(the one chapter import the design allows: the energy view reuses the GAN chapter's pieces).

What is here:

* pure losses and penalties; the closed-form 1-D optimal critic :func:`optimal_critic_slope_1d`,
  :func:`discretised_critic_optimum_1d`, which minimises the same objective directly on a grid, and
  :func:`fit_critic_1d`, which trains an MLP critic to compare with it;
* the Dirac-GAN (Mescheder et al., 2018), :func:`dirac_gan_trajectory`: oscillation without a
  penalty, convergence with R1;
* :class:`EnergyGAN` (MLPs for 2-D, DCGAN conv nets for images) trained by
  :func:`genlib.train.fit`, :func:`snapshot_recorder` for the energy-surface replay,
  the toy comparisons (:func:`compare_optimizers_on_grid`, :func:`compare_penalties`,
  :func:`compare_entropy`) and the CLI builder :func:`build_energy`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import scipy.sparse as sparse
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import spsolve
from torch import Tensor, nn

from genlib import data as gdata
from genlib import nets, runtime
from genlib.gan import AutoEncoder, gradient_penalty, input_gradients, reconstruction_energy
from genlib.evaluate import coverage_runs
from genlib.metrics import check_counts
from genlib.results import summarize_coverage
from genlib.train import GenerativeModel, SnapshotRecorder, at_least_fp32, fit, update_batches
from genlib.train import snapshot_recorder as train_snapshots

Critic = Callable[[Tensor], Tensor]
"""An energy ``U``: samples [n, ...] -> energies [n]."""

PENALTIES = ("r1", "wgan-gp", "none")
LOSSES = ("wasserstein", "hinge")
"""Critic losses :class:`EnergyGAN` accepts (its MLP / conv critic is signed)."""
OPTIMIZERS = ("adam", "sgd", "rmsprop")
ENTROPY_ESTIMATORS = ("knn", "mi")

# ==============================================================================================
# Losses and penalties (energy sign: low U = real)
# ==============================================================================================


def critic_loss(u_real: Tensor, u_fake: Tensor) -> Tensor:
    """Dig pits: ``mean U(real) - mean U(fake)`` (scalar) for energies [n] and [m]."""
    return u_real.mean() - u_fake.mean()


def hinge_critic_loss(u_real: Tensor, u_fake: Tensor) -> Tensor:
    """Hinge in the energy sign: ``mean relu(1 + U(real)) + mean relu(1 - U(fake))`` (scalar).

    Reals stop being pushed once ``U <= -1`` and fakes once ``U >= 1``, so the loss gives U no incentive to
    run off to -inf / +inf as the unpenalised linear loss does (shared weights can still carry samples past
    their thresholds; SNGAN, SAGAN, BigGAN use this loss).
    """
    return F.relu(1 + u_real).mean() + F.relu(1 - u_fake).mean()


def margin_loss(u_real: Tensor, u_fake: Tensor, m: float = 1.0) -> Tensor:
    """EBGAN's margin loss for a non-negative energy U (e.g. an autoencoder's error), scalar from [n], [m].

    ``mean U(real) + mean relu(m - U(fake))``: real energies are pushed to 0, fake ones only up to
    the margin ``m > 0``. With ``U >= 0`` the loss is bounded below by 0; the linear
    :func:`critic_loss` on the same U is not (``U(fake)`` can grow without limit).
    """
    return u_real.mean() + F.relu(m - u_fake).mean()


def generator_energy_loss(u_fake: Tensor) -> Tensor:
    """Jump in: the generator minimises ``mean U(G(z))`` (scalar) over fake energies [n]."""
    return u_fake.mean()


def zero_centred_penalty(critic: Critic, real: Tensor) -> Tensor:
    """R1: ``mean_i ||grad_x U(real_i)||^2`` (scalar); the critic adds ``lam`` times it.

    Convention: Mescheder et al. write ``(gamma / 2) E||grad D||^2`` in the paper while their
    reference code adds ``gamma * mean ||grad D||^2``; here ``lam`` multiplies the plain mean (as in
    the source and in MEG), so ``lam = gamma / 2`` reproduces the paper and ``lam = gamma`` the code.
    """
    return gradient_penalty(critic, real, target=0.0)


def interpolates(real: Tensor, fake: Tensor) -> Tensor:
    """WGAN-GP's penalty points [n, ...]: ``eps * real + (1 - eps) * fake`` with one eps ~ U[0, 1) per sample."""
    eps = torch.rand(real.shape[0], *([1] * (real.dim() - 1)), device=real.device, dtype=real.dtype)
    return eps * real + (1 - eps) * fake


def one_centred_penalty(critic: Critic, real: Tensor, fake: Tensor) -> Tensor:
    """WGAN-GP: ``mean (||grad_x U(x_hat)|| - 1)^2`` (scalar) on random interpolates of real and fake [n, ...]."""
    return gradient_penalty(critic, interpolates(real, fake), target=1.0)


def penalty(kind: str, critic: Critic, real: Tensor, fake: Tensor) -> Tensor:
    """The penalty ``kind`` ('r1', 'wgan-gp' or 'none' = 0) for a real and a fake batch."""
    if kind == "r1":
        return zero_centred_penalty(critic, real)
    if kind == "wgan-gp":
        return one_centred_penalty(critic, real, fake)
    if kind == "none":
        return real.new_zeros(())
    raise ValueError(f"penalty must be one of {PENALTIES}, got {kind!r}")


CRITIC_LOSSES: dict[str, Callable[..., Tensor]] = {
    "wasserstein": critic_loss, "hinge": hinge_critic_loss, "margin": margin_loss}
"""Critic losses by name, each ``(u_real [n], u_fake [m]) -> scalar``; 'margin' also takes ``m`` and
needs a non-negative energy (:class:`AutoencoderEnergy`)."""


def critic_objective(critic: Critic, real: Tensor, fake: Tensor, loss: str = "wasserstein",
                     penalty_kind: str = "r1", lam: float = 0.1, margin: float = 1.0) -> dict[str, Tensor]:
    """The critic's losses on real and (detached) fake batches: ``loss_u`` (minimised) = loss + lam * penalty.

    ``margin`` is the ``m`` of :func:`margin_loss` (used only by ``loss='margin'``). Also returns
    ``penalty``, ``gap = mean U(fake) - mean U(real)`` (positive once pits are dug) and the two
    means ``u_real`` and ``u_fake``.
    """
    if loss not in CRITIC_LOSSES:
        raise ValueError(f"loss must be one of {tuple(CRITIC_LOSSES)}, got {loss!r}")
    u_real, u_fake = at_least_fp32(critic(real)), at_least_fp32(critic(fake))  # the gap is a difference of means
    pen = penalty(penalty_kind, critic, real, fake)
    value = margin_loss(u_real, u_fake, margin) if loss == "margin" else CRITIC_LOSSES[loss](u_real, u_fake)
    return {"loss_u": value + lam * pen, "penalty": pen.detach(),
            "gap": (u_fake.mean() - u_real.mean()).detach(),
            "u_real": u_real.mean().detach(), "u_fake": u_fake.mean().detach()}


# ==============================================================================================
# The 1-D optimal critic
# ==============================================================================================

Tabulated = Tensor | np.ndarray | Callable[[Any], Any]


def optimal_critic_slope_1d(x_grid: Tensor | np.ndarray, p: Tabulated, F_p: Tabulated, F_q: Tabulated,
                            lam: float) -> Tensor | np.ndarray:
    """The optimal critic's slope ``U'(x) = (F_p(x) - F_q(x)) / (2 lam p(x))`` at ``x_grid`` [n].

    ``p`` is the data density, ``F_p`` and ``F_q`` the data and generator CDFs, each tabulated at
    ``x_grid`` (arrays/tensors [n]) or given as functions of it. Derivation: the critic minimises
    ``J[U] = int U (p - q) dx + lam int p U'^2 dx``. Its Euler-Lagrange equation
    ``(p - q) - d/dx (2 lam p U') = 0`` integrates to ``2 lam p U' = F_p - F_q + C``; at
    ``x -> -inf`` both ``p U'`` (natural boundary condition) and ``F_p - F_q`` vanish, so ``C = 0``.
    Sign check: where the data lie left of the fakes, ``F_p > F_q``, so ``U' > 0``: U rises from the
    reals towards the fakes, low on real data as the energy convention demands, and fakes rolling
    downhill (``-U'``) move towards the reals. ``U`` itself is fixed only up to a constant. U has a
    minimum (a pit) where ``F_p - F_q`` turns from negative to positive, a maximum where it turns back.

    When it is the minimiser: integrating the first term by parts and completing the square gives
    ``J[U] = lam int p (U' - U'_*)^2 dx - int (F_p - F_q)^2 / (4 lam p) dx`` with ``U'_*`` this slope, so
    it minimises J (uniquely up to a constant) exactly when the last integral is finite. That needs
    ``p > 0`` wherever ``F_p != F_q`` (checked on ``x_grid``: ValueError otherwise), and q's tails no
    heavier than p's allow: for p = N(0, 1) and q = N(0, s^2) only ``s^2 <= 2``. Otherwise J is unbounded
    below: where p vanishes or is too thin while ``F_p != F_q`` (e.g. where fakes have mass and the data
    none), the penalty cannot hold the slope back, and U there (on such fakes) rises without limit.
    """
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    p, F_p, F_q = (f(x_grid) if callable(f) else f for f in (p, F_p, F_q))
    if bool(((p <= 0) & (F_p != F_q)).any()):
        raise ValueError("p must be > 0 wherever F_p != F_q: there the optimal slope is infinite "
                         "and the critic's objective J is unbounded below")
    return (F_p - F_q) / (2 * lam * p)


def discretised_critic_optimum_1d(x: np.ndarray | Tensor, p: np.ndarray | Tensor, q: np.ndarray | Tensor,
                                  lam: float) -> tuple[np.ndarray, float]:
    """Minimise the critic's objective J directly on a uniform grid x [n]: (slope at the n - 1 midpoints, min J).

    An independent check of :func:`optimal_critic_slope_1d`: it uses only the densities p and q tabulated at
    x [n], no CDFs and no Euler-Lagrange equation. p and q are first renormalised to sum to 1 on the grid
    (then J does not change when U is shifted by a constant); the discretised
    ``J(u) = dx sum_i u_i (p_i - q_i) + lam dx sum_i p_(i+1/2) ((u_(i+1) - u_i) / dx)^2`` (``p_(i+1/2)`` the
    mean of the two neighbours) is a convex quadratic in the values u [n]; with u pinned to 0 where p is largest
    (pinned where p is tiny, the solve loses accuracy when p spans many orders of magnitude), its minimiser solves
    the sparse linear system ``grad J = 0``. No boundary condition is imposed: the ends
    get J's own natural one. Widening the grid shows whether J is bounded below: min J settles when it is,
    and keeps falling when q's tails are too heavy for p's (e.g. p = N(0, 1), q = N(0, s^2) with s^2 > 2).
    """
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    x, p, q = (np.asarray(a.detach().cpu() if isinstance(a, Tensor) else a, dtype=np.float64) for a in (x, p, q))
    if x.ndim != 1 or len(x) < 3 or p.shape != x.shape or q.shape != x.shape:
        raise ValueError(f"need a 1-D grid x of at least 3 points and p, q of its shape; got x {x.shape}, "
                         f"p {p.shape}, q {q.shape}")
    dx = x[1] - x[0]
    if not (dx > 0 and np.allclose(np.diff(x), dx, rtol=1e-6, atol=0)):
        raise ValueError("x must be uniform and increasing")
    if not (np.isfinite(p).all() and np.isfinite(q).all() and (p > 0).all() and (q >= 0).all() and q.sum() > 0):
        raise ValueError("need finite densities with p > 0 at every grid point and q >= 0 with some mass")
    n = len(x)
    p, q = p / (p.sum() * dx), q / (q.sum() * dx)
    diff = sparse.diags([-np.ones(n - 1), np.ones(n - 1)], [0, 1], shape=(n - 1, n)) / dx  # (D u)_i = U' at midpoint i
    p_mid = (p[1:] + p[:-1]) / 2
    hessian = (2 * lam * dx * (diff.T @ sparse.diags(p_mid) @ diff)).tocsc()
    free = np.arange(n) != np.argmax(p)
    u = np.zeros(n)
    u[free] = spsolve(hessian[free][:, free], -dx * (p - q)[free])
    slope = diff @ u
    return slope, float(dx * np.sum(u * (p - q)) + lam * dx * np.sum(p_mid * slope**2))


class EnergyMLP(nn.Module):
    """A scalar energy for vectors: ``x`` [n, d] -> ``U(x)`` [n] (an :class:`genlib.nets.MLP` with one output)."""

    def __init__(self, in_dim: int, hidden: int = 128, depth: int = 3, act: str = "relu"):
        super().__init__()
        self.net = nets.MLP(in_dim, 1, hidden, depth, act)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)


class AutoencoderEnergy(nn.Module):
    """EBGAN's non-negative energy for vectors: ``x`` [n, d] -> ``U(x)`` [n] = mean squared error of an MLP autoencoder.

    Encoder d -> ``code_dim`` and decoder back, MLPs of ``hidden`` x ``depth`` in EBGAN's
    :class:`genlib.gan.AutoEncoder`; the error is :func:`genlib.gan.reconstruction_energy`, so ``U >= 0``.
    """

    def __init__(self, in_dim: int, code_dim: int = 2, hidden: int = 64, depth: int = 2, act: str = "relu"):
        super().__init__()
        self.autoencoder = AutoEncoder(nets.MLP(in_dim, code_dim, hidden, depth, act),
                                       nets.MLP(code_dim, in_dim, hidden, depth, act))

    def forward(self, x: Tensor) -> Tensor:
        return reconstruction_energy(self.autoencoder(x)[0], x)


class CriticFit(GenerativeModel):
    """Only the "dig pits" step: trains a critic of vectors against a FIXED fake set (the frozen generator).

    Reals come from :func:`genlib.train.fit`'s sampler; fakes are drawn from ``fake`` [M, d]. ``loss`` is a
    key of :data:`CRITIC_LOSSES` ('margin' with margin ``margin`` and a non-negative critic such as
    :class:`AutoencoderEnergy`).
    ``sample(n)`` draws from the fixed fakes (the frozen generator's distribution q).
    """

    def __init__(self, critic: nn.Module, fake: Tensor, lam: float, penalty_kind: str = "r1",
                 loss: str = "wasserstein", lr: float = 2e-3, betas: tuple[float, float] = (0.5, 0.9),
                 margin: float = 1.0):
        super().__init__()
        _check_choice("loss", loss, tuple(CRITIC_LOSSES))
        _check_choice("penalty_kind", penalty_kind, PENALTIES)
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        if loss == "margin" and not margin > 0:
            raise ValueError(f"the margin loss needs margin m > 0, got {margin}")
        self.critic, self.lam, self.penalty_kind, self.loss, self.margin = critic, lam, penalty_kind, loss, margin
        self.register_buffer("fake", fake)
        self.optimizers = {"u": make_optimizer(critic.parameters(), "adam", lr, betas)}

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """n fakes [n, d] drawn with replacement from the fixed set."""
        return self.fake[torch.randint(len(self.fake), (n,), device=self.fake.device)]

    def step(self, x: Tensor, index: Tensor) -> dict[str, Tensor]:
        """One critic update on reals x [B, d] against B fixed fakes."""
        losses = critic_objective(self.critic, x, self.sample(len(x)), self.loss, self.penalty_kind, self.lam,
                                  self.margin)
        self.update("u", losses["loss_u"])
        return losses


def fit_critic_1d(real: Tensor, fake: Tensor, lam: float = 0.5, steps: int = 300, batch_size: int = 1024,
                  hidden: int = 64, depth: int = 2, lr: float = 2e-3, seed: int = 0,
                  progress: bool = False) -> EnergyMLP:
    """Train an R1-penalised MLP critic ``U`` [n, 1] -> [n] on 1-D samples real [N] ~ p and fake [M] ~ q.

    A smooth (softplus) MLP, so ``U'`` (see :func:`energy_slope`) is smooth enough to compare
    with :func:`optimal_critic_slope_1d` where p has mass. Where the data are rare the penalty, weighted
    by p, barely holds the slope, so there the trained slope depends on the training length (measured for N(0,1) vs
    N(1,1), lam 0.5: at x = 2 from 7 % below to 13 % above the closed form between 100 and 1,000 steps, no trend).
    """
    runtime.seed_everything(seed)
    critic = EnergyMLP(1, hidden, depth, act="softplus")
    model = CriticFit(critic, fake.reshape(-1, 1).float(), lam, lr=lr)
    sampler = gdata.BatchSampler(real.reshape(-1, 1).float(), batch_size, seed=seed)
    fit(model, sampler, steps, log_every=max(steps // 10, 1), progress=progress, desc="critic 1-D")
    return critic.eval()


def energy_slope(critic: Critic, x: Tensor) -> Tensor:
    """``dU/dx`` [n] of a 1-D critic at points x [n] (no graph kept)."""
    return input_gradients(critic, x.reshape(-1, 1).float()).reshape(-1).detach()


# ==============================================================================================
# Entropy estimators
# ==============================================================================================


def log_unit_ball_volume(d: int) -> float:
    """``log V_d`` with ``V_d = pi^(d/2) / Gamma(d/2 + 1)``, the volume of the unit ball in R^d."""
    return 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1)


def knn_entropy(samples: Tensor, k: int = 1) -> Tensor:
    """Kozachenko-Leonenko estimate of the differential entropy (nats, scalar) of samples [N, d].

    ``H = psi(N) - psi(k) + log V_d + (d / N) sum_i log r_i`` where ``r_i`` is the distance from
    sample i to its k-th nearest other sample, ``psi`` the digamma function and ``V_d`` the volume
    of the unit ball (:func:`log_unit_ball_volume`; ``psi(1) = -0.5772``). Why: the mass of p in
    the ball of radius ``r_i`` around ``x_i`` is about ``p(x_i) V_d r_i^d``, and its log has
    expectation ``psi(k) - psi(N)`` (the k-th of N - 1 uniform order statistics); solve for
    ``log p(x_i)`` and average ``-log p``. Differentiable w.r.t. the samples: neighbours are found
    without gradients, then the chosen distances are recomputed with them (the argmin is piecewise
    constant, so this is the exact gradient almost everywhere). Spreading the samples raises it.
    Memory: one [N, N] distance matrix.
    """
    n, d = samples.shape[0], samples[0].numel()
    if not 1 <= k < n:
        raise ValueError(f"need 1 <= k < number of samples, got k={k} with {n} samples")
    flat = at_least_fp32(samples.flatten(1))  # bf16 fakes' differences would round the distances
    with torch.no_grad():
        # Exact neighbours: cdist's default GEMM expansion ||a||^2 + ||b||^2 - 2ab cancels catastrophically for a
        # tight cluster away from the origin (a collapsed generator), returning zeros and wrong neighbours.
        flat64 = flat.double()
        centred = flat64 - flat64.mean(0)
        dist = torch.cdist(centred, centred, compute_mode="donot_use_mm_for_euclid_dist")
        dist.fill_diagonal_(math.inf)
        neighbour = dist.topk(k, dim=1, largest=False).indices[:, -1]
    sq = (flat - flat[neighbour]).pow(2).sum(1)
    # Half the log of the squared distance: no sqrt, so no infinite gradient at coincident points;
    # the floor keeps duplicates (a collapsed generator) finite.
    log_r = 0.5 * sq.clamp_min(1e-12).log()
    const = torch.special.digamma(torch.tensor(float(n))) - torch.special.digamma(torch.tensor(float(k)))
    return const.item() + log_unit_ball_volume(d) + d * log_r.mean()


def gaussian_entropy(cov: Tensor) -> float:
    """Closed-form entropy (nats) of a Gaussian with covariance [d, d]: ``0.5 log det(2 pi e cov)``."""
    d = cov.shape[0]
    return 0.5 * (d * math.log(2 * math.pi * math.e) + torch.logdet(cov.double()).item())


def densest_disc(samples: Tensor, radius: float) -> tuple[float, Tensor]:
    """How crowded samples [n, d] are: the largest share of them within ``radius`` of one sample, and that sample [d].

    Each sample is a candidate centre; a sample at distance exactly ``radius`` counts (ties go to the first
    centre). With ``radius`` = 3 std of a mixture's component, it measures mode collapse directly: fakes that
    crowd into one pit put most of their share in one disc, however far from the data it lies, while data
    with k equal modes put about 1 / k there. Memory: one [n, n] distance matrix.
    """
    if samples.dim() != 2 or len(samples) == 0:
        raise ValueError(f"samples must be a non-empty [n, d] tensor, got shape {tuple(samples.shape)}")
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    with torch.no_grad():
        counts = (torch.cdist(samples.double(), samples.double()) <= radius).sum(1)
    best = int(counts.argmax())
    return counts[best].item() / len(samples), samples[best].detach()


def slope_norms(energy_fn: Callable[[Tensor], Tensor], points: Tensor) -> Tensor:
    """``||grad U(x)||`` [n] at points [n, ...]: how steep the landscape is under each point (no graph kept; like
    :func:`genlib.gan.input_gradients`, right only for an energy without BatchNorm)."""
    return input_gradients(energy_fn, points).flatten(1).norm(dim=1).detach()


def pit_depth(energy_fn: Callable[[Tensor], Tensor], centre: Tensor, radius: float, directions: int = 64) -> float:
    """How much higher than a 2-D point ``centre`` [2] the lowest of ``directions`` equally spaced points on the
    circle of ``radius`` around it lies: ``min U(circle) - U(centre)``. Positive: the centre lies in a pit at that
    scale (the disc holds a point lower than its whole rim); negative: some point at that distance lies lower."""
    if centre.shape != (2,):
        raise ValueError(f"centre must be a 2-D point of shape (2,), got {tuple(centre.shape)}")
    if not radius > 0 or directions < 3:
        raise ValueError(f"need radius > 0 and directions >= 3, got {radius} and {directions}")
    angles = torch.arange(directions, dtype=torch.float64, device=centre.device) * (2 * math.pi / directions)
    circle = centre.double() + radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    with torch.no_grad():
        energies = energy_fn(torch.cat([centre.double()[None], circle]).to(centre.dtype)).double()
    return (energies[1:].min() - energies[0]).item()


def modes_in_pits(energy_fn: Callable[[Tensor], Tensor], modes: Tensor, radii: Sequence[float]) -> list[int]:
    """Per radius of ``radii``: how many of the 2-D mode centres [k, 2] lie in a pit of U at that scale
    (:func:`pit_depth` > 0)."""
    return [sum(pit_depth(energy_fn, mode, radius) > 0 for mode in modes) for radius in radii]


def landscape_summary(energy_fn: Callable[[Tensor], Tensor], reals: Tensor, fakes: Tensor, modes: Tensor,
                      radii: Sequence[float] = (0.05, 0.15)) -> dict[str, Any]:
    """Where a 2-D critic holds reals [n, 2] and fakes [m, 2] against mixture ``modes`` [k, 2]: gap
    (E_fakes[U] - E_reals[U]), pits (:func:`modes_in_pits` at ``radii``), median_slope (median ``||grad U||`` at
    the reals) and fakes_radius (their mean norm)."""
    if reals.dim() != 2 or reals.shape[1] != 2 or fakes.dim() != 2 or fakes.shape[1] != 2:
        raise ValueError(f"reals and fakes must be [n, 2], got {tuple(reals.shape)} and {tuple(fakes.shape)}")
    with torch.no_grad():
        gap = (energy_fn(fakes).mean() - energy_fn(reals).mean()).item()
    return {"gap": gap, "pits": modes_in_pits(energy_fn, modes, radii),
            "median_slope": slope_norms(energy_fn, reals).median().item(),
            "fakes_radius": fakes.norm(dim=1).mean().item()}


def jsd_mutual_information(t_joint: Tensor, t_marginal: Tensor) -> Tensor:
    """Jensen-Shannon MI surrogate (Deep InfoMax, used by MEG): scalar from statistics [n], [m]; a lower bound on
    2 JS(joint || product of marginals) - 2 log 2, reached by the optimal statistic.

    ``E_joint[-softplus(-T(x, z))] - E_marginal[softplus(T(x, z'))]``: large when the statistics
    network can tell matched pairs ``(G(z), z)`` from shuffled ones, i.e. when z can be recovered
    from x. A generator that maps many z to the same x cannot make it large, so maximising it
    fights mode collapse; it stands in for the entropy ``H(G(Z))`` (MEG's argument).
    """
    return -F.softplus(-t_joint).mean() - F.softplus(t_marginal).mean()


# ==============================================================================================
# The Dirac-GAN
# ==============================================================================================


def dirac_gan_trajectory(penalty_kind: str = "none", lam: float = 1.0, steps: int = 300, lr: float = 0.1,
                         theta0: float = 1.0, psi0: float = 1.0, loss: str = "wasserstein",
                         alternating: bool = False) -> Tensor:
    """The Dirac-GAN path (theta, psi) [steps + 1, 2] under gradient descent with learning rate ``lr``.

    Mescheder et al.'s toy: data is a point mass at 0, the generator a point mass at ``theta``, the
    energy linear, ``U_psi(x) = psi x``. The critic minimises :func:`critic_objective`
    (``-psi theta + lam * penalty``; R1 adds ``lam psi^2``), the generator ``U_psi(theta) = psi theta``.
    Without a penalty the field is a pure rotation: simultaneous steps spiral out (the radius grows
    by ``sqrt(1 + lr^2)`` per step), alternating ones circle; R1 damps psi and both converge to (0, 0).
    The same loss functions as the real models are used, through autograd.
    """
    theta = torch.tensor([[theta0]], dtype=torch.float64, requires_grad=True)
    psi = torch.tensor(psi0, dtype=torch.float64, requires_grad=True)
    real = torch.zeros(1, 1, dtype=torch.float64)

    def critic(x: Tensor) -> Tensor:
        return psi * x[:, 0]

    def psi_grad() -> Tensor:
        loss_u = critic_objective(critic, real, theta.detach(), loss, penalty_kind, lam)["loss_u"]
        return torch.autograd.grad(loss_u, psi)[0]

    def theta_grad() -> Tensor:
        return torch.autograd.grad(psi.detach() * theta[0, 0], theta)[0]

    path = [(theta0, psi0)]
    for _ in range(steps):
        g_psi = psi_grad()
        g_theta = None if alternating else theta_grad()  # simultaneous: both gradients at the old point
        with torch.no_grad():
            psi -= lr * g_psi
        if alternating:  # the generator sees the critic's new slope
            g_theta = theta_grad()
        with torch.no_grad():
            theta -= lr * g_theta
        path.append((theta.item(), psi.item()))
    return torch.tensor(path)


# ==============================================================================================
# EnergyGAN
# ==============================================================================================


def make_optimizer(params: Iterable[nn.Parameter], kind: str, lr: float, betas: tuple[float, float] = (0.5, 0.9),
                   momentum: float = 0.0) -> torch.optim.Optimizer:
    """Adam (``betas``), SGD (``momentum``) or RMSprop (R1's reference optimiser) over ``params``."""
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    if kind == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {kind!r}")


class EnergyGAN(GenerativeModel):
    """GAN in the energy view: ``critic_steps`` "dig pits" updates of U, then one "jump in" update of G.

    ``shape`` (2,) gives ReLU MLPs (width x depth); ``(C, H, W)`` gives DCGAN conv nets with a
    normalisation-free critic (penalties need per-sample gradients). Options:

    * ``penalty``: 'r1' (zero-centred, on reals), 'wgan-gp' (one-centred, on interpolates), 'none';
      ``lam`` its weight. ``loss``: 'wasserstein' (linear) or 'hinge' (energy sign).
    * ``optimizer``: 'adam' (``betas``), 'sgd' (``momentum``) or 'rmsprop', for both players;
      ``lr`` for both unless ``lr_u`` / ``lr_g`` are given. ``critic_optimizer`` overrides the
      critic's (keys of :func:`make_optimizer`: kind, lr, betas, momentum), e.g. to vary only the
      generator's momentum, the player whose fakes "roll into pits".
    * ``fresh_reals`` (default True): each critic update gets its own real batch (the loop draws
      ``critic_steps`` per step, as WGAN-GP's and MEG's loops draw one per critic iteration); False reuses one.
    * ``entropy``: weight w of ``-H(G(Z))`` in the generator loss, estimated per batch by
      :func:`knn_entropy` (``entropy_estimator='knn'``, neighbour ``knn_k``) or by MEG's
      :func:`jsd_mutual_information` with a statistics network T(x, z) ('mi', vectors only; an MLP with two
      hidden layers of ``width``).
    """

    def __init__(self, shape: Sequence[int] = (2,), z_dim: int = 2, width: int = 128, depth: int = 3, *,
                 penalty: str = "r1", lam: float = 0.1, loss: str = "wasserstein", critic_steps: int = 5,
                 optimizer: str = "adam", lr: float = 1e-3, lr_u: float | None = None, lr_g: float | None = None,
                 betas: tuple[float, float] = (0.5, 0.9), momentum: float = 0.0,
                 critic_optimizer: Mapping[str, Any] | None = None, entropy: float = 0.0,
                 entropy_estimator: str = "knn", knn_k: int = 1, fresh_reals: bool = True):
        super().__init__()
        _check_choice("penalty", penalty, PENALTIES)
        _check_choice("loss", loss, LOSSES)
        _check_choice("entropy_estimator", entropy_estimator, ENTROPY_ESTIMATORS)
        check_counts(1, depth=depth)
        if critic_steps < 1:
            raise ValueError(f"critic_steps must be >= 1, got {critic_steps}")
        self.shape, self.z_dim = tuple(shape), z_dim
        self.penalty, self.lam, self.loss, self.critic_steps = penalty, lam, loss, critic_steps
        self.batches_per_step = critic_steps if fresh_reals else 1  # fit draws a real batch per critic update
        self.entropy, self.entropy_estimator, self.knn_k = entropy, entropy_estimator, knn_k
        self.generator, self.critic = _make_nets(self.shape, z_dim, width, depth)
        opt = dict(kind=optimizer, betas=tuple(betas), momentum=momentum)
        self.optimizers = {
            "u": make_optimizer(self.critic.parameters(), **{"lr": lr_u or lr, **opt, **(critic_optimizer or {})}),
            "g": make_optimizer(self.generator.parameters(), lr=lr_g or lr, **opt)}
        if entropy and entropy_estimator == "mi":
            if len(self.shape) != 1:
                raise ValueError("entropy_estimator='mi' is implemented for vectors; use 'knn' for images")
            self.statistics = EnergyMLP(self.shape[0] + z_dim, width, 2, act="relu")
            self.optimizers["t"] = make_optimizer(self.statistics.parameters(), "adam", lr_g or lr, tuple(betas))

    @property
    def graph_safe(self) -> bool:
        """A CUDA graph can replay the step without the entropy term (its estimators are not checked for it)."""
        return not self.entropy

    def noise(self, n: int) -> Tensor:
        """Latent codes z ~ N(0, I) [n, z_dim] on the model's device."""
        return torch.randn(n, self.z_dim, device=self.device)

    def energy(self, x: Tensor) -> Tensor:
        """``U(x)`` [n] for samples x ``[n, *shape]``, in fp32; low = real."""
        return at_least_fp32(self.critic(x))

    def critic_losses(self, real: Tensor, fake: Tensor) -> dict[str, Tensor]:
        """Dig pits: the critic's losses on reals and (detached) fakes ``[B, *shape]``; ``loss_u`` is minimised."""
        return critic_objective(self.critic, real, fake, self.loss, self.penalty, self.lam)

    def generator_losses(self, n: int) -> dict[str, Tensor]:
        """Jump in: ``loss_g = mean U(G(z)) - entropy * H`` for n fresh fakes, with its parts."""
        z = self.noise(n)
        fake = self.generator(z)
        energy = generator_energy_loss(self.energy(fake))
        out = {"loss_g": energy, "energy_g": energy.detach()}
        if self.entropy:
            h = knn_entropy(fake, self.knn_k) if self.entropy_estimator == "knn" else self._mutual_information(fake, z)
            out.update(loss_g=energy - self.entropy * h, entropy=h)
        return out

    def _mutual_information(self, fake: Tensor, z: Tensor) -> Tensor:
        """MEG's surrogate: JSD-MI between fakes [n, d] and their codes [n, z_dim] (codes shuffled for the marginal)."""
        joint = self.statistics(torch.cat([fake, z], 1))
        marginal = self.statistics(torch.cat([fake, z[torch.randperm(len(z), device=z.device)]], 1))
        return jsd_mutual_information(joint, marginal)

    def step(self, x: Tensor, index: Tensor) -> dict[str, Tensor]:
        """``critic_steps`` critic updates, each on fresh fakes and (with ``fresh_reals``) its own batch of the
        ``batches_per_step`` that x joins, then one generator update on a batch's worth of fakes."""
        for real in update_batches(x, self.batches_per_step, self.critic_steps):
            with torch.no_grad():
                fake = self.generator(self.noise(len(real)))
            u_losses = self.critic_losses(real, fake)
            self.update("u", u_losses["loss_u"])
        g_losses = self.generator_losses(len(real))
        players = ["g"]
        if "t" in self.optimizers:  # T maximises the MI estimate that G also maximises
            self.backward("t", -g_losses["entropy"], retain_graph=True)
            players.append("t")
        self.backward("g", g_losses["loss_g"])
        for name in players:  # step only now: both backward passes needed the old weights
            self.optimizers[name].step()
        return {**u_losses, **{k: v.detach() for k, v in g_losses.items()}}

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """n samples ``[n, *shape]`` from the EMA generator when kept, else the live one."""
        return self.sampling_net()(self.noise(n))

    def ema_source(self) -> nn.Module:
        return self.generator


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    """Raise a clear ValueError unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def _make_nets(shape: tuple[int, ...], z_dim: int, width: int, depth: int) -> tuple[nn.Module, nn.Module]:
    """(generator z [n, z_dim] -> [n, *shape], critic [n, *shape] -> [n]): MLPs for vectors, conv nets for images."""
    if len(shape) == 1:
        return nets.MLP(z_dim, shape[0], width, depth), EnergyMLP(shape[0], width, depth)
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(f"shape must be (d,) or square images (C, H, H), got {shape}")
    channels, resolution = shape[0], shape[1]
    return (nets.ConvGenerator(z_dim, resolution, channels, width),
            nets.ConvCritic(resolution, channels, width, norm="none"))


# ==============================================================================================
# Recording training for the energy-surface replay
# ==============================================================================================


def snapshot_recorder(model: EnergyGAN, every: int = 50, lim: float = 3.0, resolution: int = 64,
                      n_fakes: int = 512, seed: int = 0) -> SnapshotRecorder:
    """A :class:`genlib.train.SnapshotRecorder` of the fakes of fixed codes (so each can be followed) and
    of the energy U on a ``resolution`` x ``resolution`` grid over [-lim, lim]^2 (its ``fields``, raw:
    U is defined up to a constant); step 0 is recorded at once."""
    return train_snapshots(model, EnergyGAN.energy, every, lim, resolution, n_fakes, seed)


# ==============================================================================================
# Toy comparisons
# ==============================================================================================

# Measured on ring8 (std 0.05), seed 0, one CPU thread, when the recipe was chosen: one critic step per
# generator step with a critic learning rate twice the generator's (4e-3 / 2e-3) reached hq 0.47 after 600
# steps in 4.9 s (chapter 3's replay of that setting now prints 0.41); the WGAN-GP/MEG toy recipe of 5
# critic steps at equal rates (1e-3) reached 0.33 after 500 steps in 15 s (its critic steps then shared one real
# batch). The tables use the cheaper recipe; the CLI builder keeps 5 critic steps.
CRITIC_ADAM: dict[str, Any] = dict(kind="adam", betas=(0.5, 0.9), momentum=0.0)
"""The critic's optimiser in every toy setting that varies only the generator's."""

TOY_DEFAULTS: dict[str, Any] = dict(z_dim=2, width=64, depth=3, penalty="r1", lam=0.1, critic_steps=1,
                                    optimizer="adam", lr_u=4e-3, lr_g=2e-3, betas=(0.5, 0.9))
"""The base setting every toy comparison starts from (each row changes a few entries)."""

TOY_BATCH_SIZE = 256
"""The batch of the toy comparisons (chapter 3's grid table halves it to save CPU time)."""

OPTIMIZER_SETTINGS: dict[str, dict[str, Any]] = {
    "G: Adam beta1=0": dict(betas=(0.0, 0.9), critic_optimizer=CRITIC_ADAM),
    "G: Adam beta1=0.5": dict(betas=(0.5, 0.9), critic_optimizer=CRITIC_ADAM),
    "G: Adam beta1=0.9": dict(betas=(0.9, 0.9), critic_optimizer=CRITIC_ADAM),
    "G: SGD lr 1e-3": dict(optimizer="sgd", lr_g=1e-3, momentum=0.0, critic_optimizer=CRITIC_ADAM),
    "G: SGD lr 1e-3, momentum 0.9": dict(optimizer="sgd", lr_g=1e-3, momentum=0.9, critic_optimizer=CRITIC_ADAM),
}
"""Only the generator's optimiser varies (the critic stays on :data:`CRITIC_ADAM`). SGD's rate is 1e-3
because at 1e-2 plain SGD covers only 1 to 4 of grid25's modes in 600 steps (chapter 3 prints that row)."""

PENALTY_SETTINGS: dict[str, dict[str, Any]] = {
    "none": dict(penalty="none"),
    "R1 (zero-centred, reals)": dict(penalty="r1"),
    "WGAN-GP (one-centred, interpolates)": dict(penalty="wgan-gp"),
}

AGGRESSIVE_G: dict[str, Any] = dict(optimizer="sgd", lr_g=0.03, critic_optimizer=CRITIC_ADAM)
"""A generator step large enough that the fakes crowd together (chapter 3 measures 43 % to 88 % of them in one
disc the size of a mode, off the data; after the last step that spot is no pit of the critic, which slopes there)."""

ENTROPY_SETTINGS: dict[str, dict[str, Any]] = {
    "SGD 0.03, no entropy": dict(AGGRESSIVE_G),
    **{f"SGD 0.03, kNN entropy w={w:g}": dict(AGGRESSIVE_G, entropy=w) for w in (0.1, 0.3, 1.0)},
    "Adam, no entropy": {},
    "Adam, kNN entropy w=0.3": dict(entropy=0.3),
}
"""The collapse-prone generator (:data:`AGGRESSIVE_G`) without and with the entropy term at three weights, and the
default Adam generator (the R1 row of :data:`PENALTY_SETTINGS`) without and with it."""


STABILITY_COLUMNS: dict[str, str] = {"late_gap": "late |gap|", "gap_flips": "gap sign flips"}
"""The stability fields of a toy run (:func:`gap_stability`) and their headers in the chapter's tables."""


def gap_stability(gaps: Sequence[float]) -> dict[str, float]:
    """How steady a run's critic was, from its logged gaps E_q[U] - E_p[U] (window means in training order):
    late_gap, the largest absolute gap over the second half of the windows (how far apart the critic still holds
    fakes and reals late in training: large where the landscape swings or keeps deepening, and also where the
    generator never reaches the data), and gap_flips, the times the gap changed sign (the fakes sitting lower than
    the reals, then higher again, or the reverse; a window at exactly 0 has no sign and is
    skipped). NaN windows are left out; NaN for both when none is left (a diverged run logs nothing)."""
    gaps = [gap for gap in gaps if not math.isnan(gap)]
    if not gaps:
        return {"late_gap": math.nan, "gap_flips": math.nan}
    late = gaps[len(gaps) // 2:]
    signs = [gap > 0 for gap in gaps if gap != 0]
    flips = sum(before != after for before, after in zip(signs, signs[1:]))
    return {"late_gap": max(abs(gap) for gap in late), "gap_flips": float(flips)}


def compare_on_toy(settings: Mapping[str, Mapping[str, Any]], toy_name: str = "ring8", toy_std: float | None = 0.05,
                   seeds: Sequence[int] = (0, 1, 2), steps: int = 600, batch_size: int = TOY_BATCH_SIZE,
                   n_data: int = 20_000, n_samples: int = 2500, base: Mapping[str, Any] | None = None,
                   device: str = "cpu", progress: bool = False, workers: int = 1,
                   keep_samples: bool = False, keep_models: bool = False) -> list[dict[str, Any]]:
    """Train an :class:`EnergyGAN` per setting and seed on toy ``toy_name`` through :func:`genlib.train.fit`.

    ``toy_std`` overrides the toy's component std (None keeps it; 0.05 on ``ring8`` is sharp enough to
    show mode collapse and loose enough to be learnt in a few hundred CPU steps). Each setting's kwargs
    override ``base`` (default :data:`TOY_DEFAULTS`). One row per run: setting, seed, modes (covered),
    total_modes, hq (fraction of ``n_samples`` within 3 std of a mode), mode_counts (the high-quality
    samples at each mode, :func:`genlib.metrics.mode_counts`), seconds (wall), cpu_seconds (process CPU
    time, stable on a shared machine), diverged (a non-finite loss stopped it; then modes = hq = 0), the critic's
    logged gaps (gaps, the window means) and their :func:`gap_stability` (late_gap, gap_flips);
    with ``keep_samples`` also samples, the scored samples [n_samples, 2] (None if diverged), and with
    ``keep_models`` model, the trained :class:`EnergyGAN` on the CPU. ``workers`` > 1
    trains that many runs at once, each in its own process on one thread (:func:`genlib.evaluate.coverage_runs`);
    the rows are the same.
    """
    runs = [(name, seed) for name in settings for seed in seeds]
    return runtime.in_call_order(toy_runs(runs, toy_name, steps, batch_size, settings, toy_std=toy_std, n_data=n_data,
                                          n_samples=n_samples, base=base, device=device, progress=progress,
                                          workers=workers, keep_samples=keep_samples, keep_models=keep_models))


def toy_runs(runs: Sequence[tuple[str, int]], toy_name: str, steps: int, batch_size: int,
             settings: Mapping[str, Mapping[str, Any]], *, toy_std: float | None = 0.05, n_data: int = 20_000,
             n_samples: int = 2500, base: Mapping[str, Any] | None = None, device: str = "cpu",
             progress: bool = False, workers: int = 1, keep_samples: bool = False,
             threads: int | None = 1, keep_models: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """The runs of :func:`compare_on_toy` one by one: yields ``(i, row)`` for each ``(setting, seed)`` of ``runs``
    as it finishes (in order on one worker, on ``threads`` torch threads), so that a caller can save each row at
    once (``python -m genlib compare --family energy``); the other arguments are :func:`compare_on_toy`'s."""
    unknown = sorted({name for name, _ in runs} - set(settings))
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(settings)}")
    defaults = TOY_DEFAULTS if base is None else base
    jobs = [(partial(EnergyGAN, (2,), **{**defaults, **settings[name]}), seed, f"{name} {seed}") for name, seed in runs]
    for i, row in coverage_runs(jobs, toy_name, steps, batch_size, {} if toy_std is None else {"std": toy_std},
                                workers=workers, progress=progress, threads=threads, n_data=n_data,
                                n_samples=n_samples, device=device, keep_samples=keep_samples, track=("gap",),
                                keep_model=keep_models):
        gaps = row.pop("history")["gap"]
        yield i, {"setting": runs[i][0], "seed": runs[i][1], **row, "gaps": gaps, **gap_stability(gaps)}


def compare_optimizers_on_grid(settings: Mapping[str, Mapping[str, Any]] | None = None,
                               **kw: Any) -> list[dict[str, Any]]:
    """:func:`compare_on_toy` on the 25-Gaussian grid (``grid25``, its own std 0.05) over ``settings``
    (default :data:`OPTIMIZER_SETTINGS`: the generator on Adam beta1 0 / 0.5 / 0.9 and SGD without / with
    momentum); ``kw`` go to :func:`compare_on_toy` (a ``toy_name`` / ``toy_std`` there overrides the grid)."""
    kw = {"toy_name": "grid25", "toy_std": None, **kw}
    return compare_on_toy(OPTIMIZER_SETTINGS if settings is None else settings, **kw)


TOY_TABLES: dict[str, dict[str, dict[str, Any]]] = {
    "penalties": PENALTY_SETTINGS, "optimizers": OPTIMIZER_SETTINGS, "entropy": ENTROPY_SETTINGS}
"""The chapter's toy comparisons by name, as ``python -m genlib compare --family energy --setting NAME`` runs them."""


def compare_penalties(**kw: Any) -> list[dict[str, Any]]:
    """:func:`compare_on_toy` over :data:`PENALTY_SETTINGS` (none, R1 on reals, WGAN-GP on interpolates)."""
    return compare_on_toy(PENALTY_SETTINGS, **kw)


def compare_entropy(**kw: Any) -> list[dict[str, Any]]:
    """:func:`compare_on_toy` over :data:`ENTROPY_SETTINGS`: the kNN entropy term's weight, on a collapse-prone
    generator (SGD 0.03) and on the default Adam one."""
    return compare_on_toy(ENTROPY_SETTINGS, **kw)


def summarize(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per setting: runs, mean / min / max modes, total modes, mean / min / max hq, mean wall / CPU seconds, the
    mean of each :data:`STABILITY_COLUMNS` field and diverged runs."""
    return summarize_coverage(list(rows), "setting", means=("hq", "seconds", "cpu_seconds", *STABILITY_COLUMNS),
                              sums=("diverged",))


# ==============================================================================================
# The CLI builder
# ==============================================================================================


def build_energy(spec: Any) -> EnergyGAN:
    """Builder for ``python -m genlib train energy``: R1 on reals by default.

    Images get DCGAN conv nets with a normalisation-free critic and ``lam = 10``, Adam (0.5, 0.9)
    (MEG's 64x64 setting); vectors get MLPs with ``lam = 0.1`` and 5 critic steps. ``--opt`` keys:
    penalty, lam, loss, critic_steps, fresh_reals, optimizer, beta1, beta2, momentum, entropy,
    entropy_estimator, knn_k, depth.
    """
    image = len(spec.shape) == 3
    return EnergyGAN(
        tuple(spec.shape), spec.z_dim, spec.width, spec.option("depth", 3),
        penalty=spec.option("penalty", "r1"), lam=spec.option("lam", 10.0 if image else 0.1),
        loss=spec.option("loss", "wasserstein"), critic_steps=spec.option("critic_steps", 5),
        fresh_reals=spec.option("fresh_reals", True),
        optimizer=spec.option("optimizer", "adam"), lr=spec.lr,
        betas=(spec.option("beta1", 0.5), spec.option("beta2", 0.9)), momentum=spec.option("momentum", 0.0),
        entropy=spec.option("entropy", 0.0), entropy_estimator=spec.option("entropy_estimator", "knn"),
        knn_k=spec.option("knn_k", 1))
