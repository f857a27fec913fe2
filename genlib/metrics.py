"""Metrics: sample-quality measures as pure functions on torch tensors.

Every function takes tensors on any device (CPU or CUDA), validates them, and does the
precision-sensitive arithmetic in float64. Pairwise distances all go through one helper,
:func:`pairwise_sq_dists`, which uses a single matrix product (no loops over samples).
The all-pairs metrics (``mmd2``, ``one_nn_accuracy``, ``wasserstein``) hold an
``n x m`` float64 matrix in memory, so they are meant for a few thousand samples.
"""

from __future__ import annotations

import math
import numbers

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

__all__ = [
    "WASSERSTEIN_MAX_SAMPLES",
    "check_positive",
    "coverage_by_chance",
    "coverage_from_counts",
    "frechet_distance",
    "frechet_distance_gaussians",
    "inception_score",
    "kid",
    "mmd2",
    "mode_counts",
    "mode_coverage",
    "mode_score",
    "one_nn_accuracies",
    "one_nn_accuracy",
    "pairwise_sq_dists",
    "uniform_square_coverage",
    "wasserstein",
]

# The exact assignment is O(n^3) time and O(n^2) memory; beyond this it takes minutes.
WASSERSTEIN_MAX_SAMPLES = 5000


# ----------------------------------------------------------------------------- validation


def _matrix(name: str, t: Tensor, min_rows: int = 1) -> Tensor:
    """Check that ``t`` is a finite 2-D tensor with at least ``min_rows`` rows; return it in float64."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n, d], got shape {tuple(t.shape)}")
    if t.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} row(s), got shape {tuple(t.shape)}")
    if t.shape[1] < 1:
        raise ValueError(f"{name} needs at least one feature column, got shape {tuple(t.shape)}")
    t = t.detach().to(torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return t


def _pair(
    x: Tensor, y: Tensor, names: tuple[str, str] = ("x", "y"), min_rows: int = 1
) -> tuple[Tensor, Tensor]:
    """Validate two sample matrices that must share a feature dimension and a device."""
    a, b = _matrix(names[0], x, min_rows), _matrix(names[1], y, min_rows)
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same feature dimension, "
            f"got {a.shape[1]} and {b.shape[1]}"
        )
    if a.device != b.device:
        raise ValueError(f"{names[0]} is on {a.device} but {names[1]} is on {b.device}")
    return a, b


def _probs(name: str, p: Tensor) -> Tensor:
    """Validate a [n, K] matrix of class probabilities (non-negative rows summing to 1)."""
    p = _matrix(name, p)
    if (p < 0).any():
        raise ValueError(f"{name} has negative entries; pass probabilities, not logits")
    # float32 softmax rows are off by ~1e-7; anything far beyond that is not a distribution.
    if not torch.allclose(p.sum(dim=1), torch.ones_like(p[:, 0]), atol=1e-3, rtol=0):
        raise ValueError(f"rows of {name} must sum to 1; pass softmax outputs, not logits")
    return p


def _vector(name: str, v: Tensor, length: int) -> Tensor:
    """Check that ``v`` is a finite 1-D tensor of the given length; return it in float64."""
    if not isinstance(v, Tensor) or v.ndim != 1 or v.shape[0] != length:
        shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(f"{name} must be a 1-D tensor of length {length}, got {shape}")
    return _matrix(name, v[None, :])[0]


def _check_int(name: str, value: int, minimum: int) -> int:
    """Check that ``value`` is an integer (not a bool) of at least ``minimum``; return it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_counts(minimum: int, **values: int) -> None:
    """ValueError naming the first keyword that is not an integer >= ``minimum``, e.g. ``check_counts(1, depth=0)``."""
    for name, value in values.items():
        _check_int(name, value, minimum)


def check_positive(name: str, value: float) -> float:
    """``value`` as a float; ValueError naming ``name`` unless it is a finite positive number."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (real and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------- distances


def _sq_dists(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distances [n, m] between rows of validated float64 ``a`` and ``b``."""
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    # Cancellation in the expansion can leave tiny negatives where the true value is 0.
    return sq.clamp_min_(0.0)


def pairwise_sq_dists(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distances [n, m] (float64) between rows of a [n, d] and b [m, d]."""
    return _sq_dists(*_pair(a, b, ("a", "b")))


def _off_diagonal_mean(k: Tensor) -> Tensor:
    """Mean of the off-diagonal entries of a square matrix (the U-statistic over i != j)."""
    n = k.shape[0]
    return (k.sum() - k.diagonal().sum()) / (n * (n - 1))


def _unbiased_mmd2(kxx: Tensor, kyy: Tensor, kxy: Tensor) -> float:
    """Unbiased MMD^2 from the three kernel blocks (diagonals of kxx and kyy excluded)."""
    return float(_off_diagonal_mean(kxx) + _off_diagonal_mean(kyy) - 2.0 * kxy.mean())


def _median(v: Tensor) -> Tensor:
    """Median of a 1-D tensor, averaging the two middle values for even length (as NumPy)."""
    k = v.numel()
    lo = torch.kthvalue(v, (k + 1) // 2).values
    hi = torch.kthvalue(v, k // 2 + 1).values
    return (lo + hi) / 2


# ----------------------------------------------------------------------------- metrics


def mode_counts(samples: Tensor, modes: Tensor, std: float, threshold: float = 3.0) -> Tensor:
    """Samples [n, d] against mixture modes [k, d]: the number of high-quality samples at each mode [k] (int64).

    A sample is high quality when it lies within ``threshold * std`` (inclusive) of its nearest
    mode, and it counts for that mode.
    """
    s, m = _pair(samples, modes, ("samples", "modes"))
    radius = check_positive("threshold", threshold) * check_positive("std", std)
    nearest_sq, nearest = _sq_dists(s, m).min(dim=1)
    return torch.bincount(nearest[nearest_sq <= radius**2], minlength=len(m))


def mode_coverage(samples: Tensor, modes: Tensor, std: float, threshold: float = 3.0) -> tuple[int, float]:
    """Samples [n, d] against mixture modes [k, d]: (modes covered, fraction of high-quality samples).

    From :func:`mode_counts`: a mode is covered when at least one high-quality sample is nearest to it.
    """
    return coverage_from_counts(mode_counts(samples, modes, std, threshold), len(samples))


def coverage_from_counts(counts: Tensor, n_samples: int) -> tuple[int, float]:
    """(modes covered, fraction of high-quality samples) from the :func:`mode_counts` ``[k]`` of ``n_samples``."""
    return int((counts > 0).sum()), float(counts.sum()) / n_samples


def coverage_by_chance(hit_probs: Tensor, n_samples: int) -> tuple[float, float, float]:
    """Expected (modes covered, its std, hq fraction) of ``n_samples`` independent points.

    ``hit_probs`` [k]: the chance that one point lands within the high-quality radius of mode k (disjoint
    balls, so a hit is also nearest to that mode). Mode k is missed with chance ``(1 - p_k)^n``, two modes
    together with ``(1 - p_j - p_k)^n``; the std follows from those pairwise covariances.
    """
    k = hit_probs.shape[0] if isinstance(hit_probs, Tensor) and hit_probs.ndim == 1 else -1
    p = _vector("hit_probs", hit_probs, k)
    if (p < 0).any() or p.sum() > 1 + 1e-12:
        raise ValueError(f"hit_probs must be probabilities summing to at most 1, got {hit_probs}")
    n = _check_int("n_samples", n_samples, 1)
    missed = (1 - p) ** n
    both_missed = (1 - p[:, None] - p[None, :]).clamp_min(0) ** n
    cov = both_missed - missed[:, None] * missed[None, :]  # cov of the 'missed' indicators
    cov.diagonal().copy_(missed * (1 - missed))
    return float(len(p) - missed.sum()), float(cov.sum().clamp_min(0).sqrt()), float(p.sum())


def uniform_square_coverage(modes: Tensor, std: float, half_width: float, n_samples: int,
                            threshold: float = 3.0) -> tuple[float, float, float]:
    """:func:`coverage_by_chance` of ``n_samples`` points uniform on the square [-half_width, half_width]^2 around
    2-D modes [k, 2] of component ``std``: one point lands within ``threshold`` std of a mode with chance
    pi (threshold std)^2 / (2 half_width)^2, the disc's share of the square (every disc must lie inside it)."""
    radius = threshold * std
    if float(modes.abs().max()) + radius > half_width:
        raise ValueError(f"a mode's disc of radius {radius:g} reaches beyond the square of half-width {half_width:g}")
    hit = math.pi * radius ** 2 / (2 * half_width) ** 2
    return coverage_by_chance(torch.full((len(modes),), hit, dtype=torch.float64), n_samples)


def frechet_distance_gaussians(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """Fréchet distance between N(mu1 [f], cov1 [f, f]) and N(mu2 [f], cov2 [f, f]).

    ``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})``, where the trace of the square root
    is the sum of square roots of the eigenvalues of the symmetric PSD matrix
    ``S1^{1/2} S2 S1^{1/2}`` (same spectrum as ``S1 S2``, but stable to diagonalise).
    The result is not clamped, so round-off may make it slightly negative for equal inputs.
    """
    s1, s2 = _pair(cov1, cov2, ("cov1", "cov2"))
    f = s1.shape[1]
    if s1.shape != (f, f) or s2.shape != (f, f):
        raise ValueError(f"covariances must be square [f, f], got {tuple(s1.shape)} and {tuple(s2.shape)}")
    m1, m2 = _vector("mu1", mu1, f), _vector("mu2", mu2, f)
    # Symmetrise: estimated covariances carry round-off asymmetry that eigh would ignore silently.
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    w, v = torch.linalg.eigh(s1)
    root1 = (v * w.clamp_min(0).sqrt()) @ v.T
    inner = root1 @ s2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    return float(((m1 - m2) ** 2).sum() + s1.trace() + s2.trace() - 2.0 * trace_sqrt)


def _mean_cov(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean [f] and unbiased covariance [f, f] of validated float64 samples [n, f]."""
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """Fréchet distance of Gaussians fitted (unbiased covariance) to feats_a [n, f] and feats_b [m, f].

    With n or m <= f a fitted covariance is singular (rank below f): the distance is still defined, but biased
    upwards far more than with many more samples than features (FID's practice: 10,000 or more for 2,048)."""
    a, b = _pair(feats_a, feats_b, ("feats_a", "feats_b"), min_rows=2)
    return frechet_distance_gaussians(*_mean_cov(a), *_mean_cov(b))


def mmd2(x: Tensor, y: Tensor, bandwidth: float | None = None) -> float:
    """Unbiased MMD^2 between x [n, d] and y [m, d] with the kernel exp(-||a-b||^2 / (2 bandwidth^2)).

    ``bandwidth=None`` uses the median heuristic: the median Euclidean distance over all
    distinct pairs of the pooled sample ``x ∪ y``. The estimator can be negative.
    """
    a, b = _pair(x, y, min_rows=2)
    pooled = torch.cat([a, b])
    d2 = _sq_dists(pooled, pooled)
    if bandwidth is None:
        bandwidth = _median_distance(d2)
    k = torch.exp(-d2 / (2.0 * check_positive("bandwidth", bandwidth) ** 2))
    n = len(a)
    return _unbiased_mmd2(k[:n, :n], k[n:, n:], k[:n, n:])


def median_bandwidth(x: Tensor, y: Tensor) -> float:
    """The bandwidth :func:`mmd2` picks by default for x [n, d] and y [m, d]: the median Euclidean distance over
    all distinct pairs of the pooled sample."""
    a, b = _pair(x, y, min_rows=2)
    pooled = torch.cat([a, b])
    return _median_distance(_sq_dists(pooled, pooled))


def _median_distance(d2: Tensor) -> float:
    """The median of sqrt(d2) over the distinct pairs (i < j) of a square matrix of squared distances [N, N]."""
    # A boolean mask costs N^2 bytes, far less than triu_indices' 16 bytes per pair.
    upper = torch.ones_like(d2, dtype=torch.bool).triu_(1)
    bandwidth = float(_median(d2[upper].sqrt()))
    if bandwidth <= 0:
        raise ValueError("median heuristic gave bandwidth 0 (most points coincide); pass one explicitly")
    return bandwidth


def _poly_kernel(a: Tensor, b: Tensor) -> Tensor:
    """The KID kernel (a.b / d + 1)^3 between rows of a [n, d] and b [m, d]."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def kid(
    feats_a: Tensor,
    feats_b: Tensor,
    subsets: int = 10,
    subset_size: int = 1000,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """Kernel Inception Distance of feats_a [n, f] and feats_b [m, f]: (mean, std) over random subsets.

    Each subset draws ``min(subset_size, n, m)`` rows of each set without replacement and
    computes the unbiased MMD^2 with the kernel ``(x.y / f + 1)^3``. The std is the
    population std (ddof=0) over subsets, so it is 0 for ``subsets=1``, and when a subset is the
    whole of both sets (every subset would give the same value, so one is computed).
    """
    a, b = _pair(feats_a, feats_b, ("feats_a", "feats_b"), min_rows=2)
    _check_int("subsets", subsets, 1)
    _check_int("subset_size", subset_size, 2)
    size = min(subset_size, len(a), len(b))
    if size == len(a) == len(b):
        subsets = 1
    gen_device = generator.device if generator is not None else "cpu"
    scores = []
    for _ in range(subsets):  # loops over subsets only; each subset is one batch of GEMMs
        xa = a[torch.randperm(len(a), generator=generator, device=gen_device)[:size].to(a.device)]
        xb = b[torch.randperm(len(b), generator=generator, device=gen_device)[:size].to(b.device)]
        scores.append(_unbiased_mmd2(_poly_kernel(xa, xa), _poly_kernel(xb, xb), _poly_kernel(xa, xb)))
    values = torch.tensor(scores, dtype=torch.float64)
    return float(values.mean()), float(values.std(correction=0))


def _one_nn_correct(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Leave-one-out 1-NN on x [n, d] (label 0) ∪ y [m, d] (label 1): per point, whether its nearest other
    point has its label -> (correct [n] for x, correct [m] for y), as doubles. Exact ties go to the lower index."""
    a, b = _pair(x, y)
    pooled = torch.cat([a, b])
    labels = torch.cat([torch.zeros(len(a), device=a.device), torch.ones(len(b), device=a.device)])
    d2 = _sq_dists(pooled, pooled)
    d2.fill_diagonal_(float("inf"))  # leave-one-out: a point may not be its own neighbour
    correct = (labels[d2.argmin(dim=1)] == labels).double()
    return correct[: len(a)], correct[len(a):]


def one_nn_accuracy(x: Tensor, y: Tensor) -> float:
    """Leave-one-out 1-NN two-sample accuracy on x [n, d] (label 0) ∪ y [m, d] (label 1).

    0.5 means indistinguishable and 1.0 disjoint, when n == m. Unequal sizes are allowed,
    but then the chance level is no longer 0.5 (it is the overall accuracy over all n + m
    points, so the larger set weighs more). Exact distance ties go to the lower index.
    """
    return float(torch.cat(_one_nn_correct(x, y)).mean())


def one_nn_accuracies(real: Tensor, fake: Tensor) -> tuple[float, float]:
    """The 1-NN two-sample accuracy split by set: (accuracy on real [n, d], accuracy on fake [m, d]).

    Low accuracy on the reals means generated points surround them (the fakes look real); high accuracy on
    the fakes means they sit apart from the reals, e.g. crowded on a few modes (too little diversity)."""
    on_real, on_fake = _one_nn_correct(real, fake)
    return float(on_real.mean()), float(on_fake.mean())


def wasserstein(x: Tensor, y: Tensor) -> float:
    """Exact W1 (Euclidean cost) between equal-size empirical sets x [n, d] and y [n, d].

    Solved as an optimal assignment with ``scipy.optimize.linear_sum_assignment`` on the
    CPU; ``n`` is capped at ``WASSERSTEIN_MAX_SAMPLES`` (5000) because that is O(n^3).
    """
    a, b = _pair(x, y)
    if len(a) != len(b):
        raise ValueError(f"wasserstein needs equal-size sets, got {len(a)} and {len(b)}")
    if len(a) > WASSERSTEIN_MAX_SAMPLES:
        raise ValueError(
            f"wasserstein is exact and O(n^3): n={len(a)} exceeds the cap {WASSERSTEIN_MAX_SAMPLES}; subsample first"
        )
    cost = _sq_dists(a, b).sqrt().cpu().numpy()
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean())


def _mean_kl_to_marginal(p: Tensor) -> tuple[Tensor, Tensor]:
    """E_x KL(p(y|x) || p(y)) for p [n, K], and the marginal p(y) [K] it uses."""
    marginal = p.mean(0)
    # xlogy makes 0 * log 0 = 0; the marginal is positive wherever a row is.
    kl = (torch.xlogy(p, p) - torch.xlogy(p, marginal)).sum(1)
    return kl.mean(), marginal


def inception_score(probs: Tensor, splits: int = 1) -> float:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) of class probabilities probs [n, K].

    Always returns one float: with ``splits > 1`` the rows are cut into ``splits``
    contiguous, near-equal chunks, each scored with its own marginal, and the mean score
    is returned. Ranges from 1 (constant predictions) to K (confident and uniform classes).
    """
    p = _probs("probs", probs)
    if not isinstance(splits, int) or not 1 <= splits <= len(p):
        raise ValueError(f"splits must be an int in [1, {len(p)}], got {splits!r}")
    scores = [_mean_kl_to_marginal(chunk)[0].exp() for chunk in torch.tensor_split(p, splits)]
    return float(torch.stack(scores).mean())


def mode_score(probs: Tensor, probs_real: Tensor) -> float:
    """Mode Score of probs [n, K] against real-data probs_real [m, K].

    ``exp(E_x KL(p(y|x) || p(y)) - KL(p(y) || p_real(y)))`` with ``p_real`` the mean row of
    ``probs_real`` (the form in Xu et al., 2018). It is 0 when the samples put mass on a
    class that the real data never predicts.
    """
    p, q = _probs("probs", probs), _probs("probs_real", probs_real)
    if p.shape[1] != q.shape[1]:
        raise ValueError(f"probs and probs_real must have the same classes, got K={p.shape[1]} and K={q.shape[1]}")
    if p.device != q.device:
        raise ValueError(f"probs is on {p.device} but probs_real is on {q.device}")
    sharpness, marginal = _mean_kl_to_marginal(p)
    mismatch = (torch.xlogy(marginal, marginal) - torch.xlogy(marginal, q.mean(0))).sum()
    return float((sharpness - mismatch).exp())
