"""Chapter 4: the optimal denoiser and its score identity, DDE losses and the generator's KL sign,
(annealed) Langevin sampling, and one smoke run of every family through the training loop."""

from __future__ import annotations

import copy
import math

import pytest
import sympy as sp
import torch
from scipy import integrate
from torch import nn

from genlib import dae
from genlib.cli import TrainSpec
from genlib.data import BatchSampler, Toy, gaussian_mixture, toy
from genlib.train import fit

# The 1-D example of REFERENCES.md and a 2-D mixture with unequal weights and widths.
MIX_1D = dict(weights=[0.3, 0.7], means=[[-2.0], [1.5]], stds=[0.5, 0.3], sigma=0.4)
MIX_2D = dict(weights=[0.5, 0.3, 0.2], means=[[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]], stds=[0.3, 0.5, 0.4], sigma=0.7)




def sample_mixture(weights, means, stds, n: int, seed: int) -> torch.Tensor:
    """n draws [n, d] (float64) from sum_j w_j N(mu_j, s_j^2 I)."""
    gen = torch.Generator().manual_seed(seed)
    w, mu, s = (torch.tensor(v, dtype=torch.float64) for v in (weights, means, stds))
    which = torch.multinomial(w, n, replacement=True, generator=gen)
    return mu[which] + s[which, None] * torch.randn(n, mu.shape[1], generator=gen, dtype=torch.float64)


def importance_posterior_mean(x: torch.Tensor, x0: torch.Tensor, sigma: float) -> torch.Tensor:
    """Monte Carlo E[x0 | x] [m, d]: prior draws x0 [n, d] weighted by the likelihood N(x; x0, sigma^2 I)."""
    log_lik = -torch.cdist(x, x0).pow(2) / (2 * sigma**2)
    return torch.softmax(log_lik, dim=1) @ x0


@pytest.mark.parametrize("mix", [MIX_1D, MIX_2D], ids=["1d", "2d"])
def test_optimal_denoiser_matches_monte_carlo_posterior_mean(mix):
    x0 = sample_mixture(mix["weights"], mix["means"], mix["stds"], 100_000, seed=0)
    # query points drawn from p_sigma itself, so each has many prior draws nearby
    x = sample_mixture(mix["weights"], mix["means"], mix["stds"], 12, seed=1)
    x = x + mix["sigma"] * torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    exact = dae.optimal_denoiser(x, mix["weights"], mix["means"], mix["stds"], mix["sigma"])
    mc = importance_posterior_mean(x, x0, mix["sigma"])
    assert exact.shape == x.shape
    assert torch.allclose(exact, mc, atol=0.03)


@pytest.mark.parametrize("mix", [MIX_1D, MIX_2D], ids=["1d", "2d"])
def test_denoiser_is_x_plus_sigma2_score_and_score_is_gradient(mix):
    args = (mix["weights"], mix["means"], mix["stds"], mix["sigma"])
    d = len(mix["means"][0])
    x = (4 * torch.randn(50, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).requires_grad_(True)
    score = dae.smoothed_score(x, *args)
    assert torch.allclose(dae.optimal_denoiser(x, *args), x + mix["sigma"] ** 2 * score, atol=1e-12)
    (grad,) = torch.autograd.grad(dae.smoothed_log_density(x, *args).sum(), x)
    assert torch.allclose(grad, score, atol=1e-10)


def test_closed_forms_are_stable_far_from_the_data_and_at_sigma_zero():
    args = (MIX_1D["weights"], MIX_1D["means"], MIX_1D["stds"])
    far = torch.tensor([[-300.0], [400.0]])
    for fn in (dae.optimal_denoiser, dae.smoothed_score, dae.smoothed_log_density):
        assert torch.isfinite(fn(far, *args, 0.05)).all()
    # far from both modes the widest component (s = 0.5, at -2) has the heaviest tail and takes over
    assert dae.optimal_denoiser(far[1:], *args, 0.05).item() == pytest.approx(-2 + 0.25 / 0.2525 * 402, rel=1e-5)
    # sigma = 0: the denoiser is the identity and the density is the mixture's own
    x = torch.linspace(-3, 3, 7)[:, None]
    assert torch.allclose(dae.optimal_denoiser(x, *args, 0.0), x)
    toy = gaussian_mixture([[0.0, 0.0], [3.0, 1.0]], 0.4, weights=[0.25, 0.75])
    points = torch.randn(20, 2)
    log_density = dae.smoothed_log_density(points, *dae.mixture_params(toy), 0.0)
    assert torch.allclose(log_density, toy.log_prob(points), atol=1e-5)


def test_optimal_denoiser_of_a_gaussian_symbolically():
    x, x0, mu = sp.symbols("x x0 mu", real=True)
    s, sigma = sp.symbols("s sigma", positive=True)
    # N(mu, s^2) blurred by N(0, sigma^2) is N(mu, s^2 + sigma^2); its log density up to a constant:
    log_p_sigma = -((x - mu) ** 2) / (2 * (s**2 + sigma**2))
    via_score = x + sigma**2 * sp.diff(log_p_sigma, x)
    expected = (s**2 * x + sigma**2 * mu) / (s**2 + sigma**2)
    assert sp.simplify(via_score - expected) == 0
    # from the definition: log p(x0) + log N(x; x0, sigma^2) is, in x0, a parabola with its peak (the
    # posterior mean of this Gaussian posterior) at `expected`: its x0-derivative vanishes there and is linear
    log_joint = -((x0 - mu) ** 2) / (2 * s**2) - (x - x0) ** 2 / (2 * sigma**2)
    slope = sp.diff(log_joint, x0)
    assert sp.simplify(slope.subs(x0, expected)) == 0 and sp.diff(slope, x0, 2) == 0
    numeric = dae.optimal_denoiser(torch.tensor([[0.7]]), [1.0], [[-0.4]], [0.6], 0.3).item()
    assert numeric == pytest.approx(float(expected.subs({x: 0.7, mu: -0.4, s: 0.6, sigma: 0.3})), rel=1e-6)


class Quadratic(nn.Module):
    """Energy s(x) = -a x^2 / 2 + b x on 1-D points [n, 1] -> [n]."""

    def __init__(self, a: float = 0.0, b: float = 0.0):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.tensor(a)), nn.Parameter(torch.tensor(b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (-self.a * x**2 / 2 + self.b * x).squeeze(1)


def test_dde_loss_equals_hand_computation_for_a_quadratic_energy():
    sigma, a, b = 0.3, 1.7, -0.4
    x = torch.tensor([[0.5], [-1.0], [2.0]])
    noisy = x + torch.tensor([[0.1], [0.2], [-0.3]])
    denoised = noisy + sigma**2 * (-a * noisy + b)  # grad s = -a x + b
    expected = 0.5 * (denoised - x).pow(2).mean()
    assert dae.dde_loss(Quadratic(a, b), x, noisy, sigma).item() == pytest.approx(expected.item(), rel=1e-6)


def test_dde_loss_sums_the_squared_error_over_the_coordinates_of_each_point():
    """In 3-D, with e(x) = -x.A x / 2 + b.x (grad e = -A x + b, A not diagonal): half the mean over points of the
    sum over coordinates of (x~ + sigma^2 grad e(x~) - x)^2, written out in plain Python."""
    sigma = 0.6
    a = [[1.5, 0.4, -0.3], [0.4, 0.8, 0.2], [-0.3, 0.2, 1.1]]
    b = [0.3, -0.5, 0.9]
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    noisy = x + 0.5 * torch.randn(4, 3, generator=gen, dtype=torch.float64)
    a_t, b_t = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    energy = lambda v: -0.5 * ((v @ a_t) * v).sum(1) + v @ b_t  # noqa: E731
    total = 0.0
    for xi, ni in zip(x.tolist(), noisy.tolist()):
        grad = [-sum(a[k][m] * ni[m] for m in range(3)) + b[k] for k in range(3)]
        total += sum((ni[k] + sigma**2 * grad[k] - xi[k]) ** 2 for k in range(3))
    assert dae.dde_loss(energy, x, noisy, sigma).item() == pytest.approx(0.5 * total / 4, rel=1e-12)


def test_dde_minimiser_is_the_log_density_of_the_noisy_data():
    # data N(mu, s^2), noise sigma: the best quadratic energy is log N(mu, s^2 + sigma^2) + const
    mu, s, sigma = 0.8, 0.5, 0.4
    gen = torch.Generator().manual_seed(0)
    x = mu + s * torch.randn(20_000, 1, generator=gen)
    noisy = x + sigma * torch.randn(x.shape, generator=gen)
    energy = Quadratic()
    opt = torch.optim.LBFGS(energy.parameters(), lr=1.0, max_iter=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = dae.dde_loss(energy, x, noisy, sigma)
        loss.backward()  # needs create_graph inside energy_denoiser to reach a and b
        return loss

    opt.step(closure)
    var = s**2 + sigma**2
    assert energy.a.item() == pytest.approx(1 / var, rel=0.03)
    assert energy.b.item() == pytest.approx(mu / var, rel=0.03)


class Shift(nn.Module):
    """Generator z -> z + m with one learnable shift m."""

    def __init__(self, m: float):
        super().__init__()
        self.m = nn.Parameter(torch.tensor([m]))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.m


def test_generator_loss_gradient_is_the_kl_gradient():
    # data N(0, 1), generator N(m, 1), both energies exact: d KL(q_sigma || p_sigma) / dm = m / (1 + sigma^2)
    m, sigma = 0.6, 0.5
    var = 1 + sigma**2
    model = dae.DDEGenerator((1,), z_dim=1, sigma=sigma)
    model.generator = Shift(m)
    model.energy_real = Quadratic(1 / var, 0.0)       # log N(0, var)
    model.energy_fake = Quadratic(1 / var, m / var)   # log N(m, var), frozen at the current m
    torch.manual_seed(0)
    loss = model.generator_loss(200_000)
    (grad,) = torch.autograd.grad(loss, model.generator.m)
    assert grad.item() == pytest.approx(m / var, abs=0.01)  # positive: descent moves m towards the data


def test_langevin_with_an_exact_gaussian_score_reaches_its_mean_and_variance():
    mu, s = 1.0, 0.5
    gen = torch.Generator().manual_seed(0)
    x = dae.langevin(lambda v: -(v - mu) / s**2, torch.zeros(4000, 1), 0.01, 400, gen)
    assert x.mean().item() == pytest.approx(mu, abs=0.03)
    assert x.var().item() == pytest.approx(s**2, rel=0.08)


def test_annealing_recovers_mixture_weights_that_plain_langevin_misses():
    # Song & Ermon's example: weights (0.2, 0.8), modes far apart; the score is exact in both runs
    weights, means, stds = torch.tensor([0.2, 0.8]), torch.tensor([[-5.0, -5.0], [5.0, 5.0]]), torch.ones(2)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(1000, 2, generator=gen) * 16 - 8  # chains start evenly on both sides
    plain = dae.langevin(lambda v: dae.smoothed_score(v, weights, means, stds, 0.0), x0, 0.1, 500, gen)
    annealed = dae.annealed_langevin(lambda v, sg: dae.smoothed_score(v, weights, means, stds, sg), x0,
                                     dae.geometric_sigmas(20.0, 1.0, 10), 0.1, 50, generator=gen)
    assert (dae.mixture_weights_recovered(annealed, means) - weights).abs().max() < 0.05
    assert (dae.mixture_weights_recovered(plain, means) - weights).abs().max() > 0.2


def test_geometric_sigmas_and_weights_recovered():
    sigmas = dae.geometric_sigmas(2.0, 0.02, 5)
    assert sigmas[0].item() == pytest.approx(2.0) and sigmas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(sigmas[1:] / sigmas[:-1], torch.full((4,), 0.1 ** 0.5), rtol=1e-5)
    assert dae.geometric_sigmas(2.0, 0.02, 1).tolist() == pytest.approx([0.02])  # one level: where samples end
    modes = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    samples = torch.tensor([[1.0, 0.0], [9.0, 1.0], [8.0, -1.0], [0.5, 0.5]])
    assert dae.mixture_weights_recovered(samples, modes).tolist() == [0.5, 0.5, 0.0]


def test_dsm_loss_is_zero_mean_noise_norm_for_the_exact_score_of_a_point_mass():
    # data at a single point c: p_sigma = N(c, sigma^2 I) and its score makes sigma s + eps vanish exactly
    c = torch.tensor([[1.0, -2.0]]).expand(64, 2)
    sigma = torch.rand(64) + 0.1
    exact = lambda v, sg: -(v - c) / sg[:, None] ** 2  # noqa: E731
    assert dae.dsm_loss(exact, c, sigma).item() == pytest.approx(0.0, abs=1e-9)
    assert dae.dsm_loss(lambda v, sg: torch.zeros_like(v), c, sigma).item() > 0.5  # E||eps||^2 / 2 = 1


def test_a_short_dae_run_moves_towards_the_optimal_denoiser():
    torch.manual_seed(0)
    toy = gaussian_mixture([[-1.5, 0.0], [1.5, 0.0]], 0.2)
    data = toy.sample(4096, torch.Generator().manual_seed(0))
    model = dae.DAE((2,), sigma=0.3, width=64, depth=2, lr=3e-3)
    fit(model, BatchSampler(data, 256, seed=0), 300, progress=False)
    points = data[:1000] + 0.3 * torch.randn(1000, 2)
    args = (*dae.mixture_params(toy), 0.3)
    assert dae.denoiser_error(model.denoise, points, *args) < 0.5 * dae.denoiser_error(lambda v: v, points, *args)


def image_spec(options: dict[str, str] | None = None) -> TrainSpec:
    """A TrainSpec over 64 random uint8 1 x 8 x 8 images with tiny nets."""
    images = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return TrainSpec(images, (1, 8, 8), torch.device("cpu"), z_dim=8, width=8, lr=1e-3, batch_size=16,
                     options=options or {})


def toy_spec(options: dict[str, str] | None = None) -> TrainSpec:
    """A TrainSpec over 512 points of a two-mode mixture with small MLPs."""
    points = gaussian_mixture([[2.0, 0.0], [-2.0, 0.0]], 0.1).sample(512, torch.Generator().manual_seed(0))
    return TrainSpec(points, (2,), torch.device("cpu"), z_dim=4, width=32, lr=1e-3, batch_size=64,
                     options=options or {})


FAMILIES = {
    "dde": (dae.build_dde, {"gen_every": "2", "warmup": "1"}),
    "score": (dae.build_score, {"n_sigmas": "3", "steps_per_level": "2"}),
    "dae": (dae.build_dae, {"steps_per_level": "3"}),
}


@pytest.mark.parametrize("make_spec", [toy_spec, image_spec], ids=["toy", "image"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_trains_through_fit_and_samples(family, make_spec):
    torch.manual_seed(0)
    build, options = FAMILIES[family]
    spec = make_spec(dict(options))
    model = build(spec)
    history = fit(model, BatchSampler(spec.data, spec.batch_size, seed=0), 4, log_every=2, progress=False)
    losses = [v for k, values in history.items() if k != "step" for v in values]
    assert losses and all(math.isfinite(v) for v in losses)
    samples = model.sample(5)
    assert samples.shape == (5, *spec.shape) and torch.isfinite(samples).all()


def test_score_builder_gives_images_ncsn_s_noise_ladder_on_the_minus_one_to_one_pixel_range():
    # documented: sigma 2 -> 0.02 (NCSN's 1 -> 0.01 on [0, 1] pixels, doubled) and 100 steps per level
    model = dae.build_score(image_spec())
    assert model.sigmas[0].item() == pytest.approx(2.0) and model.sigmas[-1].item() == pytest.approx(0.02)
    assert model.steps_per_level == 100
    assert dae.build_score(toy_spec()).sigmas[0].item() == pytest.approx(5.0)  # vectors keep the class default


def test_builders_convert_options_and_reject_unknown_ones():
    model = dae.build_dde(toy_spec({"betas": "0.5,0.9", "sigma": "0.3", "train_real": "no"}))
    assert model.optimizers["g"].defaults["betas"] == (0.5, 0.9) and model.sigma == 0.3 and not model.train_real
    with pytest.raises(ValueError, match="unknown option 'nope'"):
        dae.build_score(toy_spec({"nope": "1"}))
    with pytest.raises(ValueError, match="energy_only"):  # the CLI would score an untrained generator
        dae.build_dde(toy_spec({"energy_only": "yes"}))
    assert not dae.build_dde(toy_spec({"energy_only": "no"})).energy_only


def test_dde_sigma_anneals_geometrically_after_warmup():
    model = dae.DDEGenerator((2,), width=8, depth=1, sigma=0.8, sigma_end=0.2, anneal_steps=10, warmup=5)
    for iteration, expected in [(0, 0.8), (5, 0.8), (10, 0.4), (15, 0.2), (100, 0.2)]:
        model._iteration = iteration
        assert model.sigma == pytest.approx(expected)


def test_dde_generator_steps_on_schedule():
    torch.manual_seed(0)
    model = dae.DDEGenerator((2,), z_dim=2, width=16, depth=2, gen_every=3, warmup=2)
    before = [p.clone() for p in model.generator.parameters()]
    x = torch.randn(32, 2)
    for _ in range(5):  # iterations 1-2 warm up, 3 steps the generator (3 % 3 == 0), 4-5 do not
        model.step(x, torch.arange(32))
    assert int(model.iteration) == 5
    moved = any(not torch.equal(a, b) for a, b in zip(before, model.generator.parameters()))
    assert moved and model.last_loss_g.item() != 0.0


@pytest.mark.parametrize("gen_every, warmup", [(1, 0), (3, 2), (2, 5), (4, 9)])
def test_generator_updates_counts_the_generator_steps_a_model_takes(gen_every, warmup, monkeypatch):
    torch.manual_seed(0)
    model = dae.DDEGenerator((2,), z_dim=2, width=8, depth=1, gen_every=gen_every, warmup=warmup)
    taken, update = [], model.update
    monkeypatch.setattr(model, "update", lambda player, loss: (taken.append(player == "g"), update(player, loss)))
    x = torch.randn(8, 2)
    for steps in range(1, 9):  # includes runs that end inside the warm-up
        model.step(x, torch.arange(8))
        assert dae.generator_updates(steps, warmup, gen_every) == sum(taken)


class ExactMixtureScore(nn.Module):
    """The closed-form score of MIX_2D blurred at sigma, in a network's (x [n, 2], sigma) -> [n, 2] signature."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        return dae.smoothed_score(x, MIX_2D["weights"], MIX_2D["means"], MIX_2D["stds"], float(sigma))


def test_final_denoising_step_is_the_optimal_denoiser_at_the_last_level():
    # with no Langevin steps only the final step x + sigma_L^2 score(x, sigma_L) remains; for the exact score
    # it must equal the closed-form posterior mean at the LAST level (0.7), not at the first
    args = (MIX_2D["weights"], MIX_2D["means"], MIX_2D["stds"])
    x = 3 * torch.randn(200, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = lambda v, sg: dae.smoothed_score(v, *args, sg)  # noqa: E731
    out = dae.annealed_langevin(exact, x, [2.0, 1.0, 0.7], 0.1, 0, denoise=True)
    assert torch.allclose(out, dae.optimal_denoiser(x, *args, 0.7), atol=1e-10)
    assert not torch.allclose(out, dae.optimal_denoiser(x, *args, 2.0), atol=1e-3)
    assert torch.equal(dae.annealed_langevin(exact, x, [2.0, 1.0, 0.7], 0.1, 0, denoise=False), x)


def test_dae_sample_ends_with_its_own_denoiser():
    # DAE.sample = Langevin at one level, then r(x); with zero Langevin steps and the exact score it is r*(x0)
    model = dae.DAE((2,), sigma=MIX_2D["sigma"], width=8, depth=1, steps_per_level=0, init_std=3.0)
    model.score = ExactMixtureScore()
    torch.manual_seed(0)
    start = model.initial_points(100)
    torch.manual_seed(0)
    out = model.sample(100)
    expected = dae.optimal_denoiser(start, MIX_2D["weights"], MIX_2D["means"], MIX_2D["stds"], MIX_2D["sigma"])
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(model.denoise(start), expected, atol=1e-5)


def test_dde_generator_rejects_a_sigma_end_without_a_schedule():
    # sigma_end != sigma with no anneal steps used to return sigma_end from step 1, ignoring sigma silently
    with pytest.raises(ValueError, match="anneal_steps >= 1"):
        dae.DDEGenerator((2,), width=8, depth=1, sigma=0.5, sigma_end=0.1)
    with pytest.raises(ValueError, match="anneal_steps must be >= 0"):
        dae.DDEGenerator((2,), width=8, depth=1, sigma=0.5, sigma_end=0.1, anneal_steps=-3)
    with pytest.raises(ValueError, match="anneal_steps must be >= 0"):
        dae.DDEGenerator((2,), width=8, depth=1, sigma=0.5, anneal_steps=-1)
    with pytest.raises(ValueError, match="must be > 0"):
        dae.DDEGenerator((2,), width=8, depth=1, sigma=0.5, sigma_end=0.0, anneal_steps=5)
    with pytest.raises(ValueError, match="must be > 0"):
        dae.DDEGenerator((2,), width=8, depth=1, sigma=0.0, sigma_end=0.1, anneal_steps=5)
    with pytest.raises(ValueError, match="gen_every must be >= 1"):
        dae.DDEGenerator((2,), width=8, depth=1, gen_every=0)
    with pytest.raises(ValueError, match="warmup >= 0"):
        dae.DDEGenerator((2,), width=8, depth=1, warmup=-1)
    # the documented default levels (the DDE code's), and the shortest schedule: one step from sigma to sigma_end
    assert dae.DDEGenerator((2,), width=8, depth=1).sigma == 0.2
    assert dae.DDEGenerator((1, 8, 8), width=8).sigma == 0.6
    model = dae.DDEGenerator((2,), width=8, depth=1, sigma=0.5, sigma_end=0.1, anneal_steps=1)
    model._iteration = 5
    assert model.sigma == pytest.approx(0.1)
    # still accepted: no annealing at all, or a sigma_end equal to sigma, which stays at sigma throughout
    for kwargs in ({}, {"sigma_end": 0.5}, {"sigma_end": 0.5, "anneal_steps": 7}):
        model = dae.DDEGenerator((2,), width=8, depth=1, sigma=0.5, warmup=2, **kwargs)
        for iteration in (0, 3, 50):
            model._iteration = iteration
            assert model.sigma == 0.5


def test_mixture_closed_forms_reject_bad_parameters():
    x = torch.zeros(3, 1)
    means = [[-1.0], [1.0]]
    with pytest.raises(ValueError, match="weights must be >= 0"):
        dae.smoothed_log_density(x, [1.2, -0.2], means, [0.5, 0.5], 0.1)
    with pytest.raises(ValueError, match="positive sum"):
        dae.smoothed_score(x, [0.0, 0.0], means, [0.5, 0.5], 0.1)
    with pytest.raises(ValueError, match="stds must be >= 0"):
        dae.optimal_denoiser(x, [0.5, 0.5], means, [-0.5, 0.5], 0.1)
    with pytest.raises(ValueError, match="std 0 needs sigma > 0"):
        dae.posterior_responsibilities(x, [0.5, 0.5], means, [0.0, 0.5], 0.0)
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        dae.smoothed_log_density(x, [0.5, 0.5], means, [0.5, 0.5], -0.1)
    # a point mass (std 0) blurred by sigma > 0 is fine: N(mu, sigma^2), whose log density we know
    log_p = dae.smoothed_log_density(torch.tensor([[0.3]]), [1.0], [[0.0]], [0.0], 0.5).item()
    assert log_p == pytest.approx(-0.3**2 / (2 * 0.25) - 0.5 * math.log(2 * math.pi * 0.25), rel=1e-6)
    # a zero weight is allowed (that component simply drops out)
    assert torch.allclose(dae.smoothed_log_density(x, [0.0, 1.0], means, [0.5, 0.5], 0.1),
                          dae.smoothed_log_density(x, [1.0], means[1:], [0.5], 0.1))


def test_mixture_closed_forms_check_each_shape():
    x, means, half = torch.zeros(3, 1), [[-1.0], [1.0]], [0.5, 0.5]
    for bad in ((torch.zeros(3), [[0.0]]), (x, [0.0, 1.0]), (torch.zeros(3, 2), means)):  # x 1-D, means 1-D, d differs
        with pytest.raises(ValueError, match=r"need x \[n, d\] and means \[k, d\]"):
            dae.smoothed_log_density(bad[0], [1.0] * len(bad[1]), bad[1], [0.5] * len(bad[1]), 0.1)
    for weights, stds in (([1.0], half), (half, [0.5])):  # one of the two a component short
        with pytest.raises(ValueError, match=r"weights and stds must have shape \[2\]"):
            dae.smoothed_score(x, weights, means, stds, 0.1)


def test_mixture_params_read_a_toy_s_mixture_and_give_equal_weights_when_it_has_none():
    weights, means, stds = dae.mixture_params(toy("ring8"))
    assert weights.tolist() == pytest.approx([1 / 8] * 8)
    assert means.shape == (8, 2) and stds.tolist() == pytest.approx([toy("ring8").std] * 8)
    modes = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    unweighted = Toy("four", draw=lambda n, generator: torch.zeros(n, 2), modes=modes, std=0.1)
    assert dae.mixture_params(unweighted)[0].tolist() == pytest.approx([0.25] * 4)
    for partial in (Toy("no std", draw=unweighted.draw, modes=modes), Toy("no modes", unweighted.draw, std=0.1)):
        with pytest.raises(ValueError, match="not a Gaussian mixture"):
            dae.mixture_params(partial)


def test_geometric_sigmas_accept_equal_ends_and_reject_bad_ones():
    assert dae.geometric_sigmas(0.3, 0.3, 3).tolist() == pytest.approx([0.3] * 3)
    for sigma_max, sigma_min, n in ((1.0, 0.0, 3), (0.5, 1.0, 3), (1.0, 0.1, 0)):
        with pytest.raises(ValueError, match="need 0 < sigma_min <= sigma_max and n >= 1"):
            dae.geometric_sigmas(sigma_max, sigma_min, n)


def test_langevin_with_no_steps_or_a_zero_step_size_returns_its_start():
    x0 = torch.randn(5, 2)
    for step_size, n_steps in ((0.1, 0), (0.0, 4)):
        out = dae.langevin(lambda v: -v, x0, step_size, n_steps)
        assert torch.equal(out, x0) and out is not x0


def test_langevin_samplers_reject_empty_ladders_and_negative_step_counts():
    score = lambda v, sg: -v / (1 + sg**2)  # noqa: E731
    with pytest.raises(ValueError, match="at least one noise level"):
        dae.annealed_langevin(score, torch.zeros(4, 2), [], 0.1, 5)
    with pytest.raises(ValueError, match="at least one noise level"):
        dae.annealed_langevin(score, torch.zeros(4, 2), torch.tensor([]), 0.1, 5)
    with pytest.raises(ValueError, match="n_steps >= 0"):
        dae.langevin(lambda v: -v, torch.zeros(4, 2), 0.1, -1)
    with pytest.raises(ValueError, match="n_steps >= 0"):
        dae.annealed_langevin(score, torch.zeros(4, 2), [1.0], 0.1, -2)


def test_gaussian_kl_matches_torch_distributions_and_quadrature():
    from scipy import integrate, stats

    gen = torch.Generator().manual_seed(0)
    mean_q, mean_p = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64)
    std_q, std_p = torch.rand(2, 5, generator=gen, dtype=torch.float64) + 0.2
    ours = dae.gaussian_kl(mean_q, std_q, mean_p, std_p)
    q = torch.distributions.Independent(torch.distributions.Normal(mean_q, std_q[:, None].expand(5, 3)), 1)
    p = torch.distributions.Independent(torch.distributions.Normal(mean_p, std_p[:, None].expand(5, 3)), 1)
    assert ours.shape == (5,)
    assert torch.allclose(ours, torch.distributions.kl_divergence(q, p), atol=1e-12)
    # 1-D by quadrature with scipy's densities, scalar stds, list means
    mq, sq, mp, sp_ = 0.7, 0.6, -0.2, 1.3
    def integrand(x: float) -> float:
        return stats.norm.pdf(x, mq, sq) * (stats.norm.logpdf(x, mq, sq) - stats.norm.logpdf(x, mp, sp_))

    by_quadrature = integrate.quad(integrand, -20, 20, epsabs=1e-12)[0]
    assert dae.gaussian_kl([mq], sq, [mp], sp_).item() == pytest.approx(by_quadrature, rel=1e-5)
    # zero for identical Gaussians, and differentiable: d KL / d mean_q = (mean_q - mean_p) / std_p^2
    assert dae.gaussian_kl(torch.ones(2), 0.5, torch.ones(2), 0.5).item() == pytest.approx(0.0, abs=1e-7)
    m = torch.tensor([0.4, -1.0], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(dae.gaussian_kl(m, 0.3, torch.zeros(2), 2.0), m)
    assert torch.allclose(grad, m.detach() / 4.0)


def test_gaussian_kl_rejects_bad_input():
    with pytest.raises(ValueError, match="stds must be > 0"):
        dae.gaussian_kl(torch.zeros(2), 0.0, torch.zeros(2), 1.0)
    with pytest.raises(ValueError, match="stds must be > 0"):
        dae.gaussian_kl(torch.zeros(2), 1.0, torch.zeros(2), 0.0)
    with pytest.raises(ValueError, match="stds must be > 0"):
        dae.gaussian_kl(torch.zeros(2), 1.0, torch.zeros(2), torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="same d"):
        dae.gaussian_kl(torch.zeros(2), 1.0, torch.zeros(3), 1.0)
    with pytest.raises(ValueError, match="same d"):
        dae.gaussian_kl(torch.tensor(0.0), 1.0, torch.tensor(0.0), 1.0)
    with pytest.raises(ValueError, match="std_q must be a scalar or broadcast"):  # one std per coordinate
        dae.gaussian_kl(torch.zeros(3), torch.ones(3), torch.zeros(3), 1.0)
    assert dae.gaussian_kl(torch.zeros(4, 3), torch.ones(4), torch.zeros(3), 2.0).shape == (4,)
    # the same with the batch on p's side: one std per Gaussian p, against the 1-D closed form summed over d
    kl = dae.gaussian_kl(torch.zeros(3), 1.0, torch.arange(12.0).view(4, 3), torch.full((4,), 2.0))
    per_coordinate = math.log(2.0) + (1.0 + torch.arange(12.0).view(4, 3) ** 2) / 8 - 0.5
    torch.testing.assert_close(kl, per_coordinate.sum(1))


def test_smoothed_gaussians_kl_by_monte_carlo_with_exact_energies_is_the_closed_form():
    # p = N(0, 1), generator G(z) = m + s z: with the exact energies e = log p_sigma (constants 0), the Monte Carlo
    # mean of e_q - e_p at G(z) + sigma eps is KL(q_sigma || p_sigma) itself, and its reparameterised gradient
    # (e_q's parameter frozen, as in DDEGenerator) is d KL / dm = m / (1 + sigma^2)
    s, sigma, n = 0.7, 0.5, 400_000
    gen = torch.Generator().manual_seed(0)
    z, eps = torch.randn(2, n, 1, generator=gen, dtype=torch.float64)
    for m0 in (0.0, 1.5):
        m = torch.tensor(m0, dtype=torch.float64, requires_grad=True)
        noisy = m + s * z + sigma * eps
        gap = (dae.smoothed_log_density(noisy, [1.0], [[m0]], [s], sigma)
               - dae.smoothed_log_density(noisy, [1.0], [[0.0]], [1.0], sigma))
        (grad,) = torch.autograd.grad(gap.mean(), m)
        exact = dae.gaussian_kl([m0], (s**2 + sigma**2) ** 0.5, [0.0], (1 + sigma**2) ** 0.5).item()
        standard_error = gap.std().item() / n**0.5
        assert gap.mean().item() == pytest.approx(exact, abs=4 * standard_error)
        assert grad.item() == pytest.approx(m0 / (1 + sigma**2), abs=0.01)


def test_closed_forms_normalise_the_mixture_weights():
    means, stds, sigma = [[-2.0], [1.5]], [0.5, 0.3], 0.4
    x = torch.linspace(-4, 4, 9, dtype=torch.float64)[:, None]
    for fn in (dae.smoothed_log_density, dae.smoothed_score, dae.optimal_denoiser, dae.posterior_responsibilities):
        torch.testing.assert_close(fn(x, [3.0, 7.0], means, stds, sigma), fn(x, [0.3, 0.7], means, stds, sigma))
    # independent check: the density with unnormalised weights integrates to 1 (quadrature)
    density = lambda v: math.exp(  # noqa: E731
        dae.smoothed_log_density(torch.tensor([[v]], dtype=torch.float64), [3.0, 7.0], means, stds, sigma).item())
    assert integrate.quad(density, -15, 15, points=[-2.0, 1.5])[0] == pytest.approx(1.0, abs=1e-8)


@pytest.mark.parametrize("shape", [(2,), (1, 4, 4)])
def test_noise_conditional_score_divides_the_body_output_by_sigma(shape):
    net = dae.NoiseConditionalScore(shape, width=8, depth=1)
    seen = []
    # body output 1: the score must be 1 / sigma; the body is conditioned on log sigma
    net.body.forward = lambda x, log_sigma: seen.append(log_sigma) or torch.ones_like(x)
    sigma = torch.tensor([0.1, 0.5, 2.0])
    out = net(torch.zeros(3, *shape), sigma)
    torch.testing.assert_close(out, (1 / sigma).view(-1, *[1] * len(shape)).expand(3, *shape))
    torch.testing.assert_close(seen[0], torch.tensor([math.log(0.1), math.log(0.5), math.log(2.0)]))
    torch.testing.assert_close(net(torch.zeros(3, *shape), 0.25), torch.full((3, *shape), 4.0))


def test_dde_warmup_trains_both_energies_then_the_generator_on_schedule():
    torch.manual_seed(0)
    model = dae.DDEGenerator((2,), z_dim=2, width=8, depth=1, gen_every=1, warmup=2, train_real=False)
    x = torch.randn(16, 2)

    def snapshot():
        return {name: [p.detach().clone() for p in getattr(model, name).parameters()]
                for name in ("energy_real", "energy_fake", "generator")}

    moved_per_step = []
    for _ in range(4):
        before = snapshot()
        model.step(x, torch.arange(16))
        after = snapshot()
        moved_per_step.append({k for k in before if any(not torch.equal(a, b) for a, b in zip(before[k], after[k]))})
    # steps 1-2 warm up (both energies, even with train_real=False); from step 3 the generator steps every time
    # and the real energy is frozen
    assert moved_per_step == [{"energy_real", "energy_fake"}, {"energy_real", "energy_fake"},
                              {"energy_fake", "generator"}, {"energy_fake", "generator"}]


def test_dde_energy_only_trains_e_p_alone_on_the_same_sigma_schedule():
    torch.manual_seed(0)
    kwargs = dict(z_dim=2, width=8, depth=1, warmup=1, sigma=0.4, sigma_end=0.1, anneal_steps=2)
    model = dae.DDEGenerator((2,), energy_only=True, **kwargs)
    frozen = {name: [p.detach().clone() for p in getattr(model, name).parameters()]
              for name in ("energy_fake", "generator")}
    real_before = [p.detach().clone() for p in model.energy_real.parameters()]
    sigmas = []
    for _ in range(3):
        losses = model.step(torch.randn(16, 2), torch.arange(16))
        sigmas.append(model.sigma)
    assert set(losses) == {"loss_real"}
    assert all(torch.equal(a, b) for name, params in frozen.items()
               for a, b in zip(params, getattr(model, name).parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(real_before, model.energy_real.parameters()))
    assert sigmas == pytest.approx([0.4, 0.2, 0.1])  # geometric from 0.4 to 0.1 over 2 steps after 1 of warm-up
    with pytest.raises(ValueError, match="train_real"):
        dae.DDEGenerator((2,), energy_only=True, train_real=False, **kwargs)


def test_score_model_chains_start_from_init_std_gaussians_or_uniform_pixels():
    torch.manual_seed(0)
    vec = dae.ScoreModel((2,), width=8, depth=1, sigma_max=3.0, sigma_min=0.1, n_sigmas=2)
    assert vec.initial_points(40_000).std().item() == pytest.approx(3.0, rel=0.02)  # default init_std = sigma_max
    vec = dae.ScoreModel((2,), width=8, depth=1, init_std=0.5)
    assert vec.initial_points(40_000).std().item() == pytest.approx(0.5, rel=0.02)
    img = dae.ScoreModel((1, 4, 4), width=8).initial_points(2_000)
    assert img.min() >= -1 and img.max() <= 1 and img.std().item() == pytest.approx(1 / math.sqrt(3), rel=0.02)


def test_score_model_langevin_step_defaults_to_a_fifth_of_the_smallest_noise_variance(monkeypatch):
    model = dae.ScoreModel((2,), width=8, depth=1, sigma_max=3.0, sigma_min=0.1, n_sigmas=4, steps_per_level=1)
    smallest = min(float(s) for s in model.sigmas)  # the last level the chains anneal to
    assert model.eps == pytest.approx(0.2 * smallest**2, rel=1e-6)
    assert dae.ScoreModel((2,), width=8, depth=1, eps=0.003).eps == 0.003
    used = []
    annealed = dae.annealed_langevin
    monkeypatch.setattr(dae, "annealed_langevin", lambda *args: used.append(args[3]) or annealed(*args))
    model.sample(3)
    model.sample(3, eps=0.007)
    assert used == [model.eps, 0.007]  # sample() runs with the default unless given another


def test_data_smoothed_log_density_is_the_equal_weight_mixture_of_zero_width_components():
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(50, 12, generator=gen, dtype=torch.float64)
    x = torch.randn(7, 12, generator=gen, dtype=torch.float64)
    want = dae.smoothed_log_density(x, torch.ones(50), data, torch.zeros(50), 0.7)
    for chunk in (50, 8, 1):  # chunking the data changes nothing
        torch.testing.assert_close(dae.data_smoothed_log_density(x, data, 0.7, chunk=chunk), want)
    # images in, flattened: one data point is the Gaussian density itself
    one = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    point = torch.full((1, 1, 2, 2), 0.5, dtype=torch.float64)
    expected = -4 * 0.25 / (2 * 0.3**2) - 2 * math.log(2 * math.pi * 0.3**2)
    assert dae.data_smoothed_log_density(point, one, 0.3).item() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="sigma"):
        dae.data_smoothed_log_density(x, data, 0.0)
    with pytest.raises(ValueError, match="one shape"):
        dae.data_smoothed_log_density(x, data[:, :5], 0.7)


def test_score_network_body_is_a_u_net_for_images_unless_mlp_is_asked_for():
    assert isinstance(dae.NoiseConditionalScore((1, 8, 8), width=8).body, dae.ConvScoreBody)
    assert isinstance(dae.NoiseConditionalScore((1, 8, 8), width=8, arch="mlp").body, dae.MLPScoreBody)
    assert isinstance(dae.NoiseConditionalScore((2,), width=8).body, dae.MLPScoreBody)
    for shape, arch in (((2,), "conv"), ((1, 8, 8), "unet")):
        with pytest.raises(ValueError, match="arch must be"):
            dae.NoiseConditionalScore(shape, width=8, arch=arch)
    for height, width in ((6, 8), (8, 6)):  # one side alone is off
        with pytest.raises(ValueError, match="divisible by 4"):
            dae.ConvScoreBody(1, width=8)(torch.zeros(2, 1, height, width), torch.zeros(2))


@pytest.mark.parametrize("shape", [(2,), (1, 28, 28)])
def test_dde_energy_is_one_number_per_sample(shape):
    assert dae.make_energy(shape, width=8, depth=2)(torch.zeros(5, *shape)).shape == (5,)


def test_dde_energy_activation_defaults_to_softplus_for_vectors_and_leaky_relu_for_images():
    kinds = lambda net: {type(m) for m in net.modules() if isinstance(m, (nn.Softplus, nn.LeakyReLU, nn.SiLU))}
    assert kinds(dae.DDEGenerator((2,), width=8, depth=2).energy_real) == {nn.Softplus}
    image = dae.DDEGenerator((1, 28, 28), width=8)
    assert kinds(image.energy_real) == kinds(image.energy_fake) == {nn.LeakyReLU}
    smooth = dae.DDEGenerator((1, 28, 28), width=8, energy_act="silu")
    assert kinds(smooth.energy_real) == kinds(smooth.energy_fake) == {nn.SiLU}
    assert kinds(dae.make_energy((2,), 8, 2, "silu")) == {nn.SiLU}


def test_smoothed_mass_within_against_one_dimensional_closed_form_and_monte_carlo():
    normal = torch.distributions.Normal(0.0, 1.0)
    weights, means, stds, sigma, radius = [0.3, 0.7], [[-1.0], [2.0]], [0.5, 1.5], 0.8, 0.6
    centres = torch.tensor([[0.0], [2.5], [-4.0]])
    by_hand = sum(w * (normal.cdf((c + radius - m[0]) / math.hypot(sd, sigma))
                       - normal.cdf((c - radius - m[0]) / math.hypot(sd, sigma)))
                  for w, m, sd in zip(weights, means, stds) for c in [centres[:, 0]])
    got = dae.smoothed_mass_within(centres, weights, means, stds, sigma, radius)
    assert torch.allclose(got, by_hand.double(), atol=1e-6)
    # two dimensions, by sampling the blurred mixture
    gen = torch.Generator().manual_seed(0)
    w2, mu2, s2 = torch.tensor([0.2, 0.8]), torch.tensor([[-5.0, -5.0], [5.0, 5.0]]), torch.ones(2)
    pick = torch.multinomial(w2, 400_000, replacement=True, generator=gen)
    blurred = mu2[pick] + math.hypot(1.0, 2.0) * torch.randn(400_000, 2, generator=gen)
    centre = torch.tensor([[-3.0, -4.0], [0.0, 0.0]])
    monte_carlo = ((blurred[None] - centre[:, None]).norm(dim=2) <= 1.5).double().mean(1)
    exact = dae.smoothed_mass_within(centre, w2, mu2, s2, 2.0, 1.5)
    assert torch.allclose(exact, monte_carlo, atol=4 * (exact * (1 - exact) / 400_000).sqrt().max().item())
    assert exact[0] > exact[1] > 0
    with pytest.raises(ValueError, match="radius"):
        dae.smoothed_mass_within(centre, w2, mu2, s2, 2.0, 0.0)


def test_posterior_responsibilities_are_bayes_rule_on_the_blurred_components():
    weights, means, stds, sigma = [0.3, 0.7], [[-1.0], [2.0]], [0.5, 1.0], 0.4
    x = torch.tensor([[-2.0], [0.0], [0.6], [3.0]], dtype=torch.float64)
    joint = torch.stack([w * torch.distributions.Normal(m[0], math.sqrt(s**2 + sigma**2)).log_prob(x[:, 0]).exp()
                         for w, m, s in zip(weights, means, stds)], dim=1)  # w_j N(x; m_j, s_j^2 + sigma^2)
    expected = joint / joint.sum(1, keepdim=True)
    got = dae.posterior_responsibilities(x, weights, means, stds, sigma)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-9)  # genlib works in float32


def test_denoiser_error_is_the_mean_distance_to_the_optimal_denoiser():
    weights, means, stds, sigma = [0.5, 0.5], [[-1.0, 0.0], [1.0, 0.0]], [0.3, 0.3], 0.5
    points = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    offsets = torch.randn(50, 2, generator=torch.Generator().manual_seed(1))
    shifted = lambda v: dae.optimal_denoiser(v, weights, means, stds, sigma) + offsets  # noqa: E731
    error = dae.denoiser_error(shifted, points, weights, means, stds, sigma)
    assert error == pytest.approx(offsets.norm(dim=1).mean().item(), rel=1e-6)


def test_dsm_loss_matches_the_formula_by_hand_with_the_same_noise():
    x = torch.randn(300, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sigma = torch.rand(300, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.2
    score = lambda v, sg: -v / (1 + sg[:, None] ** 2)  # noqa: E731  any score; not the exact one
    torch.manual_seed(4)
    loss = dae.dsm_loss(score, x, sigma).item()
    torch.manual_seed(4)
    eps = torch.randn_like(x)
    noisy = x + sigma[:, None] * eps
    by_hand = (sigma**2 / 2 * (score(noisy, sigma) + (noisy - x) / sigma[:, None] ** 2).pow(2).sum(1)).mean()
    assert loss == pytest.approx(by_hand.item(), rel=1e-10)


def test_annealed_langevin_ends_at_the_last_level_s_stationary_variance_for_its_step():
    """Gaussian data N(0, s^2): p_sigma = N(0, v), v = s^2 + sigma^2, and unadjusted Langevin with step delta has the
    stationary variance v / (1 - delta / 4v). At the last level the step is eps * sigma_L^2 / sigma_L^2 = eps, so a
    large eps inflates the variance by a known factor (1.43 here; a step scaled by sigma instead of sigma^2, or
    multiplied instead of divided, lands elsewhere)."""
    s, sigmas, eps = 0.5, [2.0, 1.0, 0.5], 0.6
    score = lambda v, sg: -v / (s**2 + sg**2)  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(20_000, 1, generator=gen, dtype=torch.float64) * 2
    x = dae.annealed_langevin(score, x0, sigmas, eps, 200, denoise=False, generator=gen)
    v = s**2 + sigmas[-1] ** 2
    assert x.var().item() == pytest.approx(v / (1 - eps / (4 * v)), rel=0.04)  # 0.714; no inflation: 0.5


def test_dde_blur_adds_noise_of_the_current_sigma():
    model = dae.DDEGenerator((2,), sigma=0.3)
    torch.manual_seed(0)
    noise = model.blur(torch.zeros(20_000, 2))
    assert noise.mean().abs().max().item() < 0.01 and noise.std().item() == pytest.approx(0.3, rel=0.02)


class Scale(nn.Module):
    """Generator z -> s z with one learnable scale s."""

    def __init__(self, s: float):
        super().__init__()
        self.s = nn.Parameter(torch.tensor(s))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.s * z


class CentredGaussianLogDensity(nn.Module):
    """The exact energy log N(x; 0, var) of 1-D points [n, 1] -> [n]."""

    def __init__(self, var: float):
        super().__init__()
        self.var = var

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.distributions.Normal(0.0, math.sqrt(self.var)).log_prob(x).squeeze(1)


def test_dde_generator_loss_is_the_blurred_kl_and_its_gradient_flows_through_both_energies():
    """Data N(0, 1), generator s z, exact energies: the loss at blurred fakes is KL(q_sigma || p_sigma) itself, and
    its gradient in s is the full d KL / ds. A scale, unlike a shift, sees e_q's share: E[grad log q . dx/ds] is not 0
    here, so a generator loss that detached e_q would get the sign wrong (+0.48 instead of -0.50); one that skipped
    the blur would report 0.21 instead of 0.10."""
    s, sigma = 0.6, 0.5
    model = dae.DDEGenerator((1,), z_dim=1, width=8, depth=1, sigma=sigma)
    model.generator = Scale(s)
    model.energy_real = CentredGaussianLogDensity(1 + sigma**2)
    model.energy_fake = CentredGaussianLogDensity(s**2 + sigma**2)  # frozen at the current s
    torch.manual_seed(0)
    loss = model.generator_loss(400_000)
    (grad,) = torch.autograd.grad(loss, model.generator.s)
    # closed form, differentiated by autograd: KL(N(0, s^2 + sigma^2) || N(0, 1 + sigma^2)) in 1-D
    scale = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    var_q, var_p = scale**2 + sigma**2, 1 + sigma**2
    kl = 0.5 * torch.log(var_p / var_q) + var_q / (2 * var_p) - 0.5
    (kl_grad,) = torch.autograd.grad(kl, scale)
    assert loss.item() == pytest.approx(kl.item(), abs=0.01)  # Monte Carlo standard error about 5e-4
    assert grad.item() == pytest.approx(kl_grad.item(), abs=0.02)  # about 2e-3


def test_dde_energies_fit_clean_data_blurred_at_the_current_sigma_and_e_q_fits_the_generators_fakes(monkeypatch):
    # halfway through the annealing sigma is sqrt(0.8 * 0.2) = 0.4: the loss must use it, not the starting 0.8
    model = dae.DDEGenerator((1,), z_dim=2, width=8, depth=1, sigma=0.8, sigma_end=0.2, anneal_steps=2)
    model._iteration = 1
    x = torch.tensor([[0.5], [-1.0], [2.0]])
    a, b = 1.7, -0.4
    torch.manual_seed(0)
    loss = model.energy_loss(Quadratic(a, b), x)
    torch.manual_seed(0)
    noisy = x + 0.4 * torch.randn_like(x)
    denoised = noisy + 0.4**2 * (-a * noisy + b)  # grad e = -a x + b; the target is the clean x
    assert loss.item() == pytest.approx(0.5 * (denoised - x).pow(2).mean().item(), rel=1e-6)
    # in a step, e_p is fitted on the data and e_q on fakes of the generator as it was before the step
    model = dae.DDEGenerator((2,), z_dim=2, width=8, depth=1, gen_every=1)
    before = copy.deepcopy(model.generator)
    fitted, draws = {}, []
    fit_energy, noise = model.fit_energy, model.noise

    def recording_fit(player, energy, samples):
        fitted[player] = samples.detach().clone()
        return fit_energy(player, energy, samples)

    monkeypatch.setattr(model, "fit_energy", recording_fit)
    monkeypatch.setattr(model, "noise", lambda n: draws.append(noise(n)) or draws[-1])
    torch.manual_seed(1)
    data = torch.randn(16, 2)
    model.step(data, torch.arange(16))
    assert torch.equal(fitted["real"], data)
    with torch.no_grad():
        torch.testing.assert_close(fitted["fake"], before(draws[0]))


def test_dae_loss_is_the_squared_error_of_its_denoiser_summed_per_point_and_averaged():
    """mean_i ||r(x_i + sigma eps_i) - x_i||^2 with r(v) = v + sigma^2 s(v, sigma), on the same noise; written out, and
    as 2 sigma^2 times the DSM loss at the one level (r - x = sigma (eps + sigma s))."""
    sigma = 0.3
    model = dae.DAE((3,), sigma=sigma, width=8, depth=1)
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    loss = model.loss(x).item()
    torch.manual_seed(1)
    noisy = x + sigma * torch.randn_like(x)
    with torch.no_grad():
        denoised = noisy + sigma**2 * model.score(noisy, torch.full((64,), sigma))
    assert loss == pytest.approx((denoised - x).pow(2).sum(1).mean().item(), rel=1e-5)
    torch.manual_seed(1)
    assert loss == pytest.approx(2 * sigma**2 * dae.dsm_loss(model.score, x, torch.full((64,), sigma)).item(), rel=1e-5)


def test_score_model_trains_on_every_noise_level_equally_often(monkeypatch):
    from scipy import stats

    model = dae.ScoreModel((2,), width=8, depth=1, sigma_max=3.0, sigma_min=0.1, n_sigmas=4)
    seen = []
    monkeypatch.setattr(dae, "dsm_loss", lambda score, x, sigma: seen.append(sigma) or x.sum())
    torch.manual_seed(0)
    model.loss(torch.zeros(4000, 2))
    levels = torch.tensor([3.0 * (0.1 / 3.0) ** (k / 3) for k in range(4)])  # geometric from 3 to 0.1
    counts = [(seen[0] - level).abs().lt(1e-5).sum().item() for level in levels]
    assert sum(counts) == 4000  # no other levels
    assert stats.chisquare(counts).pvalue > 1e-3  # uniform: the smallest level is not left out


@pytest.mark.parametrize("final_denoise", [True, False])
def test_score_model_sample_ends_with_a_tweedie_step_only_when_asked(final_denoise):
    # with no Langevin steps the chains stay where they started, then (if asked) the exact denoiser at sigma_min
    model = dae.ScoreModel((2,), width=8, depth=1, sigma_max=2.0, sigma_min=MIX_2D["sigma"], n_sigmas=3,
                           steps_per_level=0, final_denoise=final_denoise, init_std=3.0)
    model.score = ExactMixtureScore()
    torch.manual_seed(0)
    start = model.initial_points(100)
    torch.manual_seed(0)
    out = model.sample(100)
    args = (MIX_2D["weights"], MIX_2D["means"], MIX_2D["stds"], MIX_2D["sigma"])
    torch.testing.assert_close(out, dae.optimal_denoiser(start, *args) if final_denoise else start, atol=1e-5,
                               rtol=0)


def test_dde_generator_steps_with_lr_g_and_the_energies_with_lr():
    # Adam's first update is lr * g / (|g| + eps): every parameter with a gradient moves by about its lr
    torch.manual_seed(0)
    model = dae.DDEGenerator((2,), z_dim=2, width=8, depth=1, lr=1e-3, lr_g=4e-4, gen_every=1)
    nets = ("generator", "energy_real", "energy_fake")
    before = {name: [p.detach().clone() for p in getattr(model, name).parameters()] for name in nets}
    model.step(torch.randn(32, 2), torch.arange(32))
    for name, lr in zip(nets, (4e-4, 1e-3, 1e-3)):
        moved = max((p - q).abs().max().item() for p, q in zip(getattr(model, name).parameters(), before[name]))
        assert moved == pytest.approx(lr, rel=1e-3), name


def test_the_optimal_denoiser_maps_a_blurred_gaussian_to_one_of_std_s2_over_root_s2_plus_sigma2():
    # chapter 4's final-step claim: for data N(mu, s^2), r* maps p_sigma = N(mu, s^2 + sigma^2) to a Gaussian of
    # std s^2 / sqrt(s^2 + sigma^2): a shrinkage towards mu by s^2 / (s^2 + sigma^2), checked on exact draws
    for s, sigma in ((1.0, 1.0), (0.1, 0.05)):
        noisy = 3.0 + (s**2 + sigma**2) ** 0.5 * torch.randn(400_000, 1, generator=torch.Generator().manual_seed(0),
                                                             dtype=torch.float64)
        denoised = dae.optimal_denoiser(noisy, [1.0], [[3.0]], [s], sigma)
        assert denoised.std().item() == pytest.approx(s**2 / (s**2 + sigma**2) ** 0.5, rel=5e-3)  # 4 std errors
        assert denoised.mean().item() == pytest.approx(3.0, abs=5e-3 * s)
