"""Tests of genlib.imle: exact nearest neighbours, the smoothed likelihood, Lap1, the KL sign,
and IMLE / GLO / GLANN trained through genlib.train.fit."""

from __future__ import annotations

import copy
import decimal
import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage, stats

from genlib import imle
from genlib.data import BatchSampler, load_images, to_float, toy, toy_dataset
from genlib.metrics import mode_coverage
from genlib.nets import MLP, ConvGenerator
from genlib.train import fit




def brute_force(queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: float64 ||q - k||^2 against every key, first index on ties (a few queries at a time)."""
    rows = max(1, 2**25 // (keys.shape[0] * keys.shape[1]))
    dist = torch.cat([(block.double()[:, None, :] - keys.double()[None, :, :]).pow(2).sum(-1)
                      for block in queries.split(rows)])
    return dist.min(1).values, dist.argmin(1)


def naive_fp32_argmin(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """What a plain fp32 GEMM search returns (the thing that gets near-ties wrong)."""
    dist = (queries * queries).sum(1)[:, None] - 2 * queries @ keys.T + (keys * keys).sum(1)[None]
    return dist.argmin(1)


def assert_same_as_brute_force(queries, keys, device="cpu", **kw):
    """The search on ``device`` returns the CPU float64 brute force's answer, index for index."""
    dist, index = imle.nearest_neighbors(queries.to(device), keys.to(device), **kw)
    ref_dist, ref_index = brute_force(queries, keys)
    assert index.dtype == torch.int64 and index.shape == (len(queries),)
    assert index.device.type == torch.device(device).type
    assert torch.equal(index.cpu(), ref_index)
    torch.testing.assert_close(dist.cpu(), ref_dist, rtol=1e-12, atol=0.0)


# ----------------------------------------------------------------------------- nearest neighbours


@pytest.mark.parametrize("m, n, d", [(1, 1, 3), (50, 7, 2), (300, 500, 16), (64, 100, 2048), (257, 1000, 33)])
def test_nearest_neighbors_equals_float64_brute_force(m, n, d, device):
    g = torch.Generator().manual_seed(m * n + d)
    queries, keys = torch.randn(m, d, generator=g), torch.randn(n, d, generator=g)
    assert_same_as_brute_force(queries, keys, device)
    assert_same_as_brute_force(queries, keys, device, chunk_size=61)  # blocks over queries and keys


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_low_precision_passes_are_still_exact(precision, device):
    """The CUDA passes (on the CPU, emulated): coarse GEMM inputs, same certified answer."""
    g = torch.Generator().manual_seed(1)
    queries, keys = torch.rand(200, 64, generator=g) * 2 - 1, torch.rand(300, 64, generator=g) * 2 - 1
    assert_same_as_brute_force(queries, keys, device, precision=precision)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_inputs_of_every_float_dtype_are_searched_exactly(dtype, device):
    """Half-precision inputs are widened to fp32 for the GEMM, float64 ones rounded to it (with their rounding in
    the bound); the answer is the float64 brute force's on the same values."""
    g = torch.Generator().manual_seed(8)
    queries, keys = torch.randn(60, 300, generator=g).to(dtype), torch.randn(500, 300, generator=g).to(dtype)
    assert_same_as_brute_force(queries, keys, device)


def near_tie_cloud(n_keys: int, seed: int = 0):
    """Queries and keys around one far-off point, differing by ~1e-6 relative."""
    g = torch.Generator().manual_seed(seed)
    centre = 100 + torch.randn(32, generator=g)
    keys = centre + 1e-4 * torch.randn(n_keys, 32, generator=g)
    queries = centre + 1e-4 * torch.randn(40, 32, generator=g)
    return queries, keys


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lower_bound_holds_for_every_pair_and_is_tight(precision, dtype):
    """The certificate's premise, checked directly: lower bound <= the float64 distance for every pair, with
    fp32 centring, rounding and norms, on data far from the origin and spread over many scales."""
    g = torch.Generator().manual_seed(4)
    scale = torch.logspace(-3, 3, 96, dtype=torch.float64)
    queries = (50 + torch.randn(40, 96, generator=g, dtype=torch.float64) * scale).to(dtype)
    keys = (50 + torch.randn(70, 96, generator=g, dtype=torch.float64) * scale).to(dtype)
    centre = (keys.sum(0, dtype=torch.float64) / len(keys)).float()
    q = imle._round_centred(queries, centre, precision)
    exact_norm2 = q.rounded.double().pow(2).sum(1)
    assert torch.allclose(q.norm2.double(), exact_norm2, rtol=(imle.NORM_CHUNK + 6) * imle.FP32_UNIT, atol=0)
    assert (q.norm >= exact_norm2.sqrt()).all()
    assert (q.resid >= ((queries.double() - centre) - q.rounded.double()).norm(dim=1)).all()
    approx, lower = imle.distance_lower_bounds(queries, keys, precision)
    exact = (queries.double()[:, None] - keys.double()[None]).pow(2).sum(-1)
    assert approx.shape == lower.shape == exact.shape and lower.dtype == torch.float64 and (lower <= exact).all()
    close = {"fp32": 1e-3, "tf32": 0.05, "bf16": 0.3}[precision]
    assert ((approx.double() - exact).abs() < close * exact).all()  # close, not certified
    # ... and tight enough to be of use: close to the nearest distance, closer with a finer precision
    slack = 1 - lower.gather(1, exact.argmin(1, keepdim=True)).squeeze(1) / exact.min(1).values
    assert (slack < {"fp32": 1e-3, "tf32": 0.03, "bf16": 0.2}[precision]).all()


def documented_lower_bound(approx, a, q_resid, b, k_resid, d, tensor_cores, margin=8) -> decimal.Decimal:
    """_lower_bound's docstring formula in 60-digit decimal arithmetic (its own float64 safety factors left out):
    ``max(0, sqrt(approx - e) - r)^2 (1 - 8 (d + 4) u64)`` with ``e = 2 gamma a b + (g + margin u) (a + b)^2``."""
    D = decimal.Decimal  # noqa: N806
    u, u64 = D(2) ** -24, D(2) ** -53
    gamma = 2 * (d + 4) * u * (D(imle.TENSOR_CORE_SAFETY) if tensor_cores else 1)
    gamma = gamma / (1 - gamma)
    terms = min(d, imle.NORM_CHUNK) + 6
    g = terms * u / (1 - terms * u)
    a, b, approx = D(a), D(b), D(approx)
    e = 2 * gamma * a * b + (g + margin * u) * (a + b) ** 2
    r = D(q_resid) + D(k_resid)
    near = max(D(0), (approx - e).sqrt() - r) if approx > e else D(0)
    return near**2 * (1 - 8 * (d + 4) * u64)


@pytest.mark.parametrize("tensor_cores", [False, True])
@pytest.mark.parametrize("d", [96, 30_000])
def test_lower_bound_is_its_documented_formula_and_never_above_it(d, tensor_cores):
    """Every error term of the certificate, checked against its formula computed independently. The docstring's
    8 u holds 4 u for the fp32 copies and additions and 4 u of room for the float64 arithmetic of the bound, so the
    code must lie between the formula with 4 u (the least that is rigorous) and with 8 u (up to round-off). A large
    d makes the O(gamma^2) terms visible; approx spans values just above the error e to far above it."""
    g = torch.Generator().manual_seed(7)
    a = torch.rand(6, generator=g, dtype=torch.float64) * 2 + 0.5
    q_resid = torch.rand(6, generator=g, dtype=torch.float64) * 1e-3
    b, k_resid = torch.tensor(1.7, dtype=torch.float64), torch.tensor(4e-4, dtype=torch.float64)
    approx = (a[:, None] + b) ** 2 * torch.logspace(-6, 0, 9, dtype=torch.float64)  # [6, 9]: e is ~1e-5..1e-2 of it
    with decimal.localcontext(decimal.Context(prec=60)):
        got = imle._lower_bound(approx.float(), a.float(), q_resid.float(), b.float(), k_resid.float(), d,
                                tensor_cores=tensor_cores)
        for i, j in itertools.product(range(6), range(9)):
            args = (float(approx.float()[i, j]), float(a.float()[i]), float(q_resid.float()[i]), float(b.float()),
                    float(k_resid.float()), d, tensor_cores)
            assert decimal.Decimal(got[i, j].item()) <= documented_lower_bound(*args, margin=4)
            assert got[i, j].item() >= float(documented_lower_bound(*args)) * (1 - 1e-9)
    assert (got == 0).any() and (got > 0).any()  # both regimes: e swamps approx, and a useful bound


def tf32_nearest_or_tie(value: float) -> tuple[float, float]:
    """The two TF32 neighbours (8 exponent bits, 10 stored mantissa bits) of a float64 ``value``, both the nearest
    one unless ``value`` is an exact tie between them; worked out with math.frexp, not with bits."""
    if value == 0:
        return value, value
    _, exponent = math.frexp(abs(value))  # 2^(exponent - 1) <= |value| < 2^exponent
    quantum = 2.0 ** max(exponent - 11, -136)  # 11 significant bits; below 2^-126 the subnormals' fixed step
    steps = abs(value) / quantum  # exact: a power-of-two scaling
    low = math.floor(steps)
    if steps - low == 0.5:
        return math.copysign(low * quantum, value), math.copysign((low + 1) * quantum, value)
    nearest = math.copysign(round(steps) * quantum, value)
    return nearest, nearest


def test_tf32_rounding_is_to_the_nearest_value_with_ten_mantissa_bits():
    """_round(x, 'tf32') of fp32 values of every magnitude and sign (subnormals and exact ties included) clears the
    low 13 mantissa bits and lands on the nearest TF32 value, computed in float64 with math.frexp; an exact tie
    (which the code's rounding rule does not pin down) lands on one of its two neighbours."""
    g = torch.Generator().manual_seed(21)
    n = 400
    sign = torch.randint(0, 2, (n,), generator=g) << 31
    exponent = torch.randint(1, 254, (n,), generator=g)  # normal fp32 whose rounding up stays finite
    exponent[:20] = 0  # subnormals
    mantissa = torch.randint(0, 2**23, (n,), generator=g)
    mantissa[20:80] = (mantissa[20:80] & ~0x1FFF) | 0x1000  # exact ties: the dropped bits are 1000...0
    mantissa[80:90] = 0x7FF000 + torch.arange(10) % 2  # ties and just-above-ties that carry into the exponent
    bits = (sign | exponent << 23 | mantissa).to(torch.int32)  # int64 -> int32 wraps the sign bit into place
    x = torch.cat([bits.view(torch.float32), torch.randn(200, generator=g) * torch.logspace(-20, 20, 200)])
    rounded = imle._round(x, "tf32")
    assert rounded.dtype == torch.float32 and rounded.shape == x.shape
    assert not (rounded.view(torch.int32) & 0x1FFF).any()  # the 13 bits TF32 drops are zero
    ties = 0
    for value, got in zip(x.double().tolist(), rounded.double().tolist()):
        below, above = tf32_nearest_or_tie(value)
        assert got in (below, above), (value, got, below, above)
        ties += below != above
    assert ties >= 60  # the built ties are ties
    assert not torch.equal(rounded, x)  # some values did have bits to drop: a no-op fails above


def test_distance_lower_bounds_validates_precision():
    with pytest.raises(ValueError, match="precision must be one of"):
        imle.distance_lower_bounds(torch.zeros(2, 3), torch.zeros(4, 3), "fp16")


def test_lower_bound_is_monotone_and_covers_an_adversarial_gemm_error():
    """Ranking by approximate distance must equal ranking by the bound; and an approximate distance off by the
    full worst-case accumulation error (every product rounded the same way) still gets a valid bound."""
    d = 4096
    q_norm, k_norm = torch.tensor([d**0.5], dtype=torch.float64), torch.tensor(d**0.5, dtype=torch.float64)
    resid = torch.tensor([1e-3], dtype=torch.float64)
    approx = torch.linspace(0, 4 * d, 2001, dtype=torch.float32)[None]
    lower = imle._lower_bound(approx, q_norm, resid, k_norm, resid[0], d)
    assert (lower.diff(dim=1) >= 0).all() and lower[0, 0] == 0 and (lower <= approx.double()).all()
    exact = 2.0 * d  # the true distance of a pair with ||q|| = ||k|| = sqrt(d), orthogonal
    worst = exact + 2 * (d - 1) * imle.FP32_UNIT * d  # the dot product overestimated by (d - 1) u ||q|| ||k||
    assert imle._lower_bound(torch.tensor([[worst]]), q_norm, resid * 0, k_norm, resid[0] * 0, d) <= exact
    # The bound allows 2u per addition, twice this error; on tensor cores TENSOR_CORE_SAFETY times more. Three times
    # as far off is beyond the first and within the second.
    thrice = torch.tensor([[exact + 3 * 2 * (d - 1) * imle.FP32_UNIT * d]])
    assert imle._lower_bound(thrice, q_norm, resid * 0, k_norm, resid[0] * 0, d) > exact
    assert imle._lower_bound(thrice, q_norm, resid * 0, k_norm, resid[0] * 0, d, tensor_cores=True) <= exact


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_rerank_skips_candidates_that_cannot_win(precision, monkeypatch):
    """Only the first candidate and those whose lower bound is below its distance are computed in float64; the
    answer is the brute force's all the same."""
    g = torch.Generator().manual_seed(6)
    queries, keys = torch.randn(300, 256, generator=g), torch.randn(2000, 256, generator=g)
    computed = []
    pair_sq_dist = imle._pair_sq_dist
    monkeypatch.setattr(imle, "_pair_sq_dist",
                        lambda q, k, rows, at: computed.append(len(at)) or pair_sq_dist(q, k, rows, at))
    stats: dict[str, int] = {}
    assert_same_as_brute_force(queries, keys, precision=precision, candidates=16, stats=stats)
    assert imle.settled_queries(stats) == {precision: 300} and computed[0] == 300
    assert stats[imle.RERANKED_ROWS] == sum(computed)
    assert 0 < sum(computed) - 300 < 300 * 15 / 2  # some candidates re-ranked, most skipped


@pytest.mark.parametrize("cache_bytes", [0, imle.KEY_CACHE_BYTES])
def test_rounded_keys_are_reused_when_they_fit_and_rounded_again_when_not(cache_bytes, monkeypatch):
    """Several query blocks and key blocks, and a second (wide) pass: with room in the cache each key block
    is rounded once per precision; without, once per use. The answer is the same either way."""
    g = torch.Generator().manual_seed(5)
    queries, keys = torch.randn(40, 2048, generator=g), torch.randn(30, 2048, generator=g)
    calls = []
    round_centred = imle._round_centred
    monkeypatch.setattr(imle, "KEY_CACHE_BYTES", cache_bytes)
    monkeypatch.setattr(imle, "_round_centred", lambda x, *a: calls.append(len(x)) or round_centred(x, *a))
    stats: dict[str, int] = {}
    assert_same_as_brute_force(queries, keys, chunk_size=10, stats=stats)
    key_blocks, query_blocks = 3, sum(math.ceil(n / 10) for n in (40, stats.get("fp32-wide", 0)) if n)
    key_roundings = len(calls) - query_blocks
    assert key_roundings == (key_blocks * query_blocks if cache_bytes == 0 else key_blocks)


def test_near_ties_resolved_as_float64_brute_force(device):
    queries, keys = near_tie_cloud(200)
    _, ref_index = brute_force(queries, keys)
    # The construction defeats a plain fp32 GEMM search: it gets (almost) every query wrong.
    assert (naive_fp32_argmin(queries, keys) != ref_index).float().mean() > 0.5
    stats: dict[str, int] = {}
    assert_same_as_brute_force(queries, keys, device, stats=stats)
    # centring on the keys' mean makes fp32 enough, and proves it (on CUDA tf32 first, then fp32 if needed)
    assert sum(imle.settled_queries(stats).values()) == len(queries)
    assert set(imle.settled_queries(stats)) <= ({"fp32"} if device.type == "cpu" else {"tf32", "fp32"})


def test_unprovable_near_ties_fall_back_to_brute_force(device):
    """Two far-apart clusters: centring cannot help, the certificate fails, brute force answers."""
    queries, keys = near_tie_cloud(100, seed=1)
    keys = torch.cat([keys, -keys])
    assert (naive_fp32_argmin(queries, keys) != brute_force(queries, keys)[1]).float().mean() > 0.5
    for precision in ("fp32", "bf16"):
        stats: dict[str, int] = {}
        assert_same_as_brute_force(queries, keys, device, precision=precision, chunk_size=7, stats=stats)
        assert stats.get("brute_force", 0) > 0 and sum(imle.settled_queries(stats).values()) == len(queries)


def test_crowded_high_dimensional_noise_is_settled_by_the_wide_pass(device):
    """Gaussian noise in d = 12,288 (64x64x3): every distance is about 2d, and with only 2 first-pass candidates
    the nearest keys often lie within the error bound of each other; 64 candidates prove what 2 could not,
    without the float64 brute force."""
    g = torch.Generator().manual_seed(3)
    queries, keys = torch.randn(128, 12288, generator=g), torch.randn(2048, 12288, generator=g)
    stats: dict[str, int] = {}
    found = imle.nearest_neighbors(queries.to(device), keys.to(device), candidates=2, stats=stats)
    dist, index = (t.cpu() for t in found)
    # float64 pairwise differences (no GEMM expansion) are the reference; here faster than the broadcast above
    reference = torch.cdist(queries.double(), keys.double(), compute_mode="donot_use_mm_for_euclid_dist")
    assert torch.equal(index, reference.argmin(1))
    torch.testing.assert_close(dist, (queries.double() - keys.double()[index]).pow(2).sum(1), rtol=1e-12, atol=0.0)
    assert "brute_force" not in stats and sum(imle.settled_queries(stats).values()) == len(queries)
    if device.type == "cpu":  # (on CUDA a tf32 pass comes first; which pass settles what depends on the GPU)
        assert 0 < stats["fp32"] < len(queries) and stats["fp32-wide"] == len(queries) - stats["fp32"]
    # With the default candidates the first pass proves every query here.
    stats = {}
    assert torch.equal(imle.nearest_neighbors(queries.to(device), keys.to(device), stats=stats)[1].cpu(), index)
    assert imle.settled_queries(stats) == {imle._passes(None, device)[0].name: len(queries)}


def test_duplicates_and_exact_ties_go_to_the_lowest_index(device):
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(500, 8, generator=g)
    target = keys[123].clone()
    copies = torch.tensor([400, 17, 250, 300, 60, 499, 33, 71, 90, 110, 470])  # more copies than candidates
    keys[copies] = target
    queries = torch.cat([target[None], target[None] + 1e-3 * torch.randn(5, 8, generator=g)])
    dist, index = imle.nearest_neighbors(queries.to(device), keys.to(device))
    assert index.tolist() == [17] * 6 and dist[0] == 0
    # Equidistant keys (exact in binary): the first one wins, in any block layout.
    sym_keys = torch.tensor([[3.0, 0.0], [0.0, 3.0], [-3.0, 0.0], [0.0, -3.0], [5.0, 5.0]], device=device)
    origin = torch.zeros(3, 2, device=device)
    for chunk in (None, 1, 2):
        assert imle.nearest_neighbors(origin, sym_keys, chunk)[1].tolist() == [0, 0, 0]
        assert imle.nearest_neighbors(origin[:1], sym_keys[[4, 3, 1]], chunk)[1].tolist() == [1]


def test_values_whose_fp32_squares_overflow_are_still_searched_exactly(device):
    """At 1e30 the fp32 norms overflow (and the keys' fp32 column mean, at 3e38), so every bound is NaN. With
    more keys than any pass keeps, nothing is proven and the float64 brute force answers; with 50 keys the wide
    pass keeps all of them, and a NaN bound must not skip any in the re-rank."""
    g = torch.Generator().manual_seed(7)
    for scale, n_keys in ((1e30, 200), (3e38, 200), (1e30, 50)):
        queries, keys = torch.randn(20, 16, generator=g).clamp(-1, 1), torch.randn(n_keys, 16, generator=g).clamp(-1, 1)
        stats: dict[str, int] = {}
        dist, index = imle.nearest_neighbors(queries.to(device) * scale, keys.to(device) * scale, stats=stats)
        assert torch.equal(index.cpu(), brute_force(queries * scale, keys * scale)[1]) and torch.isfinite(dist).all()
        assert stats.get("brute_force", 0) == (20 if n_keys > imle.WIDE_CANDIDATES else 0)


def test_nearest_neighbors_ignores_autocast_and_restores_matmul_settings(device):
    g = torch.Generator().manual_seed(3)
    queries, keys = torch.randn(30, 40, generator=g), torch.randn(70, 40, generator=g)
    before = torch.get_float32_matmul_precision()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        assert_same_as_brute_force(queries, keys, device)
    assert torch.get_float32_matmul_precision() == before
    dist, index = imle.nearest_neighbors(queries[:0].to(device), keys.to(device))
    assert dist.shape == index.shape == (0,)


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"),
                    reason="this PyTorch has only the legacy matmul-precision API")
def test_nearest_neighbors_is_exact_under_the_new_precision_api_and_restores_it(device):
    """PyTorch's per-backend precision settings (the ones its docs now recommend) make the legacy getter raise;
    the search must pin and restore them, and stay exact when the caller allowed reduced precision."""
    backends = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    saved = [torch.backends.fp32_precision] + [backend.fp32_precision for backend in backends]
    g = torch.Generator().manual_seed(5)
    queries, keys = torch.randn(40, 64, generator=g), torch.randn(90, 64, generator=g)
    seen = []
    approx_sq_dist = imle._approx_sq_dist

    def watched(*args):  # the settings each GEMM of the search ran under
        seen.append(tuple(backend.fp32_precision for backend in backends))
        return approx_sq_dist(*args)

    try:
        for backend, reduced in zip(backends, ("tf32", "bf16")):
            backend.fp32_precision = reduced
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(imle, "_approx_sq_dist", watched)
            assert_same_as_brute_force(queries, keys, device)
        first_pass = "tf32" if device.type == "cuda" else "ieee"
        assert seen and seen[0] == (first_pass, "ieee") and all(mkldnn == "ieee" for _, mkldnn in seen)
        assert [backend.fp32_precision for backend in backends] == ["tf32", "bf16"]
        # settings inherited from torch.backends.fp32_precision stay inherited: they follow it after a search
        for backend in backends:
            backend.fp32_precision = "none"
        torch.backends.fp32_precision = "tf32"
        assert_same_as_brute_force(queries, keys, device)
        torch.backends.fp32_precision = "ieee"
        assert [backend.fp32_precision for backend in backends] == ["ieee", "ieee"]
    finally:
        torch.backends.fp32_precision = saved[0]
        for backend, old in zip(backends, saved[1:]):
            backend.fp32_precision = old


@pytest.mark.parametrize("queries, keys, kw, error", [
    (torch.zeros(3), torch.zeros(4, 3), {}, ValueError),
    (torch.zeros(3, 2), torch.zeros(4, 3), {}, ValueError),
    (torch.zeros(3, 2, dtype=torch.int64), torch.zeros(4, 2, dtype=torch.int64), {}, ValueError),
    (torch.zeros(3, 2), torch.zeros(0, 2), {}, ValueError),
    (torch.tensor([[0.0, math.nan]]), torch.zeros(4, 2), {}, ValueError),
    (torch.zeros(3, 2), torch.zeros(4, 2), {"chunk_size": 0}, ValueError),
    (torch.zeros(3, 2), torch.zeros(4, 2), {"precision": "fp8"}, ValueError),
    (torch.zeros(3, 2), torch.zeros(4, 2), {"candidates": 0}, ValueError),
    (torch.zeros(3, 2), torch.zeros(4, 2), {"candidates": True}, ValueError),
    (torch.zeros(3, 2), torch.zeros(4, 2), {"candidates": 2.0}, ValueError),
    ([[0.0, 0.0]], torch.zeros(4, 2), {}, TypeError),
])
def test_nearest_neighbors_validates_inputs(queries, keys, kw, error):
    with pytest.raises(error):
        imle.nearest_neighbors(queries, keys, **kw)


def test_match_by_pairs_finds_the_nearest_key_of_a_single_query():
    keys = torch.tensor([[0.0, 0.0], [2.0, 1.0], [1.0, 1.0]])
    distance, index = imle.match(torch.tensor([[1.2, 0.9]]), keys, imle.l1_distance)
    assert index.tolist() == [2] and distance.tolist() == pytest.approx([0.3])


def test_match_by_pairs_agrees_with_the_gemm_search():
    g = torch.Generator().manual_seed(4)
    reals, fakes = torch.randn(20, 1, 4, 4, generator=g), torch.randn(90, 1, 4, 4, generator=g)
    dist, index = imle.match(reals, fakes)
    pair_dist, pair_index = imle.match(reals, fakes, imle.squared_l2, chunk_size=16)
    assert torch.equal(index, pair_index)
    torch.testing.assert_close(pair_dist, dist, rtol=1e-5, atol=1e-6)


def test_pairwise_cost_count_matches_the_source():
    cost = imle.pairwise_cost_count(64, 64, feature_flops=15.5e9, feature_dim=4096)
    assert cost["pairs"] == 64**2 == 4096  # the source's "64^2 = 4096 perceptual losses"
    assert cost["network_runs_cached"] == 128 and cost["speedup"] > 50


# ----------------------------------------------------------------------------- smoothed likelihood


def test_soft_assignment_rows_sum_to_one_and_harden_to_the_argmin():
    g = torch.Generator().manual_seed(5)
    reals, fakes = torch.randn(10, 3, generator=g), torch.randn(25, 3, generator=g)
    nearest = imle.nearest_neighbors(reals, fakes)[1]
    for sigma in (10.0, 1.0, 0.1):
        rows = imle.soft_assignment(reals, fakes, sigma).sum(1)
        torch.testing.assert_close(rows, torch.ones(10, dtype=torch.float64))
    hard = imle.soft_assignment(reals, fakes, 1e-3)
    torch.testing.assert_close(hard, torch.nn.functional.one_hot(nearest, 25).double())


def test_sigma_squared_times_nll_tends_to_half_the_imle_loss():
    g = torch.Generator().manual_seed(6)
    reals, fakes = torch.randn(12, 4, generator=g), torch.randn(30, 4, generator=g)
    half_min = imle.nearest_neighbors(reals, fakes)[0].mean() / 2
    for sigma in (1.0, 0.3, 0.1, 0.01):
        scaled = sigma**2 * imle.smoothed_nll(reals, fakes, sigma)
        # max <= logsumexp <= max + log N, row by row
        assert half_min - sigma**2 * math.log(30) - 1e-12 <= scaled <= half_min + 1e-12
    assert abs(0.01**2 * imle.smoothed_nll(reals, fakes, 0.01) - half_min) < 1e-3


def test_smoothed_nll_plus_constants_is_the_mixture_nll_and_goes_to_plus_infinity():
    g = torch.Generator().manual_seed(7)
    reals = torch.randn(9, 3, generator=g, dtype=torch.float64)
    fakes = torch.randn(20, 3, generator=g, dtype=torch.float64)
    d, n = reals.shape[1], len(fakes)
    full = []
    for sigma in (1.0, 0.1, 1e-2, 1e-3):
        # Independent: -mean_i log mean_j N(x_i; fake_j, sigma^2 I), from torch.distributions.
        log_density = torch.distributions.Normal(fakes[None], sigma).log_prob(reals[:, None]).sum(-1)
        reference = -(torch.logsumexp(log_density, dim=1) - math.log(n)).mean()
        restored = imle.smoothed_nll(reals, fakes, sigma) + d / 2 * math.log(2 * math.pi * sigma**2) + math.log(n)
        torch.testing.assert_close(restored, reference, rtol=1e-10, atol=1e-10)
        full.append(restored.item())
    # The normaliser goes to -inf like log sigma, yet the full NLL goes to +inf like mean_i m_i / sigma^2.
    half_min = torch.cdist(reals, fakes).pow(2).min(1).values.mean().item() / 2
    assert full[0] < full[1] < full[2] < full[3]
    assert abs(full[3] * 1e-3**2 - half_min) < 1e-4 * half_min + 1e-4


@pytest.mark.parametrize("fn", [imle.smoothed_nll, imle.soft_assignment])
@pytest.mark.parametrize("sigma", [0.0, -0.5, math.nan, math.inf])
def test_smoothed_likelihood_rejects_a_sigma_that_is_not_positive_and_finite(fn, sigma):
    reals, fakes = torch.randn(4, 2), torch.randn(6, 2)
    with pytest.raises(ValueError, match="sigma must be a finite positive number"):
        fn(reals, fakes, sigma)


# ----------------------------------------------------------------------------- Lap1


@pytest.mark.parametrize("side", [4, 5, 7, 8, 12, 15, 16, 28, 31, 32, 63, 64, 65, 128, 256])
def test_default_pyramid_levels_are_the_most_up_to_5_whose_coarsest_side_is_at_least_4(side):
    # level L (1-based) is the image downsampled L - 1 times, each time to ceil(side / 2)
    coarsest = [math.ceil(side / 2 ** (level - 1)) for level in range(1, 6)]
    assert imle.default_pyramid_levels(side) == max([1] + [level for level in range(1, 6) if coarsest[level - 1] >= 4])


@pytest.mark.parametrize("exponent", [None, -2.0, 0.0])
def test_lap1_zero_symmetric_and_closed_form_for_a_constant_shift(exponent):
    lap = imle.LaplacianPyramidL1() if exponent is None else imle.LaplacianPyramidL1(level_exponent=exponent)
    weight_exponent = 2.0 if exponent is None else exponent  # the default counts each level like its mean
    g = torch.Generator().manual_seed(7)
    for shape, levels, coarsest in [((2, 1, 28, 28), 4, 4 * 4), ((2, 3, 16, 16), 3, 4 * 4), ((1, 1, 8, 8), 2, 4 * 4)]:
        x, y = torch.rand(shape, generator=g), torch.rand(shape, generator=g)
        assert imle.default_pyramid_levels(shape[-1]) == levels
        torch.testing.assert_close(lap(x, x), torch.zeros(shape[0]))
        torch.testing.assert_close(lap(x, y), lap(y, x))
        # A constant shift c leaves every band-pass level unchanged (blur and bilinear
        # upsampling keep constants); only the low-pass residual moves, by c at each of its
        # C * h * w entries, weighted 2^(e (J - 1)).
        c = -0.3
        expected = 2.0 ** (weight_exponent * (levels - 1)) * abs(c) * shape[1] * coarsest
        torch.testing.assert_close(lap(x, x + c), torch.full((shape[0],), expected), rtol=1e-4, atol=1e-5)


def test_lap1_default_weights_each_level_by_its_area():
    """With e = +2 a level's weight times its share of the image's entries is about 1 (exactly 1 where the sides
    halve evenly): a band of the same mean absolute value costs the same at every level."""
    lap = imle.LaplacianPyramidL1()
    x = torch.zeros(1, 1, 32, 32)
    bands = lap.pyramid(x)
    for j, band in enumerate(bands):
        assert 2.0 ** (lap.level_exponent * j) * band[0, 0].numel() == 32 * 32


def test_lap1_is_differentiable_and_validates_shapes():
    x = torch.rand(2, 1, 8, 8, requires_grad=True)
    imle.LaplacianPyramidL1()(x, torch.zeros(2, 1, 8, 8)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError):
        imle.LaplacianPyramidL1()(torch.zeros(2, 64), torch.zeros(2, 64))
    y = torch.rand(2, 1, 8, 8)
    one_level = imle.LaplacianPyramidL1(levels=1)(x, y)  # the low-pass residual alone is the image: pixel L1
    torch.testing.assert_close(one_level, (x - y).abs().flatten(1).sum(1))
    with pytest.raises(ValueError, match="levels must be >= 1"):
        imle.LaplacianPyramidL1(levels=0)
    assert imle.LaplacianPyramidL1().state_dict() == {}  # its fixed kernel stays out of checkpoints


def test_pixel_feature_l1_sums_or_averages_the_pixel_term_and_weights_the_feature_term():
    x, y = torch.rand(3, 1, 4, 4), torch.rand(3, 1, 4, 4)
    def features(images):  # any map to [B, D]
        return images.flatten(1)[:, :5] * 3.0

    pixel_sum, feature_sum = (x - y).abs().flatten(1).sum(1), 3.0 * (x - y).abs().flatten(1)[:, :5].sum(1)
    torch.testing.assert_close(imle.PixelFeatureL1(features, 0.5)(x, y), pixel_sum + 0.5 * feature_sum)
    torch.testing.assert_close(imle.PixelFeatureL1(features, 2.0, pixel_mean=True)(x, y),
                               pixel_sum / 16 + 2.0 * feature_sum)


# ----------------------------------------------------------------------------- KL variant


def test_kl_variant_is_the_sigma_to_zero_limit_of_the_kde_kl():
    """2 sigma^2 [nll_p(a) - nll_q(a)] = 2 sigma^2 KL estimate -> attract - repel: sign +1 is right."""
    g = torch.Generator().manual_seed(8)
    reals, fakes_a, fakes_b = (torch.randn(16, 2, generator=g) for _ in range(3))
    loss = imle.kl_variant_loss(fakes_a, fakes_b, reals, margin=None, sign=1)
    sigma = 0.01
    kl = 2 * sigma**2 * (imle.smoothed_nll(fakes_a, reals, sigma) - imle.smoothed_nll(fakes_a, fakes_b, sigma))
    assert abs(kl.item() - loss.item()) < 1e-3


def test_kl_variant_sign_decides_attraction_or_collapse():
    g = torch.Generator().manual_seed(9)
    reals = torch.randn(32, 2, generator=g)
    fakes_b = reals + 0.05 * torch.randn(32, 2, generator=g)
    start = reals + 0.05 * torch.randn(32, 2, generator=g)
    moves = {}
    for sign in (1, -1):
        fakes = start.clone().requires_grad_(True)
        imle.kl_variant_loss(fakes, fakes_b, reals, margin=1.0, sign=sign).backward()
        after = (fakes - 0.01 * fakes.grad).detach()
        attract0, repel0 = imle.kl_variant_terms(start, fakes_b, reals)
        attract1, repel1 = imle.kl_variant_terms(after, fakes_b, reals)
        moves[sign] = (attract1.mean() - attract0.mean(), repel1.mean() - repel0.mean())
    assert moves[1][0] < 0 < moves[1][1]  # derived sign: towards data, away from other fakes
    assert moves[-1][0] > 0 > moves[-1][1]  # source's printed sign: away from data, onto each other
    with pytest.raises(ValueError):
        imle.kl_variant_loss(start, fakes_b, reals, margin=1.0, sign=0)


# ----------------------------------------------------------------------------- models


def ring8_scaled():
    """WGAN-GP's 8 Gaussians: radius 2, std 0.02, scaled by 1/sqrt(2); (data, modes, std)."""
    scale = 1 / math.sqrt(2)
    ring = toy("ring8")
    return toy_dataset("ring8", 2048, seed=0) * scale, ring.modes.float() * scale, ring.std * scale


def test_imle_covers_the_modes_of_ring8():
    data, modes, std = ring8_scaled()
    torch.manual_seed(0)
    model = imle.IMLE(MLP(2, 2, hidden=32, depth=3, act="tanh"), 2, lr=1e-2)  # the reference toy's net, wider; its lr
    history = fit(model, BatchSampler(data, 128, "cpu", seed=0), 500, progress=False, log_every=100)
    covered, _ = mode_coverage(model.sample(5000), modes, std)
    assert covered >= 6
    assert history["match_dist"][-1] < 0.2 * history["match_dist"][0]


def test_imle_refresh_matches_exactly_and_resumes(tmp_path):
    data, _, _ = ring8_scaled()
    data = data[:40]
    torch.manual_seed(1)
    model = imle.IMLE(MLP(3, 2, hidden=16, depth=2), 3, fakes_per_real=3, refresh_every=5, data=data, refresh_batch=7)
    codes = torch.randn(120, 3)
    model.refresh(codes)
    with torch.no_grad():  # the reference search sees the same fakes, generated in the same chunks
        fakes = torch.cat([model.generator(codes[i:i + 7]) for i in range(0, 120, 7)])
    ref_dist, ref_index = brute_force(data, fakes)
    assert torch.equal(model.matched_z, codes[ref_index])
    torch.testing.assert_close(model.matched_dist, ref_dist, rtol=1e-12, atol=0.0)
    # reals next to the first and last fakes of the chunks: every chunk's every fake is a candidate
    edges = torch.tensor([0, 6, 7, 13, 119])
    at_edges = imle.IMLE(model.generator, 3, fakes_per_real=3, refresh_every=5, data=fakes[edges] + 1e-4,
                         refresh_batch=7)
    at_edges.refresh(codes)
    assert torch.equal(at_edges.matched_z, codes[edges])
    # in a feature space the reals' features are filled block by block (7 rows at a time): the same exact match
    projection = torch.tensor([[1.0, 0.0, 2.0, -0.5, 4.0], [0.0, 1.0, 0.25, 2.0, -1.0]])  # exact products, any blocking
    featured = imle.IMLE(model.generator, 3, fakes_per_real=3, refresh_every=5, data=data, refresh_batch=7,
                         match_features=lambda x: x @ projection)
    featured.refresh(codes)
    ref_dist, ref_index = brute_force(data @ projection, fakes @ projection)
    assert torch.equal(featured.matched_z, codes[ref_index])
    torch.testing.assert_close(featured.matched_dist, ref_dist, rtol=1e-12, atol=0.0)

    fit(model, BatchSampler(data, 8, "cpu", seed=0), 12, run_dir=tmp_path, progress=False, log_every=4)
    assert int(model.steps_done) == 12
    resumed = imle.IMLE(MLP(3, 2, hidden=16, depth=2), 3, fakes_per_real=3, refresh_every=5, data=data)
    fit(resumed, BatchSampler(data, 8, "cpu", seed=0), 12, run_dir=tmp_path, progress=False)
    assert torch.equal(resumed.matched_z, model.matched_z) and int(resumed.steps_done) == 12


@pytest.mark.parametrize("refresh_every", [1, 3])
def test_imle_trains_on_exactly_the_fakes_it_matched_with_a_per_sample_norm(refresh_every):
    # Without jitter, the step's loss (before its update) is the matched distance itself, unless BatchNorm
    # regenerates the matched codes under other batch statistics than the pool they were matched in.
    images = torch.rand(16, 1, 8, 8) * 2 - 1
    for norm in ("layer", "batch"):
        torch.manual_seed(5)
        generator = ConvGenerator(4, resolution=8, channels=1, width=8, norm=norm)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = imle.IMLE(generator, 4, fakes_per_real=4, z_jitter=0.0, refresh_every=refresh_every,
                              data=images if refresh_every > 1 else None)
        assert any("BatchNorm" in str(w.message) for w in caught) == (norm == "batch")
        losses = model.step(images[:8], torch.arange(8))
        same = torch.allclose(losses["loss"].double(), losses["match_dist"].double(), rtol=1e-5)
        assert same == (norm == "layer"), (norm, losses)


def test_imle_with_features_and_with_lap1_runs():
    torch.manual_seed(2)
    images = torch.rand(16, 1, 8, 8) * 2 - 1
    projection = torch.randn(64, 10)
    for kw in ({"match_features": lambda x: x.flatten(1) @ projection}, {"distance": "lap1"}):
        model = imle.IMLE(ConvGenerator(4, resolution=8, channels=1, width=8, norm="layer"), 4, fakes_per_real=2, **kw)
        losses = model.step(images, torch.arange(16))
        assert set(losses) == {"loss", "match_dist"} and all(torch.isfinite(v) for v in losses.values())
    assert model.sample(3).shape == (3, 1, 8, 8)


def test_imlekl_step_reports_both_terms():
    torch.manual_seed(3)
    model = imle.IMLEKL(MLP(2, 2, hidden=16, depth=2), 2, margin=0.1)
    losses = model.step(torch.randn(32, 2), torch.arange(32))
    assert set(losses) == {"loss", "attract", "repel"}


@pytest.fixture(scope="module")
def trained_glo():
    """GLO on the first 64 sklearn digits (8x8), 200 steps: (model, images, history)."""
    images = to_float(load_images("digits").images[:64])
    torch.manual_seed(4)
    glo = imle.GLO(ConvGenerator(16, resolution=8, channels=1, width=32), 64, 16, loss="l2")
    history = fit(glo, BatchSampler(images, 32, "cpu", seed=0), 200, progress=False, log_every=40)
    return glo, images, history


def test_glo_reduces_reconstruction_loss_and_keeps_codes_on_the_sphere(trained_glo):
    glo, images, history = trained_glo
    assert history["loss"][-1] < 0.1 * history["loss"][0]
    torch.testing.assert_close(glo.codes.weight.norm(dim=1), torch.ones(64))
    recon = glo.decode(glo.latent_codes())
    assert imle.squared_l2(recon, images).mean() < history["loss"][0]
    assert glo.sample(5).shape == (5, 1, 8, 8)


def test_lazy_adam_is_sparse_adam_bit_for_bit():
    """GLO's codes optimiser against torch's SparseAdam on an embedding: random batches of distinct rows, a
    non-quadratic loss and GLO's projection back onto the sphere after each step, for 300 steps."""
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(0)
    n, d, start, target = 50, 8, torch.randn(50, 8), torch.randn(50, 8)
    embedding = nn.Embedding(n, d, sparse=True)
    embedding.weight.data.copy_(start)
    reference = torch.optim.SparseAdam(embedding.parameters(), lr=1e-2, betas=(0.5, 0.999))
    codes = nn.Parameter(start.clone())
    lazy = imle.LazyAdam(codes, lr=1e-2, betas=(0.5, 0.999))
    for _ in range(300):
        rows = torch.randperm(n)[:16]
        reference.zero_grad()
        (embedding(rows) - target[rows]).pow(3).abs().sum().backward()
        reference.step()
        picked = codes.detach()[rows].requires_grad_(True)
        (picked - target[rows]).pow(3).abs().sum().backward()
        lazy.step(rows, picked.grad)
        with torch.no_grad():
            embedding.weight[rows] = F.normalize(embedding.weight[rows], dim=1)
            codes[rows] = F.normalize(codes[rows], dim=1)
    assert torch.equal(codes, embedding.weight)
    for moment in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(lazy.state[codes][moment], reference.state[embedding.weight][moment].to_dense())


def test_glo_accepts_lap1_pca_init_and_validates():
    images = torch.rand(32, 1, 8, 8) * 2 - 1
    codes = imle.pca_codes(images, 6)
    torch.testing.assert_close(codes.norm(dim=1), torch.ones(32))
    glo = imle.GLO(ConvGenerator(6, resolution=8, channels=1, width=8), 32, 6, loss="lap1", init_codes=codes)
    assert torch.isfinite(glo.step(images[:8], torch.arange(8))["loss"])
    with pytest.raises(ValueError):
        imle.GLO(ConvGenerator(6, resolution=8, channels=1, width=8), 32, 6, loss="huber")


def test_glo_keeps_its_codes_where_its_generator_lives(device):
    """A GLO built around a generator already on ``device`` trains there without a ``.to``; "meta" stands in for a
    GPU on machines without one (codes left on the CPU would be indexed by a batch index on the GPU)."""
    for where in (torch.device("meta"), device):
        glo = imle.GLO(ConvGenerator(6, resolution=8, channels=1, width=8).to(where), 32, 6)
        assert glo.codes.weight.device == where and glo.device == where
    images = torch.rand(8, 1, 8, 8, device=device) * 2 - 1
    assert torch.isfinite(glo.step(images, torch.arange(8, device=device))["loss"])


def test_glann_on_a_trained_glo_trains_with_fit_and_samples_images(trained_glo):
    glo, images, _ = trained_glo
    codes_before = glo.latent_codes()
    glann = imle.GLANN(glo, noise_dim=8, refresh_every=4)
    history = fit(glann, BatchSampler(images, 32, "cpu", seed=0), 20, progress=False, log_every=5)
    assert history["match_dist"][-1] < history["match_dist"][0]
    assert glann.sample(10).shape == (10, 1, 8, 8)
    assert torch.equal(glo.latent_codes(), codes_before)  # stage 2 trains T only


def test_glann_runs_both_stages_in_one_fit_and_resumes_exactly(tmp_path):
    images = to_float(load_images("digits").images[:32])

    def run(steps: int, run_dir=None) -> tuple[imle.GLANN, dict]:
        torch.manual_seed(5)
        glo = imle.GLO(ConvGenerator(8, resolution=8, channels=1, width=8), 32, 8)
        model = imle.GLANN(glo, glo_steps=6, noise_dim=4, refresh_every=3)
        history = fit(model, BatchSampler(images, 8, "cpu", seed=0), steps, run_dir=run_dir, checkpoint_every=4,
                      progress=False, log_every=3)
        return model, history

    straight, history = run(12)
    # each stage's losses at its own log steps (3, 6 then 9, 12), NaN at the other stage's
    assert history["step"] == [3, 6, 9, 12]
    assert [math.isnan(v) for v in history["glo_loss"]] == [False, False, True, True]
    assert [math.isnan(v) for v in history["match_dist"]] == [True, True, False, False]
    run(8, tmp_path)  # stops in stage 2, after the switch
    resumed, _ = run(12, tmp_path)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_cli_builders_make_trainable_models():
    from genlib.cli import TrainSpec

    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    points = torch.randn(16, 2)
    for data in (images, points):
        for build in (imle.build_imle, imle.build_glo, imle.build_glann):
            spec = TrainSpec(data, tuple(data.shape[1:]), torch.device("cpu"), z_dim=4, width=8,
                             options={"refresh_every": "2", "glo_steps": "1"})
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # IMLE's generators (the CLI's, GLANN's mapper) hold no BatchNorm
                model = build(spec)
            x = to_float(data[:8]) if data.dtype == torch.uint8 else data[:8]
            for _ in range(2):
                assert all(torch.isfinite(v) for v in model.step(x, torch.arange(8)).values())
            assert model.sample(3).shape == (3, *data.shape[1:])
    mapper_layers = {type(m).__name__ for m in imle.build_glann(spec).mapper.generator.modules()}
    assert "GroupNorm" in mapper_layers and "BatchNorm1d" not in mapper_layers


@pytest.fixture
def random_vgg16(tmp_path, monkeypatch):
    """A VGG16 with random weights in the file ``$GENLIB_VGG16_WEIGHTS`` names (the ImageNet one is not offline)."""
    from genlib import features

    torch.manual_seed(0)
    path = tmp_path / "vgg16.pth"
    torch.save(features.VGG16Features().state_dict(), path)
    monkeypatch.setenv(features.VGG16_ENV, str(path))
    return features.load_vgg16(path, "cpu")


def test_vgg16_pair_loss_is_pixel_l1_plus_perceptual_l1_and_differentiable(random_vgg16):
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    y = torch.rand(3, 1, 16, 16) * 2 - 1
    x.requires_grad_(True)
    loss = imle.pair_loss("vgg16")(x, y)
    # the pixel term averaged, as each feature layer is (else the 256 pixels would outweigh the features)
    by_hand = (x - y).abs().flatten(1).mean(1) + (random_vgg16.perceptual(x) - random_vgg16.perceptual(y)).abs().sum(1)
    torch.testing.assert_close(loss, by_hand, rtol=1e-5, atol=1e-6)
    loss.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_vgg16_options_of_the_cli_and_a_clear_error_without_weights(random_vgg16, monkeypatch):
    from genlib.cli import TrainSpec
    from genlib import features

    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    spec = lambda **options: TrainSpec(images, (1, 8, 8), torch.device("cpu"), z_dim=4, width=8, batch_size=4,
                                       options=options)
    glo = imle.build_glo(spec(loss="vgg16"))
    assert isinstance(glo.loss_fn, imle.PixelFeatureL1)
    model = imle.build_imle(spec(distance="vgg16", fakes_per_real="2"))
    assert model.pair_loss is None and model.match_features is features.vgg16_perceptual
    direct = imle.IMLE(ConvGenerator(4, resolution=8, channels=1, width=8, norm="layer"), 4, distance="vgg16")
    assert direct.pair_loss is None and direct.match_features is features.vgg16_perceptual  # not matched by pairs
    x = to_float(images[:4])
    torch.testing.assert_close(model._embed(x), random_vgg16.perceptual(x))  # matched in VGG16 feature space
    losses = fit(model, BatchSampler(images, 4, "cpu", seed=0), 2, progress=False)
    assert all(math.isfinite(v) for v in losses["loss"])
    monkeypatch.delenv(features.VGG16_ENV)
    for build, options in ((imle.build_glo, {"loss": "vgg16"}), (imle.build_imle, {"distance": "vgg16"})):
        with pytest.raises(RuntimeError, match="GENLIB_VGG16_WEIGHTS"):
            build(spec(**options))


# ----------------------------------------------------------------------------- against independent computations


def test_soft_assignment_equals_a_softmax_computed_by_hand():
    """At finite sigmas, every responsibility against exp(-d_ij / 2 sigma^2) / sum_k exp(-d_ik / 2 sigma^2),
    with the squared distances and the softmax written out in plain Python floats."""
    g = torch.Generator().manual_seed(11)
    reals, fakes = torch.randn(6, 3, generator=g), torch.randn(9, 3, generator=g)
    largest = []
    for sigma in (2.0, 0.7, 0.3):
        w = imle.soft_assignment(reals, fakes, sigma)
        assert w.shape == (6, 9)
        for i, x in enumerate(reals.tolist()):
            logits = [-sum((a - b) ** 2 for a, b in zip(x, y)) / (2 * sigma**2) for y in fakes.tolist()]
            top = max(logits)
            weights = [math.exp(v - top) for v in logits]
            total = sum(weights)
            for j in range(9):
                assert abs(w[i, j].item() - weights[j] / total) < 1e-12
        largest.append(w.max(1).values)
    # some reals split their weight (neither uniform nor one-hot), so the check above is not trivial
    largest = torch.cat(largest)
    assert ((largest > 0.2) & (largest < 0.99)).sum() >= 3


def test_a_sphere_glann_trains_and_samples_codes_of_norm_one(trained_glo):
    from genlib.cli import TrainSpec

    glo, images, _ = trained_glo
    torch.manual_seed(3)
    glann = imle.GLANN(glo, noise_dim=8, refresh_every=4, sphere=True)
    history = fit(glann, BatchSampler(images, 32, "cpu", seed=0), 8, progress=False, log_every=4)
    assert all(math.isfinite(value) for value in history["match_dist"])
    torch.testing.assert_close(glann.sample_codes(50).norm(dim=1), torch.ones(50), rtol=0, atol=1e-6)
    with torch.no_grad():
        raw = glann.mapper.generator[0](torch.randn(50, 8))  # the MLP before the projection
    assert not torch.allclose(raw.norm(dim=1), torch.ones(50), atol=1e-3)  # the layer does the work
    spec = TrainSpec(images, (1, 8, 8), torch.device("cpu"), width=8, z_dim=glo.z_dim, options={"sphere": "yes"})
    assert isinstance(imle.build_glann(spec).mapper.generator[-1], imle.UnitSphere)
    assert not isinstance(imle.GLANN(glo, noise_dim=8).mapper.generator[-1], imle.UnitSphere)


def test_glann_sample_is_g_of_t_of_the_same_noise(trained_glo):
    glo, _, _ = trained_glo
    torch.manual_seed(12)
    glann = imle.GLANN(glo, noise_dim=8, refresh_every=4).eval()
    torch.manual_seed(13)
    samples = glann.sample(10)
    torch.manual_seed(13)
    noise = torch.randn(10, 8)  # GLANN.sample draws N(0, I) noise [n, noise_dim] from the global generator
    with torch.no_grad():
        by_hand = glo.generator(glann.mapper.generator(noise))
    assert samples.shape == (10, 1, 8, 8)
    torch.testing.assert_close(samples, by_hand, rtol=0, atol=0)
    torch.manual_seed(13)
    with torch.no_grad():
        torch.testing.assert_close(glann.sample_codes(10), glann.mapper.generator(noise), rtol=0, atol=0)


def test_pca_codes_equal_an_svd_of_the_centred_data_up_to_sign():
    g = torch.Generator().manual_seed(14)
    # 40 images of 6x6 with a decaying spectrum (not a flat one), so the top axes are well defined
    scales = torch.tensor([2.0**-k for k in range(36)])
    images = (torch.randn(40, 36, generator=g) * scales) @ torch.linalg.qr(torch.randn(36, 36, generator=g))[0]
    images = (images + 0.5).view(40, 1, 6, 6)
    z_dim = 5
    codes = imle.pca_codes(images, z_dim)
    x = images.flatten(1).double().numpy()
    centred = x - x.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ vt[:z_dim].T
    expected = projected / np.linalg.norm(projected, axis=1, keepdims=True)
    got = codes.double().numpy()
    assert codes.shape == (40, z_dim) and codes.dtype == torch.float32
    for k in range(z_dim):  # each principal axis is defined up to its sign
        sign = np.sign(got[:, k] @ expected[:, k])
        np.testing.assert_allclose(sign * got[:, k], expected[:, k], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)  # on the unit sphere
    torch.testing.assert_close(imle.pca_codes(images, z_dim, block=7), codes)  # the covariance over blocks of rows
    assert imle.pca_codes(images, 36).shape == (40, 36)  # as many axes as the data has dimensions
    with pytest.raises(ValueError):
        imle.pca_codes(images, 37)
    with pytest.raises(ValueError):
        imle.pca_codes(images[:20], 21)  # or rows


def test_glo_sample_is_a_gaussian_fitted_to_the_codes():
    """GLO.sample with an identity generator returns the codes it draws: their mean and covariance must be the
    learned codes' (computed independently with numpy), including the correlations."""
    from torch import nn

    g = torch.Generator().manual_seed(15)
    mixing = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.3, 0.0], [-0.4, 0.2, 0.5]])
    start = torch.randn(60, 3, generator=g) @ mixing.T + torch.tensor([0.9, 0.5, -0.2])
    identity = nn.Linear(3, 3)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(3))
        identity.bias.zero_()
    glo = imle.GLO(identity, 60, 3, init_codes=start)
    codes = glo.latent_codes().double().numpy()
    torch.manual_seed(16)
    z = glo.sample(200_000).double().numpy()
    want_mean, want_cov = codes.mean(0), np.cov(codes, rowvar=False)
    assert abs(want_cov[0, 1]) > 0.05  # correlated codes: a wrong Cholesky factor (L instead of L^T) would show
    # about 5 standard errors at n = 200,000 (a mean's is at most 1 / sqrt(n) = 2.2e-3, a covariance's about 3e-3)
    np.testing.assert_allclose(z.mean(0), want_mean, atol=0.015)
    np.testing.assert_allclose(np.cov(z, rowvar=False), want_cov, atol=0.015)
    torch.manual_seed(17)
    codes_drawn = glo.sample_codes(5)
    torch.manual_seed(17)
    torch.testing.assert_close(glo.sample(5), identity(codes_drawn), rtol=0, atol=0)  # sample decodes these codes


def test_glo_samples_codes_even_when_they_span_fewer_dimensions_than_z_dim():
    # two codes in 3-d: their covariance has rank 1, and the sampler's small diagonal jitter keeps it factorable
    start = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    glo = imle.GLO(torch.nn.Linear(3, 3), 2, 3, init_codes=start)
    torch.manual_seed(18)
    drawn = glo.sample_codes(1000).double()
    line = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64) / math.sqrt(2)  # the direction the codes differ in
    off_line = drawn - drawn.mean(0) - ((drawn - drawn.mean(0)) @ line)[:, None] * line
    assert off_line.std(0).max() < 0.01 < (drawn @ line).std()  # the jitter's 1e-3 across, the codes' spread along


def test_imle_refreshing_every_few_steps_needs_the_dataset_as_floats():
    for data in (None, torch.zeros(10, 2, dtype=torch.uint8)):
        with pytest.raises(ValueError, match="needs the whole dataset as a float tensor"):
            imle.IMLE(MLP(2, 2, hidden=4, depth=1), 2, refresh_every=2, data=data)
    assert imle.IMLE(MLP(2, 2, hidden=4, depth=1), 2, refresh_every=2, data=torch.zeros(10, 2)).refresh_every == 2


@pytest.mark.parametrize("option", ["fakes_per_real", "refresh_every", "refresh_batch"])
def test_imle_rejects_each_count_below_one_and_accepts_a_one_dimensional_code(option):
    with pytest.raises(ValueError, match=option):
        imle.IMLE(MLP(2, 2, hidden=4, depth=1), 2, **{option: 0})
    one = imle.IMLE(MLP(2, 2, hidden=4, depth=1), 2, **{option: 1})  # one is enough
    assert getattr(one, option) == 1
    assert imle.IMLE(MLP(1, 2, hidden=4, depth=1), 1).sample(3).shape == (3, 2)
    with pytest.raises(ValueError, match="z_dim"):
        imle.IMLE(MLP(1, 2, hidden=4, depth=1), 0)


def _bilinear_half_pixel(image, height, width):
    """Independent bilinear resize of a 2-D numpy array with half-pixel centres (align_corners=False)."""

    def weights(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        low = np.floor(src).astype(int)
        high = np.minimum(low + 1, n_in - 1)
        frac = src - low
        matrix = np.zeros((n_out, n_in))
        matrix[np.arange(n_out), low] += 1 - frac
        matrix[np.arange(n_out), high] += frac
        return matrix

    return weights(image.shape[0], height) @ image @ weights(image.shape[1], width).T


def test_laplacian_pyramid_collapses_back_and_matches_scipy():
    import torch.nn.functional as F

    lap = imle.LaplacianPyramidL1(levels=3)
    g = torch.Generator().manual_seed(17)
    x = torch.rand(2, 3, 13, 10, generator=g, dtype=torch.float64)  # odd and unequal sides
    bands = lap.pyramid(x)
    assert [tuple(b.shape[-2:]) for b in bands] == [(13, 10), (7, 5), (4, 3)]
    # collapse: upsample the coarser level bilinearly to the finer size and add the band
    current = bands[-1]
    for band in reversed(bands[:-1]):
        current = F.interpolate(current, size=band.shape[-2:], mode="bilinear", align_corners=False) + band
    torch.testing.assert_close(current, x, rtol=0, atol=1e-12)
    # a constant image has no band-pass content; the residual is the constant
    constant = lap.pyramid(torch.full((1, 2, 13, 10), 0.7, dtype=torch.float64))
    for band in constant[:-1]:
        assert band.abs().max() < 1e-12
    torch.testing.assert_close(constant[-1], torch.full_like(constant[-1], 0.7))
    # independently: 5x5 binomial blur with edge replication (scipy), every other pixel, half-pixel bilinear up
    taps = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
    kernel = np.outer(taps, taps)
    image = x[1, 2].numpy()
    smaller = ndimage.convolve(image, kernel, mode="nearest")[::2, ::2]
    np.testing.assert_allclose(bands[0][1, 2].numpy(), image - _bilinear_half_pixel(smaller, 13, 10), atol=1e-12)
    two_level = imle.LaplacianPyramidL1(levels=2).pyramid(x)
    np.testing.assert_allclose(two_level[-1][1, 2].numpy(), smaller, atol=1e-12)


@pytest.mark.parametrize("margin", [None, "median", "log"])
def test_imlekl_step_minimises_kl_variant_loss_on_its_own_draws(margin):
    """The step's loss is kl_variant_loss with sign +1 on the same two fake batches (same RNG), and both equal
    mean_i [min_j |a_i - x_j|^2 + relu(m - min_k |a_i - b_k|^2)] written out with numpy (with ``log_repulsion`` w:
    mean_i [min_j |a_i - x_j|^2 - w log(eps + min_k |a_i - b_k|^2)])."""
    import copy


    torch.manual_seed(18)
    reals = torch.randn(24, 2) * 0.3
    model = imle.IMLEKL(MLP(2, 2, hidden=16, depth=2), 2, margin=None, n_fakes=20, n_other=30)
    before = copy.deepcopy(model.generator)
    torch.manual_seed(19)
    with torch.no_grad():
        fakes, other = before(torch.randn(20, 2)), before(torch.randn(30, 2))
    a, b, x = fakes.double().numpy(), other.double().numpy(), reals.double().numpy()
    attract = ((a[:, None] - x[None]) ** 2).sum(-1).min(1)
    repel = ((a[:, None] - b[None]) ** 2).sum(-1).min(1)
    if margin == "median":  # the hinge is active for about half of the fakes
        margin = float(np.median(repel))
        assert 0 < (repel < margin).sum() < len(repel)
    if margin == "log":
        model.log_repulsion = 0.5
        by_hand = (attract - 0.5 * np.log(imle.LOG_REPULSION_EPS + repel)).mean()
    else:
        model.margin = margin
        by_hand = (attract - repel).mean() if margin is None else (attract + np.maximum(margin - repel, 0)).mean()
    torch.manual_seed(19)
    losses = model.step(reals, torch.arange(24))
    if margin != "log":
        reference = imle.kl_variant_loss(fakes, other, reals, margin=margin, sign=1).item()
        assert abs(losses["loss"].item() - reference) < 1e-5 * max(1.0, abs(reference))
    assert abs(losses["loss"].item() - by_hand) < 1e-5 * max(1.0, abs(by_hand))
    assert abs(by_hand) > 1e-3  # so that sign -1 would have failed
    assert abs(losses["attract"].item() - attract.mean()) < 1e-5 and abs(losses["repel"].item() - repel.mean()) < 1e-5
    changed = [not torch.equal(p, q) for p, q in zip(model.generator.parameters(), before.parameters())]
    assert any(changed)  # the step also took its gradient step


def test_log_repulsion_pushes_harder_as_fakes_meet_where_the_squared_one_fades():
    """The push on a fake from its nearest other fake at distance d: 2 w d / (eps + d^2) for the log repulsion
    (growing as d falls towards sqrt(eps)), 2 d for the raw squared one (vanishing); autograd against both."""
    reals = torch.tensor([[5.0, 5.0]])
    push = {}
    for d in (0.5, 0.05):
        other = torch.tensor([[d, 0.0]])
        for name, weight in (("log", 0.5), ("squared", None)):
            fake = torch.zeros(1, 2, requires_grad=True)
            attract, repel = imle.kl_variant_terms(fake, other, reals)
            repulsion_only = imle._kl_per_fake(torch.zeros_like(attract), repel, None, weight).sum()
            (grad,) = torch.autograd.grad(repulsion_only, fake)
            push[name, d] = float(grad.norm())
        assert push["log", d] == pytest.approx(2 * 0.5 * d / (imle.LOG_REPULSION_EPS + d**2), rel=1e-5)
        assert push["squared", d] == pytest.approx(2 * d, rel=1e-5)
    assert push["log", 0.05] > 9 * push["log", 0.5] and push["squared", 0.05] < push["squared", 0.5] / 9
    for weight in (0.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="log_repulsion"):
            imle.IMLEKL(MLP(2, 2, hidden=4, depth=1), 2, log_repulsion=weight)
    assert imle.IMLEKL(MLP(2, 2, hidden=4, depth=1), 2, log_repulsion=0.01).log_repulsion == 0.01  # any weight > 0


@pytest.mark.parametrize("margin", [None, 1e-3])
def test_imlekl_step_descends_its_loss_on_the_same_draws(margin):
    """One IMLEKL step moves the generator downhill: Adam's first update is -lr * grad / (|grad| + eps), with grad
    the gradient of kl_variant_loss on the step's own two fake batches (recorded), and that loss, evaluated again on
    the same codes and the same other batch, falls by about the first-order amount lr * sum |grad|."""
    import copy

    torch.manual_seed(22)
    reals = torch.randn(24, 2) * 0.3
    lr = 1e-4
    model = imle.IMLEKL(MLP(2, 2, hidden=16, depth=2), 2, margin=margin, n_fakes=20, n_other=30, lr=lr)
    before = copy.deepcopy(model.generator)
    draws, noise = [], model.noise
    model.noise = lambda n: draws.append(noise(n)) or draws[-1]
    model.step(reals, torch.arange(24))
    z_fakes, z_other = draws
    assert z_fakes.shape == (20, 2) and z_other.shape == (30, 2)
    with torch.no_grad():
        other = before(z_other)

    def loss_of(generator: torch.nn.Module) -> torch.Tensor:
        return imle.kl_variant_loss(generator(z_fakes), other, reals, margin=margin, sign=1)

    if margin is not None:  # the hinge is active for some fakes, not all
        assert 0 < int((imle.kl_variant_terms(before(z_fakes), other, reals)[1] < margin).sum()) < len(z_fakes)
    grads = torch.autograd.grad(loss_of(before), list(before.parameters()))
    first_order = 0.0
    for p0, p1, grad in zip(before.parameters(), model.generator.parameters(), grads):
        adam = -lr * grad / (grad.abs() + 1e-8)
        torch.testing.assert_close(p1 - p0, adam, rtol=0, atol=1e-6)  # fp32 rounding of p0 + update
        first_order += lr * float(grad.abs().sum())
    with torch.no_grad():
        drop = float(loss_of(before) - loss_of(model.generator))
    assert 0.5 * first_order < drop < 1.5 * first_order, (drop, first_order)


def test_pairwise_cost_count_fields_against_the_formulas():
    n_real, n_fake, net_flops, dim = 64, 640, 15.5e9, 4096
    cost = imle.pairwise_cost_count(n_real, n_fake, net_flops, dim)
    assert cost["pairs"] == 40_960
    assert cost["network_runs_pairwise"] == 81_920  # both images of every pair through the network
    assert cost["network_runs_cached"] == 704  # every image once
    assert cost["flops_pairwise"] == pytest.approx(81_920 * 15.5e9, rel=1e-12)  # 1.26976e15
    # 704 network runs plus one 2 * R * F * D GEMM (2 FLOPs per multiply-add)
    assert cost["flops_cached"] == pytest.approx(704 * 15.5e9 + 2 * 40_960 * 4096, rel=1e-12)
    assert cost["flops_cached"] == pytest.approx(1.091233554432e13, rel=1e-12)
    assert cost["speedup"] == pytest.approx(1.26976e15 / 1.091233554432e13, rel=1e-12)


def test_a_refresh_that_cannot_fit_on_the_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * 2**30, 80 * 2**30))
    # 1.5 GiB reserved by PyTorch's allocator, 1 GiB of it in use: 0.5 GiB more is free to this process
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 * 2**29)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2**30)
    with pytest.raises(MemoryError, match="3.0 GiB, and cuda has 2.5 GiB free"):
        imle._check_fits(3 * 2**30, torch.device("cuda"), "the features of the whole dataset")
    imle._check_fits(int(2.25 * 2**30), torch.device("cuda"), "the features")  # fits only with the allocator's reserve
    imle._check_fits(2**50, torch.device("cpu"), "the features")  # host memory is not checked


def float64_argmin(queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: float64 ||q - k||^2 against every key; torch.argmin keeps the first of equal minima."""
    dist = (queries.double()[:, None, :] - keys.double()[None, :, :]).pow(2).sum(-1)
    return dist.min(1).values, dist.argmin(1)


def test_exact_duplicates_beyond_the_candidates_are_not_settled_by_a_zero_threshold():
    """50 copies of one key among 100, the query on them: every pass's first candidates tie at distance 0, and so
    does the bound of the keys left out (0), so 0 < 0 must not prove the first pass's pick (whichever tied keys
    torch.topk kept, the order of ties being unspecified): only the wide pass (64 > 50 candidates) can prove index 0."""
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(100, 8, generator=g)
    keys[::2] = keys[0]
    queries = torch.cat([keys[:1], keys[:1] + 1e-3 * torch.randn(3, 8, generator=g)])
    ref_dist, ref_index = float64_argmin(queries, keys)
    for chunk in (None, 30):
        stats: dict[str, int] = {}
        dist, index = imle.nearest_neighbors(queries, keys, chunk, stats=stats)
        assert index.tolist() == ref_index.tolist() == [0] * 4
        torch.testing.assert_close(dist, ref_dist, rtol=1e-12, atol=0.0)
        # a duplicate left out of the first pass's candidates ties with them, whichever topk kept: no proof there
        assert imle.settled_queries(stats) == {"fp32": 0, "fp32-wide": 4}


def test_match_by_pairs_breaks_ties_across_key_blocks_toward_the_lowest_index():
    """Equal distances in different key blocks (chunk_size 1 and 2): the first key wins, as torch.argmin says."""
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [1.0, 0.0]])
    queries = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    _, ref_index = float64_argmin(queries, keys)
    assert ref_index.tolist() == [0, 0, 1]
    for chunk in (None, 1, 2):
        for distance in (imle.squared_l2, imle.l1_distance):
            assert imle.match(queries, keys, distance, chunk_size=chunk)[1].tolist() == [0, 0, 1]


def test_a_well_separated_nearest_key_is_proven_by_the_first_pass_with_one_candidate():
    """Each query lies within 1e-3 of its own key and the other keys are >= 1 away (keys on a grid of spacing 1):
    with one candidate, the bound of the first key left out (the second nearest, ~1) is far above the winner's
    distance (~1e-6), so the first fp32 pass must settle every query; none may go on to a later pass."""
    g = torch.Generator().manual_seed(1)
    grid = torch.stack(torch.meshgrid(torch.arange(10.0), torch.arange(10.0), indexing="ij"), -1).reshape(-1, 2)
    keys = torch.cat([grid, torch.zeros(100, 6)], 1)
    pick = torch.randperm(100, generator=g)[:30]
    queries = keys[pick] + 1e-3 * torch.rand(30, 8, generator=g)
    stats: dict[str, int] = {}
    dist, index = imle.nearest_neighbors(queries, keys, candidates=1, stats=stats)
    assert torch.equal(index, pick) and torch.equal(index, float64_argmin(queries, keys)[1])
    assert imle.settled_queries(stats) == {"fp32": 30}
    assert stats[imle.RERANKED_ROWS] == 30  # one float64 row per query: nothing else could win


def test_kl_variant_gradient_flows_into_fakes_a_only_and_matches_a_brute_force_closed_form():
    """d/da_i of mean_i [||a_i - x_j(i)||^2 + relu(m - ||a_i - b_k(i)||^2)] = (2 (a_i - x_j) - 2 (a_i - b_k) [active])
    / N with j(i), k(i) the float64 nearest real and other fake; the other fake batch b gets no gradient."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(12, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    b = torch.randn(9, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    x = torch.randn(15, 3, generator=g, dtype=torch.float64)
    margin = 1.0
    loss = imle.kl_variant_loss(a, b, x, margin)
    grad_a, grad_b = torch.autograd.grad(loss, (a, b), allow_unused=True)
    assert grad_b is None or not grad_b.any()
    a0, b0 = a.detach(), b.detach()
    to_real, to_fake = float64_argmin(a0, x)[1], float64_argmin(a0, b0)[1]
    repel = (a0 - b0[to_fake]).pow(2).sum(1)
    expected = (2 * (a0 - x[to_real]) - 2 * (a0 - b0[to_fake]) * (repel < margin)[:, None]) / len(a0)
    assert 0 < int((repel < margin).sum()) < len(a0)  # both sides of the hinge occur
    torch.testing.assert_close(grad_a, expected)
    value = ((a0 - x[to_real]).pow(2).sum(1) + (margin - repel).clamp_min(0)).mean()
    torch.testing.assert_close(loss.detach(), value)


# ----------------------------------------------------------------------------- reported values and draws


@pytest.mark.parametrize("loss", ["l2", "l1"])
def test_glo_step_reports_the_mean_per_image_loss_of_the_batch_codes_before_its_update(loss):
    torch.manual_seed(23)
    images = torch.rand(20, 1, 8, 8) * 2 - 1
    glo = imle.GLO(ConvGenerator(4, resolution=8, channels=1, width=8, norm="layer"), 20, 4, loss=loss)
    index = torch.tensor([5, 0, 17, 9, 12, 3])  # not the first rows: the codes must be the batch's own
    with torch.no_grad():  # the codes and generator the step starts from
        diff = glo.generator(glo.codes.weight[index]) - images[index]
        by_hand = (diff**2 if loss == "l2" else diff.abs()).sum(dim=(1, 2, 3)).mean().item()
    reported = glo.step(images[index], index)["loss"].item()
    assert reported == pytest.approx(by_hand, rel=1e-6)
    with torch.no_grad():  # the step did move: a loss recomputed after it would differ
        after = glo.generator(glo.codes.weight[index]) - images[index]
        after = (after**2 if loss == "l2" else after.abs()).sum(dim=(1, 2, 3)).mean().item()
    assert after != pytest.approx(by_hand, rel=1e-6)


class _RecordingGenerator(torch.nn.Module):
    """A linear generator that keeps a copy of every batch of codes it is given."""

    def __init__(self, z_dim: int, out: int):
        super().__init__()
        self.linear = torch.nn.Linear(z_dim, out)
        self.seen: list[torch.Tensor] = []

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.seen.append(z.detach().clone())
        return self.linear(z)


def test_imle_trains_on_its_cached_codes_jittered_by_the_default_0_01_times_standard_normal_noise():
    torch.manual_seed(24)
    data = torch.randn(1000, 2)
    generator = _RecordingGenerator(4, 2)
    model = imle.IMLE(generator, 4, fakes_per_real=2, refresh_every=2, data=data)
    index = torch.randperm(1000)
    model.step(data[index], index)  # step 0 refreshes the cache, then trains on the cached codes
    assert len(generator.seen) == 2 and not model.matched_z.eq(0).all()
    # the class docstring promises codes + z_jitter N(0, I), z_jitter 0.01 by default
    noise = ((generator.seen[-1] - model.matched_z[index]).double() / 0.01).flatten().numpy()
    assert len(noise) == 4000
    assert stats.kstest(noise, "norm").pvalue > 1e-3  # a uniform draw or another scale fails by far
    assert abs(noise.mean()) < 4 / math.sqrt(4000) and abs(noise.std() - 1) < 4 / math.sqrt(2 * 4000)


def test_lap1_is_the_level_weighted_l1_of_independently_built_pyramids_of_both_images():
    """sum_j 2^(e j) sum_{c, pixels} |L^j(x) - L^j(y)|, each image's pyramid built by hand with scipy (blur with
    edge replication, every other pixel, half-pixel bilinear up), for e = +2 (the default) and e = -1."""
    taps = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
    kernel = np.outer(taps, taps)

    def pyramid(image, levels):
        bands, current = [], image
        for _ in range(levels - 1):
            smaller = ndimage.convolve(current, kernel, mode="nearest")[::2, ::2]
            bands.append(current - _bilinear_half_pixel(smaller, *current.shape))
            current = smaller
        return bands + [current]

    g = torch.Generator().manual_seed(25)
    x, y = (torch.rand(2, 2, 16, 12, generator=g, dtype=torch.float64) for _ in range(2))
    for exponent in (2.0, -1.0):
        lap = imle.LaplacianPyramidL1(levels=3, level_exponent=exponent)  # 16x12, 8x6, 4x3
        by_hand = [
            sum(2.0 ** (exponent * j) * np.abs(bx - by).sum()
                for c in range(2)
                for j, (bx, by) in enumerate(zip(pyramid(x[i, c].numpy(), 3), pyramid(y[i, c].numpy(), 3))))
            for i in range(2)]
        np.testing.assert_allclose(lap(x, y).numpy(), by_hand, rtol=1e-12)
        # the band-pass levels carry a share of it, so a loss of the residual alone would fail above
        residual = sum(2.0 ** (exponent * 2) * np.abs(pyramid(x[0, c].numpy(), 3)[-1]
                                                     - pyramid(y[0, c].numpy(), 3)[-1]).sum() for c in range(2))
        assert residual < 0.9 * by_hand[0]


def _pairwise(cost, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """cost(q_i, k_j) [M, N] (float64) for a per-pair cost, evaluated on every (query, key) pair."""
    m, n = len(queries), len(keys)
    values = cost(queries.repeat_interleave(n, 0), keys.repeat(m, *[1] * (keys.ndim - 1)))
    return values.double().view(m, n)


@pytest.mark.parametrize("distance, with_features", [("l2", False), ("lap1", False), ("l2", True), ("lap1", True)])
def test_imle_step_matches_each_real_to_the_nearest_of_ten_fresh_fakes_each_and_trains_on_that_pair(
        distance, with_features):
    """A per-batch step draws 10 codes per real by default and matches in squared L2 between features when a feature
    map is given, else under ``distance``; it trains under ``distance`` (squared L2 between features for 'l2'). With
    no jitter the step's loss is the matched pairs' training cost, brute-forced here over the recorded pool."""
    torch.manual_seed(26)
    images = torch.rand(6, 1, 8, 8) * 2 - 1
    projection = torch.randn(64, 5)

    def feature_map(x):
        return x.flatten(1) @ projection

    generator = ConvGenerator(4, resolution=8, channels=1, width=8, norm="layer")
    model = imle.IMLE(generator, 4, z_jitter=0.0, distance=distance,
                      match_features=feature_map if with_features else None)
    before = copy.deepcopy(generator)
    pools, noise = [], model.noise
    model.noise = lambda n: pools.append(noise(n)) or pools[-1]
    losses = model.step(images, torch.arange(6))
    (pool,) = pools
    assert pool.shape == (60, 4)
    with torch.no_grad():
        fakes = before(pool)
    sq_l2 = lambda a, b: (a.double() - b.double()).flatten(1).pow(2).sum(1)  # noqa: E731
    lap1 = _pairwise(imle.LaplacianPyramidL1(), images, fakes)
    if with_features:
        matching = _pairwise(sq_l2, feature_map(images), feature_map(fakes))
    else:
        matching = lap1 if distance == "lap1" else _pairwise(sq_l2, images, fakes)
    training = lap1 if distance == "lap1" else matching
    nearest = matching.argmin(1)
    assert losses["match_dist"].item() == pytest.approx(matching.min(1).values.mean().item(), rel=1e-5)
    assert losses["loss"].item() == pytest.approx(training[torch.arange(6), nearest].mean().item(), rel=1e-5)


def test_glann_matches_two_fresh_fakes_per_trained_glo_code_and_pulls_them_onto_the_batch_codes():
    """After ``glo_steps`` GLO steps the mapper's data are GLO's codes as trained (not as they started); a refresh
    draws 2 codes per data point, matches each code to its nearest T(z) (brute force here), and with no jitter the
    step's loss is the batch's matched distance; the next refresh comes 50 mapper steps later."""
    images = to_float(load_images("digits").images[:16])
    torch.manual_seed(27)
    glo = imle.GLO(ConvGenerator(4, resolution=8, channels=1, width=8, norm="layer"), 16, 4)
    glann = imle.GLANN(glo, glo_steps=2, noise_dim=3, z_jitter=0.0)
    start = glo.latent_codes()
    pools, noise = [], glann.mapper.noise
    glann.mapper.noise = lambda n: pools.append(noise(n)) or pools[-1]
    index = torch.tensor([3, 0, 7, 12, 9, 5, 14, 1])
    for _ in range(2):
        glann.step(images[index], index)
    codes = glo.latent_codes()
    assert not torch.allclose(codes[index], start[index], atol=1e-3)  # GLO did move the batch's codes
    mapper = copy.deepcopy(glann.mapper.generator)
    losses = glann.step(images[index], index)
    (pool,) = pools
    assert pool.shape == (32, 3)
    with torch.no_grad():
        nearest = (codes.double()[:, None] - mapper(pool).double()[None]).pow(2).sum(-1).min(1).values
    torch.testing.assert_close(glann.mapper.matched_dist, nearest, rtol=1e-10, atol=1e-12)
    assert losses["match_dist"].item() == pytest.approx(nearest[index].mean().item(), rel=1e-6)
    assert losses["loss"].item() == pytest.approx(nearest[index].mean().item(), rel=1e-5)
    for _ in range(49):
        glann.step(images[index], index)
    assert len(pools) == 1
    glann.step(images[index], index)
    assert len(pools) == 2


def test_glo_step_moves_the_batch_codes_by_one_adam_step_at_the_code_lr_then_back_onto_the_sphere():
    """Adam's first update is -lr g / (|g| + eps) (its bias-corrected moments are g and g^2), with GLO's default code
    lr 1e-2 and g the autograd gradient of the batch loss in the codes; other rows stay put. Initial codes (here
    given off the sphere) start on it."""
    import torch.nn.functional as F

    torch.manual_seed(28)
    images = torch.rand(10, 1, 8, 8) * 2 - 1
    start = 3 * torch.randn(10, 4)
    glo = imle.GLO(ConvGenerator(4, resolution=8, channels=1, width=8, norm="layer"), 10, 4, init_codes=start)
    torch.testing.assert_close(glo.latent_codes(), start / start.norm(dim=1, keepdim=True))
    generator = copy.deepcopy(glo.generator)
    codes = glo.latent_codes().requires_grad_(True)
    index = torch.tensor([4, 1, 8])
    (grad,) = torch.autograd.grad(imle.squared_l2(generator(codes[index]), images[index]).mean(), codes)
    glo.step(images[index], index)
    expected = codes.detach().clone()
    expected[index] = F.normalize(expected[index] - 1e-2 * grad[index] / (grad[index].abs() + 1e-8), dim=1)
    torch.testing.assert_close(glo.latent_codes(), expected, rtol=0, atol=1e-6)


def test_cli_builders_default_to_the_options_their_docstrings_give():
    from genlib.cli import TrainSpec

    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(29))
    spec = TrainSpec(images, (1, 8, 8), torch.device("cpu"), z_dim=4, width=8, lr=2e-4)
    model = imle.build_imle(spec)
    assert (model.fakes_per_real, model.refresh_every, model.z_jitter) == (10, 1, 0.01) and model.data is None
    glo = imle.build_glo(spec)
    assert glo.optimizers["codes"].defaults["lr"] == pytest.approx(10 * 2e-4)
    assert glo.optimizers["generator"].defaults["lr"] == 2e-4
    glann = imle.build_glann(spec)
    assert (glann.glo_steps, glann.noise_dim, glann.mapper.refresh_every) == (1000, 32, 50)
    assert not isinstance(glann.mapper.generator[-1], imle.UnitSphere)


def test_the_smoothed_nll_pulls_each_fake_by_its_responsibility_weighted_pull_towards_the_reals():
    # chapter 1's eq. imle-resp: d L_sigma / d G(z_j) = (1/M) sum_i w_ij (G(z_j) - x_i) / sigma^2, w a softmax over j
    torch.manual_seed(0)
    reals, sigma = torch.randn(6, 3, dtype=torch.float64), 0.7
    fakes = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(imle.smoothed_nll(reals, fakes, sigma), fakes)
    with torch.no_grad():
        sq = ((reals[:, None, :] - fakes[None, :, :]) ** 2).sum(-1)  # [M, N] by broadcasting
        weights = (-sq / (2 * sigma**2)).exp()
        weights = weights / weights.sum(1, keepdim=True)
        expected = (weights[:, :, None] * (fakes[None] - reals[:, None])).sum(0) / (len(reals) * sigma**2)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
