"""The energy view of GANs: losses, penalties, the 1-D optimal critic, entropy, Dirac-GAN and EnergyGAN."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.optimize import minimize
from scipy import stats
from scipy.stats import norm
from torch import nn

from genlib import data as gdata
from genlib import energy as E
from genlib import metrics
from genlib.cli import TrainSpec, build_family
from genlib.data import BatchSampler
from genlib.train import fit




class Linear(nn.Module):
    """U(x) = a . x with a trainable ``a`` [d]: grad_x U = a everywhere."""

    def __init__(self, a):
        super().__init__()
        self.a = nn.Parameter(torch.as_tensor(a, dtype=torch.float64))

    def forward(self, x):
        return x @ self.a


def quadratic(x):
    """U(x) = ||x||^2: grad_x U = 2 x."""
    return x.pow(2).sum(1)


# ---- losses -----------------------------------------------------------------------------------


def test_losses_match_hand_computed_values():
    u_real, u_fake = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0])
    assert E.critic_loss(u_real, u_fake).item() == pytest.approx(1.5 - 4.0)
    assert E.generator_energy_loss(u_fake).item() == pytest.approx(4.0)
    # relu(1 + [-1, -0.5]) = [0, 0.5]; relu(1 - [1, 0]) = [0, 1]
    assert E.hinge_critic_loss(torch.tensor([-1.0, -0.5]), torch.tensor([1.0, 0.0])).item() == pytest.approx(0.75)
    # mean [0, 0.2] + mean relu(2 - [2, 1.7]) = 0.1 + 0.15
    assert E.margin_loss(torch.tensor([0.0, 0.2]), torch.tensor([2.0, 1.7]), 2.0).item() == pytest.approx(0.25)


def test_hinge_and_margin_stop_pushing_beyond_their_boundaries():
    u_real = torch.tensor([-3.0, -1.0, -0.5], requires_grad=True)
    u_fake = torch.tensor([3.0, 1.0, 0.5], requires_grad=True)
    E.hinge_critic_loss(u_real, u_fake).backward()
    assert u_real.grad.tolist() == pytest.approx([0, 0, 1 / 3])  # reals below -1 are left alone
    assert u_fake.grad.tolist() == pytest.approx([0, 0, -1 / 3])  # fakes above +1 are left alone
    fake = torch.tensor([2.0, 1.5], requires_grad=True)
    assert E.margin_loss(torch.zeros(2), fake, 2.0).item() == pytest.approx(0.25)
    E.margin_loss(torch.zeros(2), fake, 2.0).backward()
    assert fake.grad.tolist() == pytest.approx([0, -0.5])  # at the margin the push stops

class FirstCoordinate(nn.Module):
    """U(x) = x_0: a critic whose energies are the inputs' first coordinates."""

    def forward(self, x):
        return x[:, 0]


def test_hinge_loss_is_the_hinge_through_every_entry_point():
    u_real, u_fake = torch.tensor([-2.0, 0.5]), torch.tensor([0.5, 3.0])
    # relu(1 + [-2, 0.5]) = [0, 1.5] and relu(1 - [0.5, 3]) = [0.5, 0]: 0.75 + 0.25 (the linear loss: -0.75 - 1.75)
    assert E.CRITIC_LOSSES["hinge"](u_real, u_fake).item() == pytest.approx(1.0)
    assert E.CRITIC_LOSSES["wasserstein"](u_real, u_fake).item() == pytest.approx(-2.5)
    real, fake = u_real.clone().requires_grad_(True), u_fake.clone().requires_grad_(True)
    E.CRITIC_LOSSES["hinge"](real, fake).backward()
    assert real.grad.tolist() == [0.0, 0.5] and fake.grad.tolist() == [-0.5, 0.0]  # only inside the margins
    out = E.critic_objective(FirstCoordinate(), u_real[:, None], u_fake[:, None], loss="hinge", penalty_kind="none")
    assert out["loss_u"].item() == pytest.approx(1.0) and out["gap"].item() == pytest.approx(2.5)
    model = E.EnergyGAN((1,), width=8, depth=1, loss="hinge", penalty="none")
    model.critic = FirstCoordinate()
    assert model.critic_losses(u_real[:, None], u_fake[:, None])["loss_u"].item() == pytest.approx(1.0)


# ---- penalties against closed-form input gradients ---------------------------------------------


def test_zero_centred_penalty_closed_forms():
    x = torch.randn(16, 3, dtype=torch.float64)
    critic = Linear([1.0, -2.0, 0.5])
    r1 = E.zero_centred_penalty(critic, x)
    assert r1.item() == pytest.approx(1 + 4 + 0.25)  # ||a||^2
    (grad_a,) = torch.autograd.grad(r1, critic.a)  # trainable: d||a||^2/da = 2a
    torch.testing.assert_close(grad_a, 2 * critic.a.detach())
    assert E.zero_centred_penalty(quadratic, x).item() == pytest.approx(4 * x.pow(2).sum(1).mean().item())


def test_one_centred_penalty_closed_forms():
    real, fake = torch.randn(16, 2, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    assert E.one_centred_penalty(Linear([3.0, 4.0]), real, fake).item() == pytest.approx((5 - 1) ** 2)
    # With real == fake every interpolate is the real point: mean (2 ||x|| - 1)^2.
    expected = (2 * real.norm(dim=1) - 1).pow(2).mean().item()
    assert E.one_centred_penalty(quadratic, real, real).item() == pytest.approx(expected)
    points = E.interpolates(real, fake)
    t = (points - fake)[:, 0] / (real - fake)[:, 0]  # each point lies on its own segment
    torch.testing.assert_close(points, fake + t[:, None] * (real - fake))
    assert bool(((t >= 0) & (t <= 1)).all())


def test_one_centred_penalty_is_taken_at_the_interpolates_not_at_the_reals():
    """U = ||x||^2 has ||grad U|| = 2 ||x||, so where the penalty is taken matters. Reals at 0, fakes at distance
    r = 3: x_hat = (1 - eps) fake, and with eps ~ U[0, 1), E (2 (1 - eps) r - 1)^2 = 4 r^2 / 3 - 2 r + 1 = 7
    (at the reals it would be 1, at the fakes 25; the sampling error of the mean of 20,000 is about 0.05)."""
    n, r = 20_000, 3.0
    angle = 2 * math.pi * torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    fake = r * torch.stack([angle.cos(), angle.sin()], 1)
    real = torch.zeros_like(fake)
    torch.manual_seed(0)
    for value in (E.one_centred_penalty(quadratic, real, fake), E.penalty("wgan-gp", quadratic, real, fake),
                  E.critic_objective(quadratic, real, fake, penalty_kind="wgan-gp", lam=1.0)["penalty"]):
        assert value.item() == pytest.approx(4 * r**2 / 3 - 2 * r + 1, abs=0.3)
    # The same draw by hand: x_hat = eps real + (1 - eps) fake, one eps = torch.rand per sample from the same seed.
    real, fake = torch.randn(16, 2, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64) + 2.0
    torch.manual_seed(1)
    eps = torch.rand(16, 1, dtype=torch.float64)
    expected = (2 * (eps * real + (1 - eps) * fake).norm(dim=1) - 1).pow(2).mean().item()
    torch.manual_seed(1)
    assert E.one_centred_penalty(quadratic, real, fake).item() == pytest.approx(expected, rel=1e-12)


def test_penalty_dispatch_picks_each_penalty():
    real, fake = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64) + 3.0
    critic = Linear([3.0, 4.0])  # ||grad U|| = 5 everywhere: R1 = 25, WGAN-GP = (5 - 1)^2 = 16
    expected = {"r1": 25.0, "wgan-gp": 16.0, "none": 0.0}
    linear_loss = ((real - fake) @ critic.a).mean().item()
    for kind, value in expected.items():
        assert E.penalty(kind, critic, real, fake).item() == pytest.approx(value)
        out = E.critic_objective(critic, real, fake, penalty_kind=kind, lam=0.1)
        assert out["penalty"].item() == pytest.approx(value)
        assert out["loss_u"].item() == pytest.approx(linear_loss + 0.1 * value)
        model = E.EnergyGAN((2,), width=8, depth=1, penalty=kind, lam=0.3)  # its own lam, not the default 0.1
        model.critic = critic
        losses = model.critic_losses(real, fake)
        assert losses["penalty"].item() == pytest.approx(value)
        assert losses["loss_u"].item() == pytest.approx(linear_loss + 0.3 * value)
    with pytest.raises(ValueError, match="penalty must be one of"):
        E.penalty("r2", critic, real, fake)


def test_critic_objective_reports_the_mean_energies_of_each_batch_and_their_gap():
    """Batches of unequal size (2 reals, 3 fakes) so that a sum, a pooled mean or swapped batches all show.
    U = x . a with a = (1, 2): reals give U = [0, 0.4], fakes [1, 2, 1.5]; R1 = ||a||^2 = 5 everywhere."""
    critic = Linear([1.0, 2.0])
    real = torch.tensor([[0.0, 0.0], [0.2, 0.1]], dtype=torch.float64)
    fake = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], dtype=torch.float64)
    out = E.critic_objective(critic, real, fake, penalty_kind="r1", lam=0.1)
    assert out["u_real"].item() == pytest.approx(0.2)
    assert out["u_fake"].item() == pytest.approx(1.5)
    assert out["gap"].item() == pytest.approx(1.5 - 0.2)
    assert out["penalty"].item() == pytest.approx(5.0)
    assert out["loss_u"].item() == pytest.approx(0.2 - 1.5 + 0.1 * 5.0)
    # Only loss_u is minimised: its gradient in a is mean(real) - mean(fake) + lam * 2a; the rest are logs.
    (grad_a,) = torch.autograd.grad(out["loss_u"], critic.a)
    expected = real.mean(0) - fake.mean(0) + 0.1 * 2 * critic.a.detach()
    torch.testing.assert_close(grad_a, expected)
    assert not any(out[key].requires_grad for key in ("penalty", "gap", "u_real", "u_fake"))
    # the same keys for a plain function critic on one coordinate, without a penalty
    out = E.critic_objective(lambda x: x[:, 0], torch.tensor([[0.0], [0.4]]), torch.tensor([[1.0]]),
                             penalty_kind="none", lam=0.0)
    assert (out["u_real"].item(), out["u_fake"].item()) == (pytest.approx(0.2), pytest.approx(1.0))
    assert out["gap"].item() == pytest.approx(0.8) and out["penalty"].item() == 0.0
    assert out["loss_u"].item() == pytest.approx(0.2 - 1.0)


# ---- the 1-D optimal critic --------------------------------------------------------------------


def discretised_optimum_slope(x: np.ndarray, p: np.ndarray, q: np.ndarray, lam: float) -> np.ndarray:
    """The slope at the midpoints of the grid minimiser of J (genlib.energy.discretised_critic_optimum_1d)."""
    return E.discretised_critic_optimum_1d(x, p, q, lam)[0]


def test_discretised_critic_optimum_matches_a_generic_minimiser():
    # J written out independently and handed to BFGS on a small uneven pair of densities.
    rng = np.random.default_rng(0)
    x = np.linspace(-1.0, 2.0, 12)
    dx, lam = x[1] - x[0], 0.3
    p, q = rng.uniform(0.2, 1.0, 12), rng.uniform(0.0, 1.0, 12)
    p, q = p / (p.sum() * dx), q / (q.sum() * dx)

    def objective(u_rest: np.ndarray) -> float:
        u = np.concatenate([[0.0], u_rest])
        slopes = np.diff(u) / dx
        return float(dx * np.sum(u * (p - q)) + lam * dx * np.sum((p[1:] + p[:-1]) / 2 * slopes**2))

    best = minimize(objective, np.zeros(11), method="BFGS", options={"gtol": 1e-12, "maxiter": 10_000})
    slope, j_min = E.discretised_critic_optimum_1d(x, 3 * p, 5 * q, lam)  # renormalised inside
    np.testing.assert_allclose(slope, np.diff(np.concatenate([[0.0], best.x])) / dx, rtol=1e-5, atol=1e-6)
    assert j_min == pytest.approx(best.fun, rel=1e-8)
    assert j_min < 0  # U = 0 gives J = 0, and p != q lets the critic do better


def test_discretised_critic_optimum_stays_accurate_where_p_spans_many_orders_of_magnitude():
    # Summing the discrete Euler-Lagrange equations from the left gives, exactly,
    # 2 lam p_(i+1/2) U'_(i+1/2) = dx sum_(j <= i) (p_j - q_j): a first integral the solver does not use.
    lam, x = 0.5, np.linspace(-8.0, 8.0, 3201)  # p falls to 5e-15 at the ends; q = N(0, 4) has far heavier tails
    dx = x[1] - x[0]
    p, q = norm.pdf(x), norm.pdf(x, scale=2.0)
    slope, j_min = E.discretised_critic_optimum_1d(x, p, q, lam)
    p, q = p / (p.sum() * dx), q / (q.sum() * dx)
    p_mid = (p[1:] + p[:-1]) / 2
    expected = dx * np.cumsum(p - q)[:-1] / (2 * lam * p_mid)
    np.testing.assert_allclose(slope, expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())
    assert j_min == pytest.approx(-lam * dx * np.sum(p_mid * expected**2), rel=1e-8)  # J_min = -lam sum p U'^2
    flipped, j_flipped = E.discretised_critic_optimum_1d(x, p[::-1], q[::-1], lam)  # the mirror image
    assert j_flipped == pytest.approx(j_min, rel=1e-8)


def test_discretised_critic_optimum_rejects_bad_input():
    x = np.linspace(0.0, 1.0, 5)
    p = np.ones(5)
    with pytest.raises(ValueError, match="lam must be > 0"):
        E.discretised_critic_optimum_1d(x, p, p, 0.0)
    with pytest.raises(ValueError, match="at least 3 points"):
        E.discretised_critic_optimum_1d(x, p, np.ones(4), 0.5)
    with pytest.raises(ValueError, match="uniform and increasing"):
        E.discretised_critic_optimum_1d(x**2, p, p, 0.5)
    with pytest.raises(ValueError, match="p > 0 at every grid point"):
        E.discretised_critic_optimum_1d(x, np.array([1.0, 1.0, 0.0, 1.0, 1.0]), p, 0.5)
    with pytest.raises(ValueError, match="p > 0 at every grid point"):
        E.discretised_critic_optimum_1d(x, p, np.zeros(5), 0.5)


def test_optimal_critic_slope_matches_a_direct_minimisation():
    lam = 0.5
    x = np.linspace(-7.0, 8.0, 3001)
    p, q = norm.pdf(x), norm.pdf(x, loc=1.0)
    # Renormalise on the grid so that sum (p - q) dx = 0 and the discrete problem has a minimiser.
    p, q = p / (p.sum() * (x[1] - x[0])), q / (q.sum() * (x[1] - x[0]))
    numeric = discretised_optimum_slope(x, p, q, lam)
    mid = (x[1:] + x[:-1]) / 2
    closed = E.optimal_critic_slope_1d(mid, norm.pdf, norm.cdf, lambda t: norm.cdf(t, loc=1.0), lam)
    inside = (mid > -3) & (mid < 4)
    np.testing.assert_allclose(numeric[inside], closed[inside], rtol=2e-3)
    assert (closed > 0).all()  # data left of the fakes: U rises from reals to fakes (low = real)


def test_optimal_critic_digs_a_pit_under_unimodal_data_when_the_fakes_are_wider():
    lam, sd = 0.5, 1.2
    # Independent values from scipy: U'(x) = (Phi(x) - Phi(x / 1.2)) / (2 lam phi(x)).
    at = np.array([-1.0, 0.0, 1.0])
    expected = (norm.cdf(at) - norm.cdf(at, scale=sd)) / (2 * lam * norm.pdf(at))
    closed = E.optimal_critic_slope_1d(at, norm.pdf, norm.cdf, lambda t: norm.cdf(t, scale=sd), lam)
    np.testing.assert_allclose(closed, expected, rtol=1e-12)
    assert closed[0] < -0.1 and closed[1] == 0 and closed[2] > 0.1  # falls, flat, rises: a pit at 0
    # Brute force: the minimiser of the discretised functional J has the same slope and sign change.
    x = np.linspace(-6.0, 6.0, 2401)
    p, q = norm.pdf(x), norm.pdf(x, scale=sd)
    p, q = p / (p.sum() * (x[1] - x[0])), q / (q.sum() * (x[1] - x[0]))
    numeric = discretised_optimum_slope(x, p, q, lam)
    mid = (x[1:] + x[:-1]) / 2
    inside = np.abs(mid) < 3
    closed_mid = E.optimal_critic_slope_1d(mid, norm.pdf, norm.cdf, lambda t: norm.cdf(t, scale=sd), lam)
    np.testing.assert_allclose(numeric[inside], closed_mid[inside], rtol=2e-3, atol=1e-4)
    assert (numeric[inside & (mid < -0.01)] < 0).all() and (numeric[inside & (mid > 0.01)] > 0).all()


def discretised_minimum(x: np.ndarray, p: np.ndarray, q: np.ndarray, lam: float) -> float:
    """min over U of the discretised J (genlib.energy.discretised_critic_optimum_1d)."""
    return E.discretised_critic_optimum_1d(x, p, q, lam)[1]


def test_critic_functional_is_unbounded_below_when_the_fakes_tails_are_too_heavy():
    # J_min = -int (F_p - F_q)^2 / (4 lam p): finite for q = N(0, 1.2^2), divergent for q = N(0, 2^2) (s^2 > 2).
    lam, minima = 0.5, {}
    for sd in (1.2, 2.0):
        for half_width in (6.0, 8.0):
            x = np.linspace(-half_width, half_width, 1601)
            p, q = norm.pdf(x), norm.pdf(x, scale=sd)
            p, q = p / (p.sum() * (x[1] - x[0])), q / (q.sum() * (x[1] - x[0]))
            minima[sd, half_width] = discretised_minimum(x, p, q, lam)

    def integrand(t: float) -> float:
        return (norm.cdf(t) - norm.cdf(t, scale=1.2)) ** 2 / (4 * lam * norm.pdf(t))

    limit = -quad(integrand, -10, 10, limit=200)[0]
    assert minima[1.2, 6.0] == pytest.approx(minima[1.2, 8.0], rel=5e-3)  # a wider box changes little
    assert minima[1.2, 8.0] == pytest.approx(limit, rel=5e-3)  # and J reaches the completed square's bound
    assert minima[2.0, 8.0] < 100 * minima[2.0, 6.0] < 0  # the tails keep lowering J


def test_optimal_critic_slope_rejects_bad_input():
    x = np.array([-1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="lam must be > 0"):
        E.optimal_critic_slope_1d(x, norm.pdf, norm.cdf, norm.cdf, 0.0)
    with pytest.raises(ValueError, match="p must be > 0 wherever F_p != F_q"):
        E.optimal_critic_slope_1d(x, np.array([0.2, 0.4, 0.0]), norm.cdf, lambda t: norm.cdf(t - 1), 0.5)


def test_trained_critic_follows_the_closed_form_slope_and_the_sign_convention():
    gen = torch.Generator().manual_seed(0)
    real, fake = torch.randn(50_000, generator=gen), 1.0 + torch.randn(50_000, generator=gen)
    # lam 2, not the default 0.5 (the chapter's): a critic trained with the default would be 4x too steep
    critic = E.fit_critic_1d(real, fake, lam=2.0, steps=200, seed=0)
    x = torch.linspace(-1.0, 2.0, 31)
    closed = E.optimal_critic_slope_1d(x, lambda t: torch.exp(-t**2 / 2) / math.sqrt(2 * math.pi),
                                       lambda t: torch.special.ndtr(t), lambda t: torch.special.ndtr(t - 1), 2.0)
    slope = E.energy_slope(critic, x)
    assert (slope - closed).abs().max() < 0.1 * closed.abs().max()
    with torch.no_grad():
        assert critic(real[:5000, None]).mean() < critic(fake[:5000, None]).mean()  # pits under the reals


def test_critic_training_digs_pits_under_reals_in_2d():
    torch.manual_seed(0)
    real, fake = torch.randn(2048, 2), torch.randn(2048, 2) + 3.0
    model = E.CriticFit(E.EnergyMLP(2, 32, 2), fake, lam=0.1, lr=1e-2)
    history = fit(model, BatchSampler(real, 256, seed=0), 40, log_every=40, progress=False)
    with torch.no_grad():
        assert model.critic(real).mean() < model.critic(fake).mean()
    assert history["gap"][-1] > 0


# ---- entropy ------------------------------------------------------------------------------------


def test_knn_entropy_matches_gaussian_entropy():
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.8]])
    x = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0)) @ torch.linalg.cholesky(cov).T
    assert E.gaussian_entropy(cov) == pytest.approx(0.5 * math.log((2 * math.pi * math.e) ** 2 * 0.44))
    assert E.knn_entropy(x).item() == pytest.approx(E.gaussian_entropy(cov), abs=0.1)
    assert E.knn_entropy(x, k=3).item() == pytest.approx(E.gaussian_entropy(cov), abs=0.1)
    # Scaling by c shifts every entropy by d log c, and the estimator does so exactly.
    assert E.knn_entropy(3 * x).item() == pytest.approx(E.knn_entropy(x).item() + 2 * math.log(3), abs=1e-4)


def test_knn_entropy_needs_a_neighbour_rank_below_the_sample_count():
    samples = torch.randn(5, 2)
    assert math.isfinite(E.knn_entropy(samples, k=4).item())  # the farthest other sample
    for k in (0, 5):
        with pytest.raises(ValueError, match="need 1 <= k < number of samples"):
            E.knn_entropy(samples, k=k)


def test_knn_entropy_is_differentiable_and_rises_when_samples_spread():
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    (grad,) = torch.autograd.grad(E.knn_entropy(x), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with torch.no_grad():
        assert E.knn_entropy(x + 0.1 * grad).item() > E.knn_entropy(x).item()
    dup = torch.zeros(8, 2, requires_grad=True)  # a fully collapsed batch stays finite
    assert torch.isfinite(E.knn_entropy(dup))


def test_jsd_mutual_information_is_zero_for_an_uninformative_statistic():
    t = torch.zeros(10)
    assert E.jsd_mutual_information(t, t).item() == pytest.approx(-2 * math.log(2))
    assert E.jsd_mutual_information(t + 10, t - 10).item() > -1e-3  # separating T reaches its maximum 0


def test_jsd_mutual_information_matches_log_sigmoids_and_reaches_the_jsd_at_the_optimal_statistic():
    t_joint, t_marginal = torch.randn(50, dtype=torch.float64), torch.randn(30, dtype=torch.float64)
    # E_joint[log sigmoid T] + E_marginal[log(1 - sigmoid T)], written with sigmoids instead of softplus.
    expected = torch.sigmoid(t_joint).log().mean() + (1 - torch.sigmoid(t_marginal)).log().mean()
    assert E.jsd_mutual_information(t_joint, t_marginal).item() == pytest.approx(expected.item(), rel=1e-12)
    # Two binary variables, P(x, z) = [[3, 1], [1, 3]] / 8 against the product of the marginals Q = 1/4 each.
    # The best statistic is T* = log(P / Q), where the estimate equals 2 JSD(P, Q) - 2 log 2 (Deep InfoMax).
    P, Q = np.array([3, 1, 1, 3]) / 8, np.full(4, 0.25)
    M = (P + Q) / 2
    jsd = 0.5 * np.sum(P * np.log(P / M)) + 0.5 * np.sum(Q * np.log(Q / M))
    t_star = np.log(P / Q)
    joint = torch.tensor(np.repeat(t_star, [3, 1, 1, 3]))  # 8 draws in the proportions of P
    marginal = torch.tensor(np.repeat(t_star, [2, 2, 2, 2]))  # 8 draws in the proportions of Q
    best = E.jsd_mutual_information(joint, marginal).item()
    assert best == pytest.approx(2 * jsd - 2 * math.log(2), rel=1e-12)
    for shift in (-0.3, 0.3):  # any other statistic does worse
        assert E.jsd_mutual_information(joint + shift, marginal + shift).item() < best
    assert E.jsd_mutual_information(joint * 1.5, marginal * 1.5).item() < best


def test_densest_disc_matches_a_brute_force_count():
    points = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [3.0, 3.0], [3.05, 3.0], [-2.0, 0.0]])
    share, centre = E.densest_disc(points, 0.15)
    counts = [sum(math.dist(a, b) <= 0.15 for b in points.tolist()) for a in points.tolist()]
    assert share == pytest.approx(max(counts) / len(points)) and share == pytest.approx(3 / 6)
    assert centre.tolist() == [0.0, 0.0]  # ties go to the first centre
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    share, centre = E.densest_disc(x, 0.5)
    brute = max(int(((x - c).norm(dim=1) <= 0.5).sum()) for c in x) / len(x)
    assert share == pytest.approx(brute)
    assert E.densest_disc(torch.zeros(10, 2), 1e-3)[0] == 1.0  # a collapsed set: every sample in one disc
    share, centre = E.densest_disc(torch.tensor([[0.5, -2.0]]), 0.1)  # one sample is its own densest disc
    assert share == 1.0 and centre.tolist() == [0.5, -2.0]
    with pytest.raises(ValueError, match=r"non-empty \[n, d\]"):
        E.densest_disc(torch.zeros(0, 2), 1.0)
    with pytest.raises(ValueError, match="radius must be > 0"):
        E.densest_disc(x, 0.0)
    with pytest.raises(ValueError, match=r"non-empty \[n, d\]"):
        E.densest_disc(torch.zeros(5), 1.0)


# ---- Dirac-GAN ----------------------------------------------------------------------------------


def test_dirac_gan_r1_converges_and_plain_does_not_shrink():
    r1 = E.dirac_gan_trajectory("r1", lam=1.0, steps=300, lr=0.1)
    assert r1.shape == (301, 2)
    assert r1[-1].abs().max() < 0.05
    for alternating in (False, True):
        plain = E.dirac_gan_trajectory("none", steps=300, lr=0.1, alternating=alternating)
        radius = plain.norm(dim=1)
        assert radius[-1] >= 0.95 * radius[0]
        assert plain[:, 0].min() < -0.5 < 0.5 < plain[:, 0].max()  # theta keeps swinging through 0
    spiral = E.dirac_gan_trajectory("none", steps=100, lr=0.1)
    assert spiral[-1].norm().item() == pytest.approx(math.sqrt(2) * 1.01 ** 50, rel=1e-6)


@pytest.mark.parametrize("alternating", [False, True])
@pytest.mark.parametrize("penalty_kind", ["none", "r1"])
def test_dirac_gan_follows_the_hand_written_updates(penalty_kind, alternating):
    """U_psi(x) = psi x, data at 0: the critic's loss -psi theta (+ lam psi^2 with R1) has d/dpsi = -theta
    (+ 2 lam psi); the generator's psi theta has d/dtheta = psi, the old psi (simultaneous) or the new (alternating)."""
    lr, lam, theta, psi = 0.1, 0.5, 1.0, 1.0
    expected = [(theta, psi)]
    for _ in range(60):
        new_psi = psi - lr * (-theta + (2 * lam * psi if penalty_kind == "r1" else 0.0))
        theta -= lr * (new_psi if alternating else psi)
        psi = new_psi
        expected.append((theta, psi))
    path = E.dirac_gan_trajectory(penalty_kind, lam=lam, steps=60, lr=lr, alternating=alternating)
    torch.testing.assert_close(path, torch.tensor(expected))


def test_dirac_gan_alternating_updates_stay_on_a_bounded_orbit():
    """Without a penalty an alternating step is (theta, psi) <- M (theta, psi) with M = [[1 - lr^2, -lr], [lr, 1]]
    (psi += lr theta, then theta -= lr psi_new). det M = 1 and |tr M| = |2 - lr^2| < 2: the eigenvalues are a
    conjugate pair on the unit circle, and M keeps the form Q = theta^2 + psi^2 + lr theta psi (M^T S M = S), which
    is >= (1 - lr / 2) r^2, so the radius never exceeds sqrt(Q_0 / (1 - lr / 2)) (1.487 for lr 0.1 from (1, 1)).
    Simultaneous steps multiply the radius by sqrt(1 + lr^2) each and leave that bound behind."""
    lr, steps = 0.1, 300
    M = torch.tensor([[1 - lr**2, -lr], [lr, 1.0]], dtype=torch.float64)
    S = torch.tensor([[1.0, lr / 2], [lr / 2, 1.0]], dtype=torch.float64)
    assert torch.linalg.det(M).item() == pytest.approx(1.0, abs=1e-12) and abs(torch.trace(M).item()) < 2
    torch.testing.assert_close(M.T @ S @ M, S)
    start = torch.tensor([1.0, 1.0], dtype=torch.float64)
    bound = math.sqrt(start @ S @ start / (1 - lr / 2))
    path = E.dirac_gan_trajectory("none", steps=steps, lr=lr, alternating=True)
    torch.testing.assert_close(path, torch.stack([torch.linalg.matrix_power(M, k) @ start for k in range(steps + 1)])
                               .float())
    form = (path.double() @ S * path.double()).sum(1)
    torch.testing.assert_close(form, torch.full_like(form, form[0].item()), rtol=1e-5, atol=0)
    assert path.norm(dim=1).max().item() <= bound * (1 + 1e-6) < 1.5
    simultaneous = E.dirac_gan_trajectory("none", steps=steps, lr=lr).norm(dim=1)
    assert simultaneous[-1].item() == pytest.approx(math.sqrt(2) * (1 + lr**2) ** (steps / 2), rel=1e-5)
    assert simultaneous.max().item() > 4 * bound


# ---- EnergyGAN ----------------------------------------------------------------------------------

TOY_OPTIONS = [
    dict(penalty="r1"), dict(penalty="wgan-gp"), dict(penalty="none"), dict(loss="hinge"),
    dict(optimizer="sgd", momentum=0.9, lr=1e-2), dict(optimizer="rmsprop"), dict(betas=(0.0, 0.9)),
    dict(entropy=0.1), dict(entropy=0.1, knn_k=2), dict(entropy=0.1, entropy_estimator="mi"),
]


@pytest.mark.parametrize("options", TOY_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_energy_gan_trains_on_a_toy_with_each_option(options):
    torch.manual_seed(0)
    model = E.EnergyGAN((2,), z_dim=2, width=16, depth=2, critic_steps=2, **options)
    history = fit(model, BatchSampler(torch.randn(256, 2), 32, seed=0), 3, log_every=3, progress=False)
    assert {"loss_u", "penalty", "gap", "loss_g", "energy_g"} <= set(history)
    assert ("entropy" in history) == bool(options.get("entropy"))
    assert all(math.isfinite(v[-1]) for v in history.values())
    assert model.sample(5).shape == (5, 2)


@pytest.mark.parametrize("options", [dict(penalty="r1"), dict(penalty="wgan-gp", entropy=1e-3)])
def test_energy_gan_trains_on_tiny_images(options):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    model = E.EnergyGAN((1, 8, 8), z_dim=4, width=4, critic_steps=1, lam=10.0, **options)
    history = fit(model, BatchSampler(images, 8, seed=0), 2, log_every=2, progress=False)
    assert all(math.isfinite(v[-1]) for v in history.values())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.critic.modules())
    samples = model.sample(3)
    assert samples.shape == (3, 1, 8, 8) and samples.abs().max() <= 1


def generator_gradient(entropy: float) -> torch.Tensor:
    """Gradient of loss_g w.r.t. the generator's first weight, same nets and codes for every call."""
    torch.manual_seed(0)
    model = E.EnergyGAN((2,), width=16, depth=2, entropy=entropy)
    torch.manual_seed(1)
    loss = model.generator_losses(64)["loss_g"]
    return torch.autograd.grad(loss, model.generator[0].weight)[0]


class Quadratic(nn.Module):
    """U(x) = ||x||^2 as a module (EnergyGAN's critic must be one)."""

    def forward(self, x):
        return quadratic(x)


class FixedPoints(nn.Module):
    """A 'generator' that ignores its codes and returns the trainable points [n, 2] (the first len(z) of them)."""

    def __init__(self, points):
        super().__init__()
        self.points = nn.Parameter(torch.as_tensor(points, dtype=torch.float32))

    def forward(self, z):
        return self.points[: len(z)]


def test_generator_loss_with_entropy_matches_hand_computed_value_and_gradient():
    w = 0.4
    model = E.EnergyGAN((2,), width=8, depth=2, entropy=w)
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [4.0, 0.0]])
    model.generator, model.critic = FixedPoints(points), Quadratic()
    losses = model.generator_losses(4)
    # mean U = (0 + 1 + 4 + 16) / 4. Nearest-neighbour distances r = (1, 1, 2, 3), so with k = 1, d = 2, N = 4:
    # H = psi(4) - psi(1) + log V_2 + (2/4) sum log r_i = 11/6 + log(pi) + log(6) / 2.
    entropy = 11 / 6 + math.log(math.pi) + math.log(6) / 2
    assert losses["energy_g"].item() == pytest.approx(21 / 4)
    assert losses["entropy"].item() == pytest.approx(entropy, rel=1e-6)
    assert losses["loss_g"].item() == pytest.approx(21 / 4 - w * entropy, rel=1e-6)
    # knn_k = 2: second-nearest distances (2, sqrt 5, sqrt 5, 4), H = psi(4) - psi(2) + log V_2 + (1/2) log 40
    second = E.EnergyGAN((2,), width=8, depth=2, entropy=w, knn_k=2)
    second.generator, second.critic = FixedPoints(points), Quadratic()
    assert second.generator_losses(4)["entropy"].item() == pytest.approx(5 / 6 + math.log(math.pi) + math.log(40) / 2,
                                                                          rel=1e-6)
    # d/dx_a: x_a / 2 from the energy; from H, (1/2) sum_i (x_i - x_n(i)) / r_i^2 ([a = i] - [a = n(i)]).
    (grad,) = torch.autograd.grad(losses["loss_g"], model.generator.points)
    neighbour = [1, 0, 0, 1]
    grad_h = torch.zeros(4, 2)
    for i, j in enumerate(neighbour):
        g = (points[i] - points[j]) / (points[i] - points[j]).pow(2).sum()
        grad_h[i] += g / 2
        grad_h[j] -= g / 2
    torch.testing.assert_close(grad, points / 2 - w * grad_h)


def test_entropy_term_changes_the_generator_gradient():
    plain, with_entropy = generator_gradient(0.0), generator_gradient(1.0)
    torch.testing.assert_close(plain, generator_gradient(0.0))
    assert (plain - with_entropy).abs().max() > 1e-3


def test_snapshot_recorder_records_fakes_and_energy_grids():
    torch.manual_seed(0)
    model = E.EnergyGAN((2,), width=16, depth=2, critic_steps=1)
    recorder = E.snapshot_recorder(model, every=2, lim=2.0, resolution=9, n_fakes=20)
    fit(model, BatchSampler(torch.randn(64, 2), 16, seed=0), 4, callback=recorder, callback_every=recorder.every,
        progress=False)
    assert recorder.steps == [0, 2, 4]
    assert [f.shape for f in recorder.fakes] == [(20, 2)] * 3
    assert [u.shape for u in recorder.fields] == [(9, 9)] * 3
    assert not torch.equal(recorder.fakes[0], recorder.fakes[-1])
    # row i, column j of the grid is the point (x_j, y_i)
    torch.testing.assert_close(recorder.fields[-1][2, 7], model.energy(torch.tensor([[1.5, -1.0]]))[0].detach())


def test_gap_stability_by_hand():
    # the late half is [3, 0.5, -0.1]; the sign changes at 1 -> -2, -2 -> 3 and 0.5 -> -0.1
    assert E.gap_stability([5.0, 1.0, -2.0, 3.0, 0.5, -0.1]) == {"late_gap": 3.0, "gap_flips": 3.0}
    assert E.gap_stability([4.0, 2.0, 1.0, 0.5, 0.25]) == {"late_gap": 1.0, "gap_flips": 0.0}
    assert E.gap_stability([-1.0]) == {"late_gap": 1.0, "gap_flips": 0.0}
    assert all(math.isnan(value) for value in E.gap_stability([]).values())
    # a window at exactly 0 has no sign: 1 -> 0 -> -1 is one flip; NaN windows are left out
    assert E.gap_stability([1.0, 0.0, -1.0])["gap_flips"] == 1.0
    assert E.gap_stability([math.nan, 2.0, -3.0]) == {"late_gap": 3.0, "gap_flips": 1.0}
    assert all(math.isnan(value) for value in E.gap_stability([math.nan]).values())
    assert set(E.gap_stability([1.0])) == set(E.STABILITY_COLUMNS)


def test_compare_on_toy_and_summarize():
    kw = dict(toy_name="ring8", seeds=(0, 1), steps=20, n_data=512, n_samples=100,
              base=dict(width=8, depth=1, critic_steps=1))
    rows = E.compare_on_toy({"a": {}, "b": {"penalty": "none"}}, **kw)
    assert [(r["setting"], r["seed"]) for r in rows] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert all(r["total_modes"] == 8 and 0 <= r["hq"] <= 1 and not r["diverged"] for r in rows)
    table = E.summarize(rows)
    assert [t["setting"] for t in table] == ["a", "b"] and table[0]["runs"] == 2
    for r in rows:  # the logged gaps are the run's, and its stability fields are read from them
        assert len(r["gaps"]) == 10 and {k: r[k] for k in E.STABILITY_COLUMNS} == E.gap_stability(r["gaps"])
    assert table[1]["late_gap_mean"] == pytest.approx((rows[2]["late_gap"] + rows[3]["late_gap"]) / 2)
    # two worker processes train the same runs: every row is seeded by itself
    parallel = E.compare_on_toy({"a": {}, "b": {"penalty": "none"}}, workers=2, keep_samples=True,
                                keep_models=True, **kw)
    keys = ("setting", "seed", "modes", "hq")
    assert [[r[k] for k in keys] for r in parallel] == [[r[k] for k in keys] for r in rows]
    assert "samples" not in rows[0] and "model" not in rows[0]
    in_process = E.compare_on_toy({"a": {}}, keep_models=True, **kw)  # the kept models come back from the workers
    for here, there in zip(in_process, parallel[:2]):
        assert isinstance(there["model"], E.EnergyGAN)
        for (name, mine), theirs in zip(here["model"].state_dict().items(), there["model"].state_dict().values()):
            assert torch.equal(mine, theirs), name
    ring = gdata.toy("ring8", std=0.05)
    for r in parallel:  # the kept samples are the scored ones: their mode counts are the row's
        assert r["samples"].shape == (100, 2)
        assert metrics.mode_counts(r["samples"], ring.modes, ring.std).tolist() == r["mode_counts"]


def test_build_energy_defaults_and_options():
    toy = E.build_energy(TrainSpec(torch.randn(64, 2), (2,), torch.device("cpu"), z_dim=2, width=16))
    assert toy.penalty == "r1" and toy.lam == 0.1 and toy.critic_steps == 5
    assert toy.batches_per_step == 5 and toy.entropy == 0 and toy.knn_k == 1  # fresh reals, no entropy term
    reference = E.EnergyGAN((2,), z_dim=2, width=16, depth=3)  # the builder's default depth
    assert {k: v.shape for k, v in toy.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert all(opt.param_groups[0]["betas"] == (0.5, 0.9) for opt in toy.optimizers.values())
    sgd = E.build_energy(TrainSpec(torch.randn(8, 2), (2,), torch.device("cpu"), options={"optimizer": "sgd"}))
    assert all(opt.param_groups[0]["momentum"] == 0.0 for opt in sgd.optimizers.values())
    image = E.build_energy(TrainSpec(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), (1, 8, 8), torch.device("cpu"),
                                     z_dim=4, width=4, options={"optimizer": "sgd", "momentum": "0.5"}))
    assert image.lam == 10.0 and isinstance(image.optimizers["g"], torch.optim.SGD)
    assert image.optimizers["g"].param_groups[0]["momentum"] == 0.5
    split = E.EnergyGAN((2,), width=8, optimizer="sgd", momentum=0.9, critic_optimizer=E.CRITIC_ADAM)
    assert isinstance(split.optimizers["u"], torch.optim.Adam)
    assert split.optimizers["u"].param_groups[0]["betas"] == (0.5, 0.9)
    assert split.optimizers["g"].param_groups[0]["momentum"] == 0.9
    rmsprop = E.EnergyGAN((2,), width=8, optimizer="rmsprop")  # R1's reference optimiser, for both players
    assert all(type(opt) is torch.optim.RMSprop for opt in rmsprop.optimizers.values())
    with pytest.raises(ValueError, match="unknown option.*lamda"):
        build_family("energy", TrainSpec(torch.randn(8, 2), (2,), torch.device("cpu"), options={"lamda": "1"}))
    with pytest.raises(ValueError, match="penalty"):
        E.EnergyGAN((2,), penalty="r2")
    for shape in [(1, 8, 16), (8, 8)]:  # images must be square (C, H, H); vectors are (d,)
        with pytest.raises(ValueError, match="square images"):
            E.EnergyGAN(shape, width=4)
    assert E.EnergyGAN((2,), width=8).graph_safe and not E.EnergyGAN((2,), width=8, entropy=0.3).graph_safe


def test_toy_setting_labels_say_what_the_settings_do():
    """The chapter's tables print each setting's label: the generator's optimiser, rate, beta1, momentum and
    entropy weight in it are those the setting builds (and the critic keeps the base Adam (0.5, 0.9))."""
    def built(settings: dict, name: str) -> E.EnergyGAN:
        return E.EnergyGAN((2,), **{**E.TOY_DEFAULTS, "width": 8, **settings[name]})

    for name in E.OPTIMIZER_SETTINGS:
        model = built(E.OPTIMIZER_SETTINGS, name)
        critic, generator = (model.optimizers[player].param_groups[0] for player in "ug")
        assert type(model.optimizers["u"]) is torch.optim.Adam and critic["betas"] == (0.5, 0.9), name
        assert critic["lr"] == E.TOY_DEFAULTS["lr_u"], name
        if name.startswith("G: Adam beta1="):
            assert type(model.optimizers["g"]) is torch.optim.Adam, name
            assert generator["betas"] == (float(name.split("=")[1]), 0.9), name
        else:
            assert type(model.optimizers["g"]) is torch.optim.SGD and generator["lr"] == 1e-3, name
            assert generator["momentum"] == (0.9 if "momentum 0.9" in name else 0.0), name
    for name in E.ENTROPY_SETTINGS:
        model = built(E.ENTROPY_SETTINGS, name)
        generator = model.optimizers["g"]
        assert type(model.optimizers["u"]) is torch.optim.Adam, name
        if name.startswith("SGD 0.03"):
            assert type(generator) is torch.optim.SGD and generator.param_groups[0]["lr"] == 0.03, name
        else:
            assert type(generator) is torch.optim.Adam, name
        assert model.entropy == (float(name.split("w=")[1]) if "w=" in name else 0.0), name


def test_toy_runs_pass_the_toy_std_on(monkeypatch):
    """``toy_std`` overrides the toy's own std (None keeps it); rows carry their setting, seed and gap fields."""
    seen = []

    def fake_coverage_runs(jobs, toy_name, steps, batch_size, toy_options, **kw):
        seen.append(toy_options)
        for i, _ in enumerate(jobs):
            yield i, {"modes": i, "history": {"gap": [1.0, -1.0]}}

    monkeypatch.setattr(E, "coverage_runs", fake_coverage_runs)
    runs = [("a", 3), ("b", 4)]
    rows = [row for _, row in E.toy_runs(runs, "ring8", 5, 8, {"a": {}, "b": {}}, toy_std=0.3)]
    assert [(r["setting"], r["seed"], r["modes"], r["gap_flips"]) for r in rows] == [("a", 3, 0, 1.0), ("b", 4, 1, 1.0)]
    list(E.toy_runs(runs, "ring8", 5, 8, {"a": {}, "b": {}}, toy_std=None))
    assert seen == [{"std": 0.3}, {}]


# ---- margin loss with a non-negative autoencoder energy ------------------------------------------


def test_autoencoder_energy_is_the_reconstruction_error_and_non_negative():
    torch.manual_seed(0)
    ae = E.AutoencoderEnergy(3, code_dim=2, hidden=8, depth=2)
    x = torch.randn(10, 3)
    with torch.no_grad():
        recon = ae.autoencoder.decoder(ae.autoencoder.encoder(x))
        expected = ((recon - x) ** 2).sum(1) / 3  # mean over the 3 coordinates
        torch.testing.assert_close(ae(x), expected)
        assert (ae(100 * torch.randn(50, 3)) >= 0).all()


def test_margin_critic_objective_matches_hand_values_and_autograd():
    u_real, u_fake = torch.tensor([0.0, 0.4]), torch.tensor([0.5, 3.0, 1.0])
    out = E.critic_objective(lambda x: x[:, 0], u_real[:, None], u_fake[:, None], loss="margin",
                             penalty_kind="none", lam=0.0, margin=2.0)
    # mean [0, 0.4] + mean relu(2 - [0.5, 3, 1]) = 0.2 + (1.5 + 0 + 1) / 3
    assert out["loss_u"].item() == pytest.approx(0.2 + 2.5 / 3)
    assert out["u_fake"].item() == pytest.approx(1.5) and out["gap"].item() == pytest.approx(1.3)
    real = u_real.clone().requires_grad_(True)
    fake = u_fake.clone().requires_grad_(True)
    E.CRITIC_LOSSES["margin"](real, fake, 2.0).backward()
    torch.testing.assert_close(real.grad, torch.full((2,), 0.5))             # d/du_real mean = 1/n
    torch.testing.assert_close(fake.grad, torch.tensor([-1 / 3, 0.0, -1 / 3]))  # pushed up only below m
    with pytest.raises(ValueError, match="margin"):
        E.critic_objective(lambda x: x[:, 0], u_real[:, None], u_fake[:, None], loss="hinge2")


def test_critic_fit_rejects_unknown_options_and_a_non_positive_margin():
    critic, fake = E.EnergyMLP(2, 8, 1), torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"loss must be one of \('wasserstein', 'hinge', 'margin'\), got 'hinge2'"):
        E.CriticFit(critic, fake, lam=0.1, loss="hinge2")
    with pytest.raises(ValueError, match=r"penalty_kind must be one of \('r1', 'wgan-gp', 'none'\), got 'r2'"):
        E.CriticFit(critic, fake, lam=0.1, penalty_kind="r2")
    with pytest.raises(ValueError, match="lam must be >= 0, got -0.1"):
        E.CriticFit(critic, fake, lam=-0.1)
    for margin in (0.0, -1.0):
        with pytest.raises(ValueError, match="margin loss needs margin m > 0"):
            E.CriticFit(critic, fake, lam=0.0, penalty_kind="none", loss="margin", margin=margin)
    E.CriticFit(critic, fake, lam=0.0, loss="wasserstein", margin=0.0)  # the margin is unused by other losses


def test_critic_fit_step_minimises_its_margin_loss_plus_lam_times_r1():
    """U = x . a, a = (1, 2): reals give U = [0, 0.4], every fixed fake 1.5, R1 = ||a||^2 = 5. With m = 3 and lam =
    0.2, loss_u = 0.2 + relu(3 - 1.5) + 0.2 * 5 = 2.7; its gradient in a, mean(real) - mean(fake) + 0.4 a =
    (-0.5, 0.6), makes Adam's first step move each coordinate by lr against its sign."""
    critic = Linear([1.0, 2.0])
    fake = torch.tensor([[1.0, 0.25]], dtype=torch.float64).expand(4, 2).clone()
    model = E.CriticFit(critic, fake, lam=0.2, penalty_kind="r1", loss="margin", lr=1e-3, margin=3.0)
    real = torch.tensor([[0.0, 0.0], [0.2, 0.1]], dtype=torch.float64)
    losses = model.step(real, torch.arange(2))
    assert losses["loss_u"].item() == pytest.approx(0.2 + 1.5 + 0.2 * 5)
    assert losses["penalty"].item() == pytest.approx(5.0) and losses["gap"].item() == pytest.approx(1.3)
    torch.testing.assert_close(critic.a.detach(), torch.tensor([1.0 + 1e-3, 2.0 - 1e-3], dtype=torch.float64))


def test_margin_bounds_a_non_negative_energy_that_the_linear_loss_blows_up():
    torch.manual_seed(0)
    real, fake = torch.randn(1024, 2), 0.3 * torch.randn(1024, 2) + 2.0
    final = {}
    for loss in ("wasserstein", "margin"):
        torch.manual_seed(0)
        model = E.CriticFit(E.AutoencoderEnergy(2, hidden=16), fake, lam=0.0, penalty_kind="none", loss=loss,
                            lr=4e-3, margin=1.0)
        final[loss] = fit(model, BatchSampler(real, 128, seed=0), 150, log_every=150, progress=False)["u_fake"][-1]
    assert final["wasserstein"] > 100  # E_p[U] - E_q[U] has no bottom when U >= 0 can grow on the fakes
    assert 0.5 < final["margin"] < 10  # the hinge stops pushing once U(fake) >= m = 1


def test_compare_optimizers_on_grid_uses_grid25_and_the_optimizer_settings():
    assert {"G: Adam beta1=0", "G: Adam beta1=0.5", "G: Adam beta1=0.9", "G: SGD lr 1e-3",
            "G: SGD lr 1e-3, momentum 0.9"} == set(E.OPTIMIZER_SETTINGS)
    settings = {"sgd m": E.OPTIMIZER_SETTINGS["G: SGD lr 1e-3, momentum 0.9"]}
    rows = E.compare_optimizers_on_grid(settings, seeds=(0,), steps=2, n_data=512, n_samples=100,
                                        base=dict(E.TOY_DEFAULTS, width=8, depth=1))
    assert [r["setting"] for r in rows] == ["sgd m"] and rows[0]["total_modes"] == 25
    summary = E.summarize([dict(rows[0], hq=0.25), dict(rows[0], seed=1, hq=0.5)])[0]
    assert summary["runs"] == 2 and (summary["hq_min"], summary["hq_mean"], summary["hq_max"]) == (0.25, 0.375, 0.5)


def test_interpolates_draw_one_uniform_fraction_per_sample():
    """x_hat_i = t_i real_i + (1 - t_i) fake_i with t_i ~ U[0, 1) i.i.d. per sample, shared by the sample's
    coordinates (KS against U[0, 1); kills one eps for the whole batch or one per element)."""
    torch.manual_seed(0)
    real, fake = torch.randn(2000, 3, dtype=torch.float64), torch.randn(2000, 3, dtype=torch.float64) + 5
    t = (E.interpolates(real, fake) - fake) / (real - fake)  # [n, 3]
    torch.testing.assert_close(t, t[:, :1].expand_as(t))  # one fraction per sample
    assert stats.kstest(t[:, 0].numpy(), "uniform").pvalue > 1e-3


def test_log_unit_ball_volume_matches_the_known_volumes():
    """V_1 = 2, V_2 = pi, V_3 = 4 pi / 3, V_4 = pi^2 / 2, V_5 = 8 pi^2 / 15 (d = 2 alone cannot tell
    Gamma(d/2 + 1) from Gamma(d/2): both are 1)."""
    known = {1: 2.0, 2: math.pi, 3: 4 * math.pi / 3, 4: math.pi**2 / 2, 5: 8 * math.pi**2 / 15}
    for d, volume in known.items():
        assert E.log_unit_ball_volume(d) == pytest.approx(math.log(volume), rel=1e-12)


def test_knn_entropy_matches_a_three_dimensional_gaussian():
    cov = torch.tensor([[1.0, 0.3, 0.0], [0.3, 0.5, 0.1], [0.0, 0.1, 2.0]])
    x = torch.randn(4000, 3, generator=torch.Generator().manual_seed(0)) @ torch.linalg.cholesky(cov).T
    closed_form = 0.5 * math.log((2 * math.pi * math.e) ** 3 * float(torch.linalg.det(cov.double())))
    assert E.knn_entropy(x).item() == pytest.approx(closed_form, abs=0.12)


def test_densest_disc_counts_a_sample_at_exactly_the_radius():
    points = torch.tensor([[0.0, 0.0], [0.5, 0.0], [0.0, 0.5], [3.0, 3.0]])  # distances exact in binary
    counts = [sum(math.dist(a, b) <= 0.5 for b in points.tolist()) for a in points.tolist()]
    share, centre = E.densest_disc(points, 0.5)
    assert share == max(counts) / len(points) == 0.75 and centre.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("fresh_reals", [True, False])
def test_each_step_takes_critic_steps_critic_updates_and_one_generator_update(fresh_reals):
    torch.manual_seed(0)
    model = E.EnergyGAN((2,), z_dim=2, width=8, depth=2, critic_steps=3, fresh_reals=fresh_reals)
    x = torch.randn(16 * model.batches_per_step, 2)  # what fit hands over: batches_per_step batches of 16, joined
    seen, critic_losses, generator_losses = [], model.critic_losses, model.generator_losses
    model.critic_losses = lambda real, fake: (seen.append((real, len(fake))), critic_losses(real, fake))[1]
    model.generator_losses = lambda n: (seen.append((None, n)), generator_losses(n))[1]
    model.step(x, torch.arange(len(x)))
    assert {float(s["step"]) for s in model.optimizers["u"].state.values()} == {3.0}
    assert {float(s["step"]) for s in model.optimizers["g"].state.values()} == {1.0}
    expected = list(x.split(16)) if fresh_reals else [x] * 3  # each critic update its own batch, or the one again
    assert all(torch.equal(real, want) for (real, _), want in zip(seen, expected))
    assert [n for _, n in seen] == [16, 16, 16, 16]  # 16 fakes per critic update, 16 for the generator


def test_each_player_gets_its_own_learning_rate():
    def lrs(model):
        return {name: opt.param_groups[0]["lr"] for name, opt in model.optimizers.items()}

    def params(optimizer):
        return [id(p) for group in optimizer.param_groups for p in group["params"]]

    model = E.EnergyGAN((2,), width=8, depth=1, lr=1e-3, lr_u=4e-3, lr_g=2e-3)
    assert lrs(model) == {"u": 4e-3, "g": 2e-3}
    assert params(model.optimizers["u"]) == [id(p) for p in model.critic.parameters()]
    assert params(model.optimizers["g"]) == [id(p) for p in model.generator.parameters()]
    assert lrs(E.EnergyGAN((2,), width=8, depth=1, lr=1e-3, lr_u=4e-3)) == {"u": 4e-3, "g": 1e-3}
    assert lrs(E.EnergyGAN((2,), width=8, depth=1, lr=1e-3, lr_g=2e-3)) == {"u": 1e-3, "g": 2e-3}
    assert lrs(E.EnergyGAN((2,), width=8, depth=1, lr=3e-3)) == {"u": 3e-3, "g": 3e-3}
    assert lrs(E.EnergyGAN((2,), **dict(E.TOY_DEFAULTS, width=8, depth=1))) == {"u": 4e-3, "g": 2e-3}
    sgd = E.EnergyGAN((2,), width=8, depth=1, optimizer="sgd", lr_u=4e-3, lr_g=2e-3, critic_optimizer=E.CRITIC_ADAM)
    assert isinstance(sgd.optimizers["u"], torch.optim.Adam) and lrs(sgd) == {"u": 4e-3, "g": 2e-3}
    override = E.EnergyGAN((2,), width=8, depth=1, lr_u=4e-3, lr_g=2e-3, critic_optimizer=dict(lr=5e-3))
    assert lrs(override) == {"u": 5e-3, "g": 2e-3}  # critic_optimizer overrides the critic's settings


def test_statistics_network_ascends_the_mutual_information_estimate():
    """MEG: T maximises the JSD-MI estimate. The gradient T's optimiser steps on equals autograd's gradient of
    -MI at T's old weights on the very inputs T saw (captured), recomputed on a copy of T."""
    torch.manual_seed(0)
    model = E.EnergyGAN((2,), z_dim=2, width=8, depth=2, critic_steps=1, entropy=0.5, entropy_estimator="mi")
    linear = [m for m in model.statistics.modules() if isinstance(m, nn.Linear)]  # two hidden layers of width 8
    assert [(m.in_features, m.out_features) for m in linear] == [(4, 8), (8, 8), (8, 1)]
    old_t = copy.deepcopy(model.statistics)
    inputs, stepped = [], {}
    forward = model.statistics.forward
    model.statistics.forward = lambda x: inputs.append(x.detach().clone()) or forward(x)
    t_step = model.optimizers["t"].step

    def capture(*args, **kwargs):
        stepped.update({name: p.grad.clone() for name, p in model.statistics.named_parameters()})
        return t_step(*args, **kwargs)

    model.optimizers["t"].step = capture
    model.step(torch.randn(32, 2), torch.arange(32))
    joint, marginal = inputs[-2:]  # T runs twice per step: matched pairs, then shuffled codes
    # the product of the marginals: the same fakes, each with another fake's code (unshuffled, T could tell nothing)
    torch.testing.assert_close(marginal[:, :2], joint[:, :2])
    torch.testing.assert_close(marginal[:, 2:].sort(0).values, joint[:, 2:].sort(0).values)
    assert (marginal[:, 2:] != joint[:, 2:]).any(1).float().mean() > 0.5
    mi = E.jsd_mutual_information(old_t(joint), old_t(marginal))
    names = [name for name, _ in old_t.named_parameters()]
    expected = torch.autograd.grad(-mi, list(old_t.parameters()))
    for name, grad in zip(names, expected):
        torch.testing.assert_close(stepped[name], grad)


@pytest.mark.parametrize("dtype, std, centre", [(torch.float32, 1e-3, 1.36), (torch.float64, 1e-3, 1e5)])
def test_knn_entropy_finds_the_true_neighbours_of_a_tight_cluster_far_from_the_origin(dtype, std, centre):
    """A collapsed generator: 2,500 fakes with a tiny std far from the origin. The GEMM form of the distances
    cancels there (in float64 too, around 1e5), so neighbours must come from exact differences."""
    gen = torch.Generator().manual_seed(0)
    fakes = torch.randn(2500, 2, generator=gen, dtype=dtype) * std + centre
    true_entropy = E.gaussian_entropy(torch.eye(2, dtype=torch.float64) * std**2)
    assert E.knn_entropy(fakes).item() == pytest.approx(true_entropy, abs=0.1)


def test_pit_depth_on_closed_forms():
    centre = torch.tensor([0.5, -1.0])
    bowl = lambda x: ((x - centre) ** 2).sum(1)  # noqa: E731  a pit at the centre: depth r^2 in every direction
    assert E.pit_depth(bowl, centre, 0.3) == pytest.approx(0.09, abs=1e-6)
    slope = torch.tensor([3.0, 4.0])  # a plane rising along (3, 4): the circle's lowest point lies 5 r below
    plane = lambda x: x @ slope  # noqa: E731
    assert E.pit_depth(plane, centre, 0.2, directions=4000) == pytest.approx(-1.0, abs=1e-5)
    assert E.pit_depth(lambda x: -bowl(x), centre, 0.3) == pytest.approx(-0.09, abs=1e-6)  # a peak
    # few directions: exactly the points at angles 2 pi i / n (an odd n is not symmetric about the centre)
    for (a, b), n in itertools.product([(3.0, 4.0), (-1.0, 0.0)], (3, 4, 5)):  # (-1, 0): lowest at angle 0
        lowest = min(math.cos(2 * math.pi * i / n) * a + math.sin(2 * math.pi * i / n) * b for i in range(n))
        tilted = lambda x: x @ torch.tensor([a, b])  # noqa: E731
        assert E.pit_depth(tilted, centre, 0.2, directions=n) == pytest.approx(0.2 * lowest, abs=1e-6)
    with pytest.raises(ValueError, match="2-D point"):
        E.pit_depth(bowl, torch.zeros(3), 0.1)
    with pytest.raises(ValueError, match="radius"):
        E.pit_depth(bowl, centre, 0.0)


def test_slope_norms_against_the_gradient_by_hand():
    points = torch.randn(5, 2, dtype=torch.float64)
    weights = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    cubic = lambda x: (x @ weights.T).squeeze(1) ** 3  # noqa: E731  gradient 3 (w.x)^2 w
    expected = 3 * (points @ weights.T).squeeze(1) ** 2 * weights.norm()
    assert torch.allclose(E.slope_norms(cubic, points), expected)
    assert not E.slope_norms(cubic, points).requires_grad


def test_landscape_summary_on_a_bowl_by_hand():
    bowl = lambda x: (x**2).sum(1)  # noqa: E731  U = |x|^2: one pit, at the origin; slope 2 |x|
    reals = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-5.0, 0.0]], dtype=torch.float64)
    fakes = torch.tensor([[3.0, 4.0], [0.0, 1.0]], dtype=torch.float64)  # row norms 5, 1; column norms 3, 4.1
    modes = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.01, 0.0]], dtype=torch.float64)
    summary = E.landscape_summary(bowl, reals, fakes, modes, radii=(0.005, 0.5))
    assert summary["gap"] == pytest.approx((25 + 1) / 2 - (1 + 4 + 25) / 3)
    # the origin is a pit at both radii; (0.01, 0) only at the large one: its 0.005-circle dips towards the origin,
    # its 0.5-circle lies wholly above it; (1, 1) is on the bowl's slope at both
    assert summary["pits"] == [1, 2] == E.modes_in_pits(bowl, modes, (0.005, 0.5))
    assert summary["median_slope"] == pytest.approx(4.0)  # slopes 2, 4, 10 (mean 5.33)
    # a dead critic's flat U digs no pit anywhere: its rim lies no higher than its centre
    assert E.modes_in_pits(lambda x: x.new_zeros(len(x)), modes, (0.005, 0.5)) == [0, 0]
    assert summary["fakes_radius"] == pytest.approx((5 + 1) / 2)
    with pytest.raises(ValueError, match=r"\[n, 2\]"):
        E.landscape_summary(bowl, reals[:, :1], fakes, modes)
