"""Tests for genlib.metrics, each against an independent reference (NumPy loops, SciPy, closed forms)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch

from genlib import metrics as M


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


def _random_spd(rng: np.random.Generator, f: int) -> np.ndarray:
    a = rng.normal(size=(f, f))
    return a @ a.T + 0.1 * np.eye(f)


# ----------------------------------------------------------------------------- references


def _ref_sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.empty((len(a), len(b)))
    for i in range(len(a)):
        for j in range(len(b)):
            out[i, j] = np.sum((a[i] - b[j]) ** 2)
    return out


def _ref_unbiased_mmd2(x: np.ndarray, y: np.ndarray, kernel) -> float:
    m, n = len(x), len(y)
    kxx = sum(kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(kernel(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kxy = sum(kernel(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return kxx + kyy - 2 * kxy


def _ref_one_nn(x: np.ndarray, y: np.ndarray) -> float:
    z = np.concatenate([x, y])
    labels = [0] * len(x) + [1] * len(y)
    correct = 0
    for i in range(len(z)):
        best, best_j = np.inf, -1
        for j in range(len(z)):
            if j != i and np.linalg.norm(z[i] - z[j]) < best:
                best, best_j = np.linalg.norm(z[i] - z[j]), j
        correct += labels[best_j] == labels[i]
    return correct / len(z)


def _ref_fd(mu1, s1, mu2, s2) -> float:
    root = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root).real)


def _ref_is(p: np.ndarray) -> float:
    py = p.mean(0)
    kl = [
        sum(p[i, k] * math.log(p[i, k] / py[k]) for k in range(p.shape[1]) if p[i, k] > 0) for i in range(len(p))
    ]
    return math.exp(np.mean(kl))


# ----------------------------------------------------------------------------- pairwise distances


def test_pairwise_sq_dists_matches_loop():
    rng = _rng(1)
    a, b = rng.normal(size=(7, 4)), rng.normal(size=(5, 4)) + 3.0
    got = M.pairwise_sq_dists(_t(a).float(), _t(b).float())
    assert got.dtype == torch.float64 and got.shape == (7, 5)
    ref = _ref_sq_dists(a.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-10)


def test_pairwise_sq_dists_self_is_nonnegative_with_zero_diagonal():
    x = _t(_rng(2).normal(size=(50, 3)) * 100.0)
    d = M.pairwise_sq_dists(x, x)
    assert (d >= 0).all()
    np.testing.assert_allclose(d.diagonal().numpy(), 0.0, atol=1e-8)


# ----------------------------------------------------------------------------- mode coverage


def test_mode_coverage_on_true_mixture():
    gen = torch.Generator().manual_seed(0)
    std, k, n = 0.02, 8, 2500
    angles = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
    modes = 2.0 * torch.stack([angles.cos(), angles.sin()], dim=1)
    which = torch.randint(k, (n,), generator=gen)
    samples = modes[which] + std * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    covered, hq = M.mode_coverage(samples.float(), modes.float(), std=std)
    assert covered == 8
    # P(||z|| <= 3) for a standard 2-D Gaussian is 1 - exp(-9/2); the binomial s.e. is ~0.002.
    assert abs(hq - (1 - math.exp(-4.5))) < 0.01


def test_mode_coverage_hand_made():
    modes = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    samples = torch.tensor(
        [
            [2.99, 0.0],  # mode 0, inside 3
            [0.0, 0.0],  # mode 0, exactly on it
            [10.0, 3.01],  # mode 1, just outside 3
            [5.5, 0.0],  # mode 1 at 4.5, outside 3
            [1.0, 9.0],  # mode 2 at sqrt(2)
        ]
    )
    assert M.mode_coverage(samples, modes, std=1.0) == (2, pytest.approx(3 / 5))
    assert M.mode_coverage(samples, modes, std=1.0, threshold=5.0) == (3, pytest.approx(1.0))
    assert M.mode_coverage(samples, modes, std=0.1, threshold=1.0) == (1, pytest.approx(1 / 5))
    assert M.mode_counts(samples, modes, std=1.0).tolist() == [2, 0, 1]
    assert M.mode_counts(samples, modes, std=1.0, threshold=5.0).tolist() == [2, 2, 1]
    assert M.coverage_from_counts(torch.tensor([2, 0, 1]), 5) == (2, pytest.approx(3 / 5))
    assert M.coverage_from_counts(torch.zeros(3, dtype=torch.int64), 5) == (0, 0.0)


def _coverage_brute_force(hit_probs: list[float], n: int) -> tuple[float, float, float]:
    """Exact moments of the covered-mode count by enumerating every sequence of n outcomes (k modes + a miss)."""
    outcome_probs = [*hit_probs, 1 - sum(hit_probs)]
    first = second = 0.0
    for outcome in itertools.product(range(len(outcome_probs)), repeat=n):
        chance = math.prod(outcome_probs[o] for o in outcome)
        covered = len(set(outcome) - {len(hit_probs)})
        first, second = first + chance * covered, second + chance * covered**2
    return first, math.sqrt(second - first**2), sum(hit_probs)


@pytest.mark.parametrize("hit_probs, n", [([0.3], 1), ([0.2, 0.5], 3), ([0.1, 0.25, 0.05], 5), ([0.5, 0.5], 4),
                                          ([0.0, 0.4], 3)])  # a mode no point can reach
def test_coverage_by_chance_matches_enumeration(hit_probs, n):
    expected = _coverage_brute_force(hit_probs, n)
    got = M.coverage_by_chance(torch.tensor(hit_probs, dtype=torch.float64), n)
    assert got == pytest.approx(expected, abs=1e-12)


def test_uniform_square_coverage_matches_uniform_noise_on_a_ring():
    """Uniform points over a square around 8 tight modes, scored by mode_coverage, over many draws."""
    gen = torch.Generator().manual_seed(0)
    std, half_width, n, draws = 0.1, 2.6, 200, 2000
    angles = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
    modes = 2.0 * torch.stack([angles.cos(), angles.sin()], dim=1)
    scores = [M.mode_coverage((torch.rand(n, 2, generator=gen, dtype=torch.float64) * 2 - 1) * half_width,
                              modes, std) for _ in range(draws)]
    covered = torch.tensor([c for c, _ in scores], dtype=torch.float64)
    mean, sd, hq = M.uniform_square_coverage(modes, std, half_width, n)
    assert abs(covered.mean().item() - mean) < 4 * sd / math.sqrt(draws)
    assert covered.std().item() == pytest.approx(sd, rel=0.08)
    assert sum(h for _, h in scores) / draws == pytest.approx(hq, rel=0.03)
    with pytest.raises(ValueError, match="beyond the square"):  # a disc cut by the edge: the formula would be wrong
        M.uniform_square_coverage(modes, std, 2.2, n)
    # a disc that only touches the edge still lies inside (2 + 3 * 0.25 == 2.75 exactly): one mode, hit pi r^2 / (2h)^2
    hit = math.pi * 0.75**2 / 5.5**2
    missed = (1 - hit) ** n
    edge = M.uniform_square_coverage(torch.tensor([[2.0, -2.0]]), 0.25, 2.75, n)
    assert edge == pytest.approx((1 - missed, math.sqrt(missed * (1 - missed)), hit), rel=1e-12)  # float64 throughout


# ----------------------------------------------------------------------------- Fréchet distance


def test_frechet_gaussians_matches_scipy_sqrtm():
    rng = _rng(3)
    for f in (1, 3, 8):
        mu1, mu2 = rng.normal(size=f), rng.normal(size=f)
        s1, s2 = _random_spd(rng, f), _random_spd(rng, f)
        got = M.frechet_distance_gaussians(_t(mu1), _t(s1), _t(mu2), _t(s2))
        assert got == pytest.approx(_ref_fd(mu1, s1, mu2, s2), rel=1e-8, abs=1e-8)


def test_frechet_gaussians_diagonal_closed_form():
    rng = _rng(4)
    a, b = rng.uniform(0.1, 3.0, size=6), rng.uniform(0.1, 3.0, size=6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = M.frechet_distance_gaussians(_t(mu1), _t(np.diag(a)), _t(mu2), _t(np.diag(b)))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_gaussians_equal_covariance_is_mean_distance():
    rng = _rng(5)
    s = _random_spd(rng, 5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    got = M.frechet_distance_gaussians(_t(mu1), _t(s), _t(mu2), _t(s))
    assert got == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-8, abs=1e-9)


def test_frechet_gaussians_singular_covariance():
    # Rank-deficient covariances give tiny negative eigenvalues that must be clamped, not NaN.
    rng = _rng(6)
    v = rng.normal(size=(4, 2))
    s1, s2 = v @ v.T, np.diag([1.0, 2.0, 0.0, 0.0])
    got = M.frechet_distance_gaussians(_t(np.zeros(4)), _t(s1), _t(np.zeros(4)), _t(s2))
    # sqrtm is unreliable on singular input; S1 S2 has real non-negative eigenvalues, so sum their roots.
    trace_root = np.sum(np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)))
    assert math.isfinite(got)
    assert got == pytest.approx(np.trace(s1) + np.trace(s2) - 2 * trace_root, abs=1e-6)


def test_frechet_distance_from_features_matches_numpy():
    rng = _rng(7)
    a, b = rng.normal(size=(200, 6)), rng.normal(size=(150, 6)) @ rng.normal(size=(6, 6)) + 1.0
    expected = _ref_fd(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert M.frechet_distance(_t(a).float(), _t(b).float()) == pytest.approx(expected, rel=1e-5)
    assert M.frechet_distance(_t(a), _t(a)) == pytest.approx(0.0, abs=1e-9)


# ----------------------------------------------------------------------------- MMD and KID


def test_mmd2_matches_loop_with_bandwidth():
    rng = _rng(8)
    x, y = rng.normal(size=(20, 3)), rng.normal(size=(15, 3)) + 0.5
    h = 1.3
    ref = _ref_unbiased_mmd2(x, y, lambda a, b: math.exp(-np.sum((a - b) ** 2) / (2 * h * h)))
    assert M.mmd2(_t(x), _t(y), bandwidth=h) == pytest.approx(ref, rel=1e-10, abs=1e-12)


def test_mmd2_median_heuristic_matches_loop():
    rng = _rng(9)
    x, y = rng.normal(size=(12, 2)), rng.normal(size=(13, 2)) * 2.0
    z = np.concatenate([x, y])
    h = np.median([np.linalg.norm(z[i] - z[j]) for i in range(len(z)) for j in range(i + 1, len(z))])
    ref = _ref_unbiased_mmd2(x, y, lambda a, b: math.exp(-np.sum((a - b) ** 2) / (2 * h * h)))
    assert M.mmd2(_t(x), _t(y)) == pytest.approx(ref, rel=1e-10, abs=1e-12)
    assert M.median_bandwidth(_t(x), _t(y)) == pytest.approx(h, rel=1e-12)
    # Same-distribution MMD^2 is unbiased around 0 and can be negative; different ones are clearly positive.
    assert M.mmd2(_t(x), _t(y)) > M.mmd2(_t(x[:6]), _t(x[6:]))


@pytest.mark.parametrize("scale", [1e-3, 10.0])
def test_mmd2_with_the_median_heuristic_does_not_change_when_both_sets_are_scaled(scale):
    # the bandwidth is a distance of the data, so it scales with them and the kernel matrix stays the same
    rng = _rng(24)
    x, y = rng.normal(size=(12, 2)), rng.normal(size=(10, 2)) + 1.0
    assert M.mmd2(_t(scale * x), _t(scale * y)) == pytest.approx(M.mmd2(_t(x), _t(y)), rel=1e-9)
    assert M.median_bandwidth(_t(scale * x), _t(scale * y)) == pytest.approx(scale * M.median_bandwidth(_t(x), _t(y)))


def test_kid_matches_polynomial_loop():
    rng = _rng(10)
    a, b = rng.normal(size=(25, 4)), rng.normal(size=(25, 4)) + 0.3
    ref = _ref_unbiased_mmd2(a, b, lambda u, v: (u @ v / 4 + 1) ** 3)
    # subset_size is clipped to 25, so every subset is the whole (shuffled) set: the estimate is exact.
    mean, std = M.kid(_t(a), _t(b), subsets=3, subset_size=1000, generator=torch.Generator().manual_seed(0))
    assert mean == pytest.approx(ref, rel=1e-10)
    assert std == 0.0  # one subset is computed, not three identical ones


def test_kid_subsets_are_reproducible_and_vary():
    rng = _rng(11)
    a, b = _t(rng.normal(size=(60, 3))), _t(rng.normal(size=(40, 3)) + 1.0)
    first = M.kid(a, b, subsets=5, subset_size=20, generator=torch.Generator().manual_seed(3))
    again = M.kid(a, b, subsets=5, subset_size=20, generator=torch.Generator().manual_seed(3))
    assert first == again
    assert first[1] > 0
    full = _ref_unbiased_mmd2(a.numpy(), b.numpy(), lambda u, v: (u @ v / 3 + 1) ** 3)
    assert abs(first[0] - full) < 3 * first[1] + 0.5 * full


def test_kid_std_is_the_population_std_of_the_subset_scores():
    """The documented std is ddof=0 over subsets (np.std's default). Each subset's score is replayed by a one-subset
    call on the same generator stream (three calls draw what one three-subset call draws); the first is checked
    against the NumPy loop on the rows that stream picks. ddof=1 would be sqrt(3 / 2) times larger."""
    rng = _rng(12)
    a, b = _t(rng.normal(size=(30, 3))), _t(rng.normal(size=(24, 3)) + 0.5)
    stream = torch.Generator().manual_seed(5)
    scores = [M.kid(a, b, subsets=1, subset_size=10, generator=stream)[0] for _ in range(3)]
    replay = torch.Generator().manual_seed(5)  # the rows the first subset drew: randperm of a, then of b
    rows_a, rows_b = torch.randperm(30, generator=replay)[:10], torch.randperm(24, generator=replay)[:10]
    first = _ref_unbiased_mmd2(a[rows_a].numpy(), b[rows_b].numpy(), lambda u, v: (u @ v / 3 + 1) ** 3)
    assert scores[0] == pytest.approx(first, rel=1e-10)
    mean, std = M.kid(a, b, subsets=3, subset_size=10, generator=torch.Generator().manual_seed(5))
    assert mean == pytest.approx(np.mean(scores), rel=1e-12)
    assert std == pytest.approx(np.std(scores, ddof=0), rel=1e-10)
    assert abs(np.std(scores, ddof=0) - np.std(scores, ddof=1)) > 1e-3 * np.std(scores, ddof=0)  # the two differ


def test_two_rows_per_set_are_enough_for_the_two_sample_statistics():
    # the least that defines a covariance, an unbiased U-statistic and a pairwise median; one row is refused
    rng = _rng(25)
    x, y = rng.normal(size=(2, 1)), rng.normal(size=(2, 1)) + 1.0  # 1-D: two rows give a non-singular variance
    fd = (x.mean() - y.mean()) ** 2 + (x.std(ddof=1) - y.std(ddof=1)) ** 2  # 1-D Gaussians' closed form
    assert M.frechet_distance(_t(x), _t(y)) == pytest.approx(fd, rel=1e-6)
    gauss = lambda a, b: math.exp(-np.sum((a - b) ** 2) / 2)  # noqa: E731
    assert M.mmd2(_t(x), _t(y), bandwidth=1.0) == pytest.approx(_ref_unbiased_mmd2(x, y, gauss), rel=1e-10)
    z = np.concatenate([x, y])
    pairs = [np.linalg.norm(z[i] - z[j]) for i in range(4) for j in range(i + 1, 4)]
    assert M.median_bandwidth(_t(x), _t(y)) == pytest.approx(np.median(pairs), rel=1e-12)
    for statistic in (M.frechet_distance, M.mmd2, M.median_bandwidth, M.kid):
        with pytest.raises(ValueError, match="at least 2"):
            statistic(_t(x[:1]), _t(y))


def test_kid_of_two_rows_each_is_the_exact_mmd2_without_a_generator():
    # the smallest allowed subset (2 rows) and the default random stream: the one subset is the whole of both sets
    rng = _rng(23)
    a, b = rng.normal(size=(2, 3)), rng.normal(size=(2, 3)) + 0.5
    expected = _ref_unbiased_mmd2(a, b, lambda u, v: (u @ v / 3 + 1) ** 3)
    assert M.kid(_t(a), _t(b), subsets=4, subset_size=2) == (pytest.approx(expected, rel=1e-10), 0.0)


@pytest.mark.parametrize("n_a, n_b, subset_size", [(24, 10, 1000), (10, 24, 8)])
def test_kid_draws_as_many_rows_from_each_set_as_the_smaller_set_and_the_subset_size_allow(n_a, n_b, subset_size):
    # documented: min(subset_size, n, m) rows of each set, a permutation of a's rows then one of b's
    rng = _rng(22)
    a, b = _t(rng.normal(size=(n_a, 3))), _t(rng.normal(size=(n_b, 3)) + 0.5)
    mean, _ = M.kid(a, b, subsets=1, subset_size=subset_size, generator=torch.Generator().manual_seed(2))
    size = min(subset_size, n_a, n_b)
    replay = torch.Generator().manual_seed(2)
    rows_a, rows_b = torch.randperm(n_a, generator=replay)[:size], torch.randperm(n_b, generator=replay)[:size]
    expected = _ref_unbiased_mmd2(a[rows_a].numpy(), b[rows_b].numpy(), lambda u, v: (u @ v / 3 + 1) ** 3)
    assert mean == pytest.approx(expected, rel=1e-10)


# ----------------------------------------------------------------------------- 1-NN and Wasserstein


@pytest.mark.parametrize("sizes, shift", [((20, 20), 0.0), ((20, 20), 1.0), ((15, 23), 0.5)])
def test_one_nn_accuracy_matches_loop(sizes, shift):
    rng = _rng(12)
    x, y = rng.normal(size=(sizes[0], 3)), rng.normal(size=(sizes[1], 3)) + shift
    assert M.one_nn_accuracy(_t(x), _t(y)) == pytest.approx(_ref_one_nn(x, y))


def _ref_one_nn_by_set(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    z, n = np.concatenate([x, y]), len(x)
    dist = np.linalg.norm(z[:, None] - z[None], axis=-1) + np.diag(np.full(len(z), np.inf))
    correct = (dist.argmin(1) < n) == (np.arange(len(z)) < n)
    return correct[:n].mean(), correct[n:].mean()


@pytest.mark.parametrize("sizes, shift", [((20, 20), 0.0), ((15, 23), 0.5)])
def test_one_nn_accuracies_split_the_overall_accuracy_by_set(sizes, shift):
    rng = _rng(15)
    x, y = rng.normal(size=(sizes[0], 3)), rng.normal(size=(sizes[1], 3)) + shift
    on_real, on_fake = M.one_nn_accuracies(_t(x), _t(y))
    assert (on_real, on_fake) == pytest.approx(_ref_one_nn_by_set(x, y))
    assert (sizes[0] * on_real + sizes[1] * on_fake) / sum(sizes) == pytest.approx(M.one_nn_accuracy(_t(x), _t(y)))


def test_one_nn_accuracies_tell_collapse_from_realism():
    rng = _rng(16)
    real = rng.normal(size=(200, 2))
    collapsed = real[:1] + 0.01 * rng.normal(size=(200, 2))  # every fake next to one real point
    realistic = real + 0.01 * rng.normal(size=(200, 2))  # a fake next to every real point
    collapsed_real, collapsed_fake = M.one_nn_accuracies(_t(real), _t(collapsed))
    assert collapsed_fake >= 0.95 and collapsed_real >= 0.95  # both sets find their own kind: easy to tell apart
    realistic_real, realistic_fake = M.one_nn_accuracies(_t(real), _t(realistic))
    assert realistic_real <= 0.05 and realistic_fake <= 0.05  # each point's neighbour is its twin in the other set


def test_one_nn_accuracy_disjoint_sets_is_one():
    rng = _rng(13)
    x, y = rng.normal(size=(30, 2)), rng.normal(size=(30, 2)) + 100.0
    assert M.one_nn_accuracy(_t(x), _t(y)) == 1.0


def test_wasserstein_matches_scipy_in_1d():
    rng = _rng(14)
    x, y = rng.normal(size=40), rng.exponential(size=40)
    expected = scipy.stats.wasserstein_distance(x, y)
    assert M.wasserstein(_t(x[:, None]), _t(y[:, None])) == pytest.approx(expected, rel=1e-7)


def test_wasserstein_matches_brute_force_permutations_in_2d():
    rng = _rng(15)
    x, y = rng.normal(size=(6, 2)), rng.normal(size=(6, 2)) + 0.7
    cost = np.sqrt(_ref_sq_dists(x, y))
    best = min(sum(cost[i, p[i]] for i in range(6)) for p in itertools.permutations(range(6))) / 6
    assert M.wasserstein(_t(x), _t(y)) == pytest.approx(best, rel=1e-9)


def test_wasserstein_admits_exactly_the_sample_cap(monkeypatch):
    # the cap is inclusive; a small stand-in cap keeps the exact assignment instant
    monkeypatch.setattr(M, "WASSERSTEIN_MAX_SAMPLES", 4)
    x = _t(np.arange(4.0)[:, None])
    assert M.wasserstein(x, x + 1.0) == pytest.approx(1.0)  # every point moves by 1
    with pytest.raises(ValueError, match="cap 4"):
        M.wasserstein(_t(np.arange(5.0)[:, None]), _t(np.arange(5.0)[:, None]))


# ----------------------------------------------------------------------------- Inception and Mode Score


def test_inception_score_constant_predictions_is_one():
    probs = torch.tensor([[0.2, 0.5, 0.3]]).repeat(10, 1)
    assert M.inception_score(probs) == pytest.approx(1.0)


@pytest.mark.parametrize("k", [2, 5, 10])
def test_inception_score_uniform_one_hot_is_k(k):
    probs = torch.eye(k).repeat(4, 1)
    assert M.inception_score(probs) == pytest.approx(k)


def test_inception_score_matches_numpy_with_splits():
    p = _rng(16).dirichlet(np.full(6, 0.3), size=30)
    assert M.inception_score(_t(p)) == pytest.approx(_ref_is(p), rel=1e-10)
    split_ref = np.mean([_ref_is(p[:10]), _ref_is(p[10:20]), _ref_is(p[20:])])
    assert M.inception_score(_t(p).float(), splits=3) == pytest.approx(split_ref, rel=1e-5)


def test_inception_score_splits_rows_as_numpy_array_split_does_down_to_one_row_each():
    p = _rng(23).dirichlet(np.full(4, 0.5), size=10)
    # 10 rows in 3 splits: chunks of 4, 3 and 3 (near-equal), not 4, 4 and 2
    expected = np.mean([_ref_is(part) for part in np.array_split(p, 3)])
    assert M.inception_score(_t(p), splits=3) == pytest.approx(expected, rel=1e-10)
    # one row per split: each row is its own marginal, so every KL is 0 and every score exactly 1
    assert M.inception_score(_t(p), splits=10) == pytest.approx(1.0, abs=1e-12)


def test_mode_score_matches_numpy():
    rng = _rng(17)
    p, q = rng.dirichlet(np.full(5, 0.5), size=40), rng.dirichlet(np.full(5, 2.0), size=60)
    py, pr = p.mean(0), q.mean(0)
    expected = _ref_is(p) * math.exp(-np.sum(py * np.log(py / pr)))
    assert M.mode_score(_t(p), _t(q)) == pytest.approx(expected, rel=1e-10)
    # With real marginal equal to the sample marginal the penalty vanishes: Mode Score = IS.
    assert M.mode_score(_t(p), _t(p)) == pytest.approx(M.inception_score(_t(p)), rel=1e-12)


def test_mode_score_zero_when_class_missing_from_real_data():
    probs = torch.eye(3).repeat(2, 1)
    real = torch.tensor([[0.5, 0.5, 0.0]])
    assert M.mode_score(probs, real) == 0.0


# ----------------------------------------------------------------------------- input validation


GOOD = torch.zeros(5, 2)


@pytest.mark.parametrize(
    "call",
    [
        lambda: M.pairwise_sq_dists(torch.zeros(5), GOOD),
        lambda: M.pairwise_sq_dists(GOOD, torch.zeros(5, 3)),
        lambda: M.pairwise_sq_dists(GOOD, torch.tensor([[0.0, float("nan")]])),
        lambda: M.pairwise_sq_dists(np.zeros((5, 2)), GOOD),
        lambda: M.mode_coverage(GOOD, torch.zeros(3, 3), std=1.0),
        lambda: M.mode_coverage(GOOD, GOOD, std=0.0),
        lambda: M.mode_coverage(GOOD, GOOD, std=True),  # a bool is not a number here
        lambda: M.mode_coverage(GOOD, GOOD, std="1"),
        lambda: M.mode_coverage(GOOD, GOOD, std=1.0, threshold=-1.0),
        lambda: M.coverage_by_chance(torch.tensor([0.5, 0.6]), 10),
        lambda: M.coverage_by_chance(torch.tensor([-0.1, 0.5]), 10),
        lambda: M.coverage_by_chance(torch.tensor([[0.1]]), 10),
        lambda: M.coverage_by_chance(torch.tensor([0.1]), 0),
        lambda: M.coverage_by_chance(torch.tensor([0.1]), 2.5),
        lambda: M.coverage_by_chance([0.1, 0.2], 10),  # a list, not a tensor
        lambda: M.kid(GOOD, GOOD, subsets=True),
        lambda: M.frechet_distance(torch.zeros(1, 2), GOOD),
        lambda: M.frechet_distance(GOOD, torch.zeros(5, 3)),
        lambda: M.frechet_distance_gaussians(torch.zeros(2), torch.eye(2), torch.zeros(3), torch.eye(2)),
        lambda: M.frechet_distance_gaussians(torch.zeros(2), torch.zeros(2, 3), torch.zeros(2), torch.eye(2)),
        lambda: M.frechet_distance_gaussians(torch.zeros(2), torch.eye(2), torch.zeros(2), torch.zeros(3, 2)),
        lambda: M.mmd2(GOOD, torch.zeros(1, 2), bandwidth=1.0),
        lambda: M.mmd2(GOOD, GOOD, bandwidth=0.0),
        lambda: M.mmd2(GOOD, GOOD),  # all points coincide: the median heuristic gives 0
        lambda: M.median_bandwidth(GOOD, GOOD),
        lambda: M.kid(GOOD, GOOD, subset_size=1),
        lambda: M.kid(GOOD, GOOD, subsets=0),
        lambda: M.one_nn_accuracy(GOOD, torch.zeros(4, 3)),
        lambda: M.wasserstein(GOOD, torch.zeros(4, 2)),
        lambda: M.wasserstein(*[torch.zeros(M.WASSERSTEIN_MAX_SAMPLES + 1, 1)] * 2),
        lambda: M.inception_score(torch.tensor([[2.0, -1.0]])),
        lambda: M.inception_score(torch.tensor([[0.2, 0.2]])),
        lambda: M.inception_score(torch.tensor([[0.5, 0.49]])),  # 1 % short of a distribution
        lambda: M.inception_score(torch.eye(3), splits=4),
        lambda: M.mode_score(torch.eye(3), torch.eye(2)),
    ],
)
def test_bad_inputs_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_a_bad_input_s_error_names_the_argument():
    with pytest.raises(ValueError, match="^a must be 2-D"):
        M.pairwise_sq_dists(torch.zeros(5), GOOD)
    with pytest.raises(ValueError, match="^b must be 2-D"):
        M.pairwise_sq_dists(GOOD, torch.zeros(5))
    with pytest.raises(ValueError, match="^feats_b needs at least 2 row"):
        M.frechet_distance(GOOD, torch.zeros(1, 2))


# ----------------------------------------------------------------------------- devices


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    rng = _rng(18)
    x, y = _t(rng.normal(size=(40, 3))).float(), _t(rng.normal(size=(40, 3)) + 0.5).float()
    p = _t(rng.dirichlet(np.ones(4), size=40))
    cases = [
        lambda d: M.mode_coverage(x.to(d), y[:8].to(d), std=0.5),
        lambda d: M.frechet_distance(x.to(d), y.to(d)),
        lambda d: M.mmd2(x.to(d), y.to(d)),
        lambda d: M.kid(x.to(d), y.to(d), subsets=2, subset_size=100),
        lambda d: M.one_nn_accuracy(x.to(d), y.to(d)),
        lambda d: M.wasserstein(x.to(d), y.to(d)),
        lambda d: M.inception_score(p.to(d), splits=2),
        lambda d: M.mode_score(p.to(d), p.flip(0).to(d)),
    ]
    for case in cases:
        assert case("cuda") == pytest.approx(case("cpu"), rel=1e-6, abs=1e-9)


def test_median_bandwidth_matches_numpy_for_an_odd_number_of_pairs():
    # 3 + 3 pooled points -> 15 distinct pairs (odd): the median is the single middle distance
    rng = np.random.default_rng(20)
    x, y = rng.normal(size=(3, 2)), rng.normal(size=(3, 2)) + 1.0
    z = np.concatenate([x, y])
    d = [np.linalg.norm(z[i] - z[j]) for i in range(6) for j in range(i + 1, 6)]
    assert len(d) % 2 == 1
    assert M.median_bandwidth(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(np.median(d), rel=1e-12)


def test_frechet_gaussians_symmetrises_slightly_asymmetric_covariances():
    # estimated covariances carry asymmetric round-off; the distance must be that of the symmetric parts
    rng = np.random.default_rng(21)
    f = 4
    a, b = rng.normal(size=(f, f)), rng.normal(size=(f, f))
    s1, s2 = a @ a.T + 0.1 * np.eye(f), b @ b.T + 0.1 * np.eye(f)
    skew = rng.normal(size=(f, f))
    skew = 0.05 * (skew - skew.T)  # antisymmetric: (S + K + (S + K)^T) / 2 == S
    mu1, mu2 = rng.normal(size=f), rng.normal(size=f)
    expected = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
                     - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)
    t = torch.from_numpy
    got = M.frechet_distance_gaussians(t(mu1), t(s1 + skew), t(mu2), t(s2 - skew))
    assert got == pytest.approx(expected, rel=1e-8, abs=1e-8)


def test_mode_counts_radius_is_inclusive_and_counts_cover_every_mode():
    modes = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    # exactly on the radius: 3 std along an axis, and 5 std on a 3-4-5 triangle (exact in floating point)
    assert M.mode_counts(torch.tensor([[3.0, 0.0]]), modes, std=1.0).tolist() == [1, 0, 0]
    assert M.mode_counts(torch.tensor([[3.0, 4.0]]), modes, std=1.0, threshold=5.0).tolist() == [1, 0, 0]
    assert M.mode_counts(torch.tensor([[3.0, 4.0]]), modes, std=1.0, threshold=4.999).tolist() == [0, 0, 0]
    # one count per mode even when the last modes get no sample
    assert M.mode_counts(torch.tensor([[0.5, 0.0]]), modes, std=1.0).shape == (3,)
