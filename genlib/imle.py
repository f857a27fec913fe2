"""Chapter 1: implicit maximum likelihood (IMLE), its KL(q||p) variant, GLO and GLANN.

Source: Su Jianlin, "A short introduction to the non-adversarial generative model GLANN"
(kexue.fm/archives/6394, ``seeds/000_*.txt``). The chain of ideas, and where each lives here:

* A generator ``x = G(z)`` defines ``q(x) = E_z[delta(x - G(z))]``; replacing the delta by a
  Gaussian of width ``sigma`` and maximising the likelihood of data gives
  ``-mean_i log sum_j exp(-||x_i - G(z_j)||^2 / 2 sigma^2)`` (:func:`smoothed_nll`), whose
  ``sigma -> 0`` limit is ``mean_i min_j ||x_i - G(z_j)||^2``: IMLE (:class:`IMLE`), built on an
  exact nearest-neighbour search (:func:`nearest_neighbors`, :func:`match`).
* The same recipe applied to ``KL(q||p)`` gives attraction to the nearest real sample and
  repulsion from the nearest other fake (:func:`kl_variant_loss`, :class:`IMLEKL`).
* L2 between images is a poor distance; a perceptual one is expensive inside IMLE
  (:func:`pairwise_cost_count`), so GLO (:class:`GLO`) first learns one code per image with a
  better loss (:class:`LaplacianPyramidL1`, :class:`PixelFeatureL1`), and GLANN
  (:class:`GLANN`) then runs IMLE in that low-dimensional code space.

Every model is a :class:`genlib.train.GenerativeModel` trained by :func:`genlib.train.fit`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genlib import features
from genlib.data import to_float
from genlib.metrics import check_positive
from genlib.nets import MLP, ConvGenerator
from genlib.train import GenerativeModel, count_step, mirror_step_count

if TYPE_CHECKING:
    from genlib.cli import TrainSpec

PairLoss = Callable[[Tensor, Tensor], Tensor]
"""A per-pair loss: ``(a [B, ...], b [B, ...]) -> [B]``."""
Features = Callable[[Tensor], Tensor]
"""A feature map: ``x [B, ...] -> [B, D]`` (more dimensions are flattened)."""

# ======================================================================================
# Exact nearest neighbours
# ======================================================================================

BLOCK_BYTES = 256 * 2**20
"""Memory budget of one block: of the fp32 distance matrix, of each working copy of a block of rows (fp32, or
float64 for float64 inputs), and of the float64 rows of one re-rank step on CUDA."""
MAX_KEY_BLOCK = 2**16
CANDIDATES = {"fp32": 8, "tf32": 16, "bf16": 32}
"""Candidates kept per query by each GEMM precision (more where the GEMM is coarser)."""
WIDE_CANDIDATES = 64
"""Candidates of the last pass (``'fp32-wide'``, the fp32 GEMM again), for the few queries whose nearest keys
crowd within the error bound (high-dimensional noise, where all distances concentrate): re-ranking 64
candidates costs far less than the float64 brute force it spares."""


class Pass(NamedTuple):
    """One certified pass of the search: its name in ``stats``, its GEMM precision, candidates kept per query."""

    name: str
    precision: str
    keep: int


KEY_CACHE_BYTES = 2**30
"""Rounded copies of the keys kept during one search (see ``_RoundedKeys``)."""
RERANK_BYTES_CPU = 16 * 2**20
"""Float64 working set of one re-rank block on the CPU: small enough to stay in cache (measured fastest);
on CUDA the re-rank uses BLOCK_BYTES, since there few large kernels beat many small ones."""
NORM_CHUNK = 256
"""Entries per fp32 partial sum of a squared norm (:func:`_sq_norms`)."""
TENSOR_CORE_SAFETY = 2.0
"""Factor on the GEMM's error bound for the tf32/bf16 passes, which run on tensor cores on CUDA. Tensor cores add
several products at once, aligned to the largest and truncated, so their worst case exceeds the 2u per addition of
the bound by up to about 1/(products per step) (a quarter for 4); the factor covers that at the price of a slightly
looser certificate. A tf32/bf16 pass on the CPU (an emulation of the GPU's) takes the same bound, so that it
certifies as the GPU would."""
FP32_UNIT = 2.0**-24
FP64_UNIT = 2.0**-53
_NO_PHASE = nullcontext()


def _phase(name: str) -> AbstractContextManager:
    """A profiler range ``name`` (the phases of ``python -m genlib bench``'s breakdown) while torch.profiler
    runs; otherwise a shared no-op, so the search pays one flag check for it."""
    return torch.profiler.record_function(name) if torch.autograd.profiler._is_profiler_enabled else _NO_PHASE


def nearest_neighbors(
    queries: Tensor,
    keys: Tensor,
    chunk_size: int | None = None,
    *,
    precision: str | None = None,
    candidates: int | None = None,
    stats: dict[str, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact squared-L2 nearest key for every query: queries [M, d], keys [N, d] -> (sq_dist [M], index [M]).

    ``index[i]`` is the row of ``keys`` nearest to ``queries[i]``, ties broken toward the lowest
    index (like ``torch.argmin``); ``sq_dist[i]`` is its squared distance computed directly as
    ``sum((q - k)**2)`` in float64 (float32 off CPU/CUDA). The answer is the one float64 brute
    force gives, at the speed of one GEMM:

    1. **Candidates from a fast GEMM.** Both sets are centred on the keys' mean in fp32 (distances
       do not change; the norms, and so the rounding errors, shrink), rounded to the pass's
       precision (the rounded keys are kept for later query blocks and passes), and
       ``||q||^2 - 2 q.k + ||k||^2`` gives approximate distances; the
       ``CANDIDATES[precision]`` (or ``candidates``) smallest per query are kept. Precision is ``'tf32'`` on CUDA
       (``'bf16'`` on request) and ``'fp32'`` on the CPU.
    2. **Exact re-rank** in float64, computed as ``||q - k||^2`` (not by the expansion, whose
       cancellation is what loses near-ties), of the candidates that can still win: each
       candidate's distance has a rigorous lower bound (:func:`_lower_bound`: the worst-case fp32
       accumulation error ``2 (d + 4) u ||q|| max ||k||`` twice, then the measured rounding residual
       ``r`` by the triangle inequality, ``exact >= (sqrt(approx - e) - r)^2``), and a candidate whose
       bound exceeds the first candidate's exact distance is skipped.
    3. **Certificate.** The same bound at the k-th approximate distance holds for every key left
       out. If the re-ranked best is strictly below it, the answer is proven; otherwise the query
       goes to the next pass (fp32 after tf32/bf16, then fp32 with 64 candidates) and, if still
       unproven (e.g. more exact duplicates than candidates), to a float64 brute force over all keys.

    Memory stays bounded: queries and keys are processed in blocks so that one distance
    block holds at most ``BLOCK_BYTES`` (256 MB) of fp32 and each working copy of a block of rows
    at most 256 MB; ``chunk_size`` caps both block sides further. Autocast is disabled inside and the
    matmul precision pinned for each pass (a global ``set_float32_matmul_precision`` or bf16
    autocast cannot silently void the bound; the pinning sets global torch flags for the duration
    of the call, so do not race it from other threads). ``stats``, if given, counts queries
    settled by each pass (``'fp32'``, ``'tf32'``, ``'bf16'``, ``'fp32-wide'``) and by ``'brute_force'``,
    and under ``'reranked_rows'`` (:data:`RERANKED_ROWS`) the (query, key) pairs that the passes computed in
    float64; :func:`settled_queries` keeps the per-query counts.
    """
    with _phase("nn.check_inputs"):
        centre = _check_search_inputs(queries, keys, chunk_size)
    if queries.device.type not in ("cpu", "cuda"):  # the exact re-rank needs float64
        dist, index = nearest_neighbors(queries.cpu(), keys.cpu(), chunk_size, precision=precision,
                                        candidates=candidates, stats=stats)
        return dist.float().to(queries.device), index.to(queries.device)
    with torch.no_grad():
        return _search(queries, keys, centre, chunk_size, _passes(precision, queries.device, candidates), stats)


RERANKED_ROWS = "reranked_rows"
"""The key of :func:`nearest_neighbors`'s ``stats`` that counts float64 rows rather than queries."""


def settled_queries(stats: dict[str, int]) -> dict[str, int]:
    """The queries settled by each pass and by 'brute_force' in the ``stats`` of :func:`nearest_neighbors`: all
    its counts but :data:`RERANKED_ROWS`."""
    return {name: count for name, count in stats.items() if name != RERANKED_ROWS}


def _check_search_inputs(queries: Tensor, keys: Tensor, chunk_size: int | None) -> Tensor:
    """Raise a clear error for anything :func:`nearest_neighbors` cannot search; else the centre [d] (fp32)
    that the search subtracts from both sets."""
    for name, t in (("queries", queries), ("keys", keys)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 2:
            raise ValueError(f"{name} must be 2-D [rows, dim], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(f"queries have dimension {queries.shape[1]} but keys have {keys.shape[1]}")
    if queries.shape[1] == 0 or keys.shape[0] == 0:
        raise ValueError(f"need dimension >= 1 and at least one key, got keys of shape {tuple(keys.shape)}")
    if queries.device != keys.device:
        raise ValueError(f"queries are on {queries.device} but keys are on {keys.device}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    # min and max propagate NaN and show inf: one read of each set, no float64 copy of it (which costs a CPU
    # 20 times more), and one sync.
    extremes = torch.cat([torch.stack(torch.aminmax(t)).double() for t in (queries, keys) if t.numel()])
    if not torch.isfinite(extremes).all():
        raise ValueError("queries and keys must be finite (found NaN or inf)")
    # Any centre gives the same distances; the keys' mean keeps the norms, and so the bound, small. Where an
    # fp32 column sum overflows, 0 is as valid a centre, only less tight.
    mean = keys.mean(0, dtype=torch.float64 if keys.dtype == torch.float64 else torch.float32)
    return torch.nan_to_num(mean.float(), nan=0.0, posinf=0.0, neginf=0.0)


def distance_lower_bounds(queries: Tensor, keys: Tensor, precision: str = "fp32") -> tuple[Tensor, Tensor]:
    """The certificate's view of every pair: queries [M, d], keys [N, d] -> (approximate squared distances [M, N]
    as the first pass's GEMM computes them in ``precision``, lower bounds [M, N] on the float64 distances).

    For inspecting the bound (chapter 1 derives it) on small inputs; :func:`nearest_neighbors` computes the
    same quantities block by block and keeps only a few per query.
    """
    if precision not in CANDIDATES:
        raise ValueError(f"precision must be one of {sorted(CANDIDATES)}, got {precision!r}")
    centre = _check_search_inputs(queries, keys, None)
    with torch.no_grad(), _pinned_matmul(precision, queries.device):
        q, k = _round_centred(queries, centre, precision), _round_centred(keys, centre, precision)
        approx = _approx_sq_dist(q, k)
        return approx, _lower_bound(approx, q.norm, q.resid, k.norm.max(), k.resid.max(), queries.shape[1],
                                    tensor_cores=precision != "fp32")


def _passes(precision: str | None, device: torch.device, candidates: int | None = None) -> list[Pass]:
    """The passes in order: the fast precision (keeping ``candidates`` per query, default
    ``CANDIDATES[precision]``), fp32 for what it could not prove, then fp32 with ``WIDE_CANDIDATES`` for what
    is still open."""
    first = precision or ("tf32" if device.type == "cuda" else "fp32")
    if first not in CANDIDATES:
        raise ValueError(f"precision must be one of {sorted(CANDIDATES)} or None, got {precision!r}")
    if candidates is not None and (isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1):
        raise ValueError(f"candidates must be a positive int or None, got {candidates!r}")
    passes = [Pass(first, first, candidates or CANDIDATES[first])]
    if first != "fp32":
        passes.append(Pass("fp32", "fp32", CANDIDATES["fp32"]))
    return passes + [Pass("fp32-wide", "fp32", WIDE_CANDIDATES)]


def _search(queries: Tensor, keys: Tensor, centre: Tensor, chunk_size: int | None, passes: list[Pass],
            stats: dict[str, int] | None) -> tuple[Tensor, Tensor]:
    """Run the certified passes, then brute force on the queries none of them proved."""
    m, n, d = queries.shape[0], keys.shape[0], keys.shape[1]
    if m == 0:
        return queries.new_empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.int64, device=queries.device)
    q_block, k_block = _block_sizes(m, n, d, chunk_size, max(4, queries.element_size(), keys.element_size()))
    rounded_keys = _RoundedKeys(keys, centre, k_block)
    dist = index = todo = None  # todo None: every query is still open
    for search_pass in passes:
        rows = queries if todo is None else queries[todo]
        with _phase(f"nn.pass.{search_pass.name}"), _pinned_matmul(search_pass.precision, queries.device):
            found, at, proven = _certified_pass(rows, keys, rounded_keys, search_pass, q_block, stats)
        with _phase("nn.settle"):  # on CUDA it syncs: its CPU time includes waiting for the pass's kernels
            settled = int(proven.sum())
            _count(stats, search_pass.name, settled)
            if todo is None:  # the first pass answers every query; later ones overwrite what it could not prove
                dist, index, todo = found, at, (~proven).nonzero().squeeze(1)
            else:
                dist[todo[proven]], index[todo[proven]] = found[proven], at[proven]
                todo = todo[~proven]
        if todo.numel() == 0:
            return dist, index
    with _phase("nn.brute_force"):
        dist[todo], index[todo] = _brute_force(queries[todo], keys)
    _count(stats, "brute_force", todo.numel())
    return dist, index


def _count(stats: dict[str, int] | None, key: str, value: int) -> None:
    """Add ``value`` to ``stats[key]`` when the caller asked for statistics."""
    if stats is not None:
        stats[key] = stats.get(key, 0) + value


def _block_sizes(m: int, n: int, d: int, chunk_size: int | None, item_bytes: int = 4) -> tuple[int, int]:
    """(queries, keys) per block: a working copy of a block of rows <= BLOCK_BYTES (``item_bytes`` per value: 4
    for the fp32 copies, 8 where float64 inputs are copied), distance block <= BLOCK_BYTES. The re-rank's float64
    rows have a budget of their own, so the keys of the benchmark's largest search fit in one block."""
    rows = max(1, BLOCK_BYTES // (item_bytes * d))
    k_block = min(n, rows, MAX_KEY_BLOCK, chunk_size or n)
    q_block = min(m, rows, max(1, BLOCK_BYTES // (4 * k_block)), chunk_size or m)
    return q_block, k_block


@contextmanager
def _pinned_matmul(precision: str, device: torch.device) -> Iterator[None]:
    """Make the GEMM do what the error bound assumes: TF32 tensor cores only for the tf32/bf16
    passes on CUDA (their inputs are already TF32-exact), IEEE fp32 otherwise, no bf16
    split-K reductions and no autocast. The caller's settings come back afterwards, whichever of PyTorch's two
    precision APIs set them (reading the old one raises once the new one has been used)."""
    tensor_cores = device.type == "cuda" and precision != "fp32"
    cuda_matmul = torch.backends.cuda.matmul
    old_reduction = cuda_matmul.allow_bf16_reduced_precision_reduction
    backends = [cuda_matmul, torch.backends.mkldnn.matmul] if hasattr(cuda_matmul, "fp32_precision") else []
    old_precision = [backend.fp32_precision for backend in backends] or torch.get_float32_matmul_precision()
    # a backend's getter shows the value it inherits; 'none' restores the inheritance instead of pinning it
    inherited = getattr(torch.backends, "fp32_precision", None)
    try:
        cuda_matmul.allow_bf16_reduced_precision_reduction = False
        if backends:
            cuda_matmul.fp32_precision = "tf32" if tensor_cores else "ieee"
            torch.backends.mkldnn.matmul.fp32_precision = "ieee"
        else:
            torch.set_float32_matmul_precision("high" if tensor_cores else "highest")
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        if backends:
            for backend, old in zip(backends, old_precision):
                backend.fp32_precision = "none" if old == inherited else old
        else:
            torch.set_float32_matmul_precision(old_precision)
        cuda_matmul.allow_bf16_reduced_precision_reduction = old_reduction


def _certified_pass(queries: Tensor, keys: Tensor, rounded_keys: _RoundedKeys, search_pass: Pass,
                    q_block: int, stats: dict[str, int] | None) -> tuple[Tensor, Tensor, Tensor]:
    """One candidate-and-certificate pass: (exact sq_dist [M], index [M], proven [M] bool)."""
    parts = []
    for start in range(0, queries.shape[0], q_block):
        block = queries[start:start + q_block]
        candidates, lower, threshold = _candidates(block, rounded_keys, search_pass)
        with _phase("nn.rerank"):
            dist, index, reranked = _rerank(block, keys, candidates, lower)
            _count(stats, RERANKED_ROWS, reranked)
            # Every key left out has exact distance >= threshold; strict < also settles ties (a
            # left-out key cannot tie with the winner, so lowest-index tie-breaking stays exact).
            parts.append((dist, index, dist < threshold))
    return parts[0] if len(parts) == 1 else tuple(torch.cat(column) for column in zip(*parts))


def _candidates(queries: Tensor, rounded_keys: _RoundedKeys, search_pass: Pass) -> tuple[Tensor, Tensor, Tensor]:
    """Scan all keys for one query block: (candidate indices [m, k], their lower bounds [m, k], threshold [m]).

    Candidates are ranked by a lower bound on their exact distance (:func:`_lower_bound`, which grows with the
    approximate distance); ``threshold`` is a lower bound on the exact distance of every key not kept.
    """
    precision, n, d = search_pass.precision, rounded_keys.n, rounded_keys.d
    with _phase("nn.round_queries"):
        q = _round_centred(queries, rounded_keys.centre, precision)
    keep = min(search_pass.keep, n)
    lower = index = None
    threshold = torch.full((queries.shape[0],), math.inf, dtype=torch.float64, device=queries.device)
    for start in range(0, n, rounded_keys.k_block):
        k, k_norm_max, k_resid_max = rounded_keys.block(start, precision)
        with _phase("nn.gemm"):
            approx = _approx_sq_dist(q, k)
        with _phase("nn.topk"):
            # one more than kept: every key left out has an approximate distance >= the first one left out
            values, at = approx.topk(min(keep + 1, approx.shape[1]), dim=1, largest=False, sorted=True)
            block_lower = _lower_bound(values, q.norm, q.resid, k_norm_max, k_resid_max, d,
                                       tensor_cores=precision != "fp32")
            if values.shape[1] > keep:
                threshold = torch.minimum(threshold, block_lower[:, keep])
                block_lower, at = block_lower[:, :keep], at[:, :keep]
            if lower is None:
                lower, index = block_lower, at + start
            else:
                lower, index, threshold = _merge(lower, index, block_lower, at + start, keep, threshold)
    return index, lower, threshold


class _RoundedKeys:
    """The keys centred and rounded for the GEMM, block by block, per precision. Blocks are kept
    between query blocks and passes (the fp32 and fp32-wide passes share them) while the copies fit
    in ``KEY_CACHE_BYTES``; past that they are rounded again when needed."""

    def __init__(self, keys: Tensor, centre: Tensor, k_block: int):
        self.keys, self.centre, self.k_block = keys, centre, k_block
        self.n, self.d = keys.shape
        self.cache: dict[tuple[str, int], tuple[_Rows, Tensor, Tensor]] = {}
        self.cached_bytes = 0

    def block(self, start: int, precision: str) -> tuple[_Rows, Tensor, Tensor]:
        """(the rows of keys[start:start + k_block] as :func:`_round_centred` gives them, their largest norm
        bound, their largest residual bound), the last two 0-dim float64."""
        if (precision, start) in self.cache:
            return self.cache[precision, start]
        with _phase("nn.round_keys"):
            rows = _round_centred(self.keys[start:start + self.k_block], self.centre, precision)
            block = rows, rows.norm.max(), rows.resid.max()
        size = rows.rounded.numel() * rows.rounded.element_size()
        if self.cached_bytes + size <= KEY_CACHE_BYTES:
            self.cache[precision, start] = block
            self.cached_bytes += size
        return block


def _merge(lower: Tensor, index: Tensor, new_lower: Tensor, new_index: Tensor, keep: int,
           threshold: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Keep the ``keep`` smallest lower bounds of two candidate lists; dropped ones lower the threshold."""
    lower, index = torch.cat([lower, new_lower], 1), torch.cat([index, new_index], 1)
    if lower.shape[1] <= keep:
        return lower, index, threshold
    values, at = lower.topk(keep + 1, dim=1, largest=False, sorted=True)
    threshold = torch.minimum(threshold, values[:, keep])
    return values[:, :keep], index.gather(1, at[:, :keep]), threshold


class _Rows(NamedTuple):
    """Rows centred and rounded for the GEMM, with what the bound needs (:func:`_round_centred`)."""

    rounded: Tensor
    """[b, d] the GEMM's input: fp32 (TF32-exact for 'tf32'), or bf16."""
    norm2: Tensor
    """[b] fp32 squared norms of the rounded rows: the expansion's terms."""
    norm: Tensor
    """[b] float64 upper bounds on the norms of the rounded rows."""
    resid: Tensor
    """[b] float64 upper bounds on ||(x - centre) - rounded||."""


def _round_centred(x: Tensor, centre: Tensor, precision: str) -> _Rows:
    """Centre rows x [b, d] on ``centre`` (fp32 [d]) in fp32 and round them for the GEMM (:class:`_Rows`).

    The residual bound is measured, not assumed: fp32 centring errs by at most ``u/(1 - u) |x - centre|`` per
    entry, and ``||x - centre||`` is at most the rounded row's norm plus the rounding residual; rounding the
    centred rows to the GEMM's precision leaves a residual that fp32 subtracts exactly (it keeps only the dropped
    low bits), whose fp32 norm is inflated by its worst-case summation error; a float64 input's own rounding to
    fp32 is measured in float64. The squared norms come from :func:`_sq_norms`, whose error is that of
    ``NORM_CHUNK`` terms, not of ``d``.
    """
    d = x.shape[1]
    x32 = x.float()
    centred = x32 - centre
    rounded = centred if precision == "fp32" else _round(centred, precision)
    wide = rounded if rounded.dtype == torch.float32 else rounded.float()
    norm2 = _sq_norms(wide)
    norm = norm2.mul(_norm_growth(min(d, NORM_CHUNK))).sqrt_()
    centring = FP32_UNIT / (1 - FP32_UNIT)
    if precision == "fp32":
        resid = norm * centring
    else:
        rounding = torch.linalg.vector_norm(centred - wide, dim=1).double().mul_(_norm_growth(d))
        resid = rounding.mul(1 + centring).add_(norm, alpha=centring)
    if x.dtype == torch.float64:
        resid = resid + (x - x32.double()).norm(dim=1) * (1 + 4 * d * FP64_UNIT)
    return _Rows(rounded, norm2.float(), norm, resid)


def _sq_norms(x: Tensor) -> Tensor:
    """Squared row norms [b] in float64 of fp32 rows x [b, d]: fp32 norms of chunks of ``NORM_CHUNK`` entries,
    summed in float64. Relative error below ``gamma_(NORM_CHUNK + 6)``, at the cost of an fp32 norm (a float64
    copy of the rows costs 10-20 times more on a CPU)."""
    rows, d = x.shape
    chunk = min(d, NORM_CHUNK)
    if d % chunk:
        x = F.pad(x, (0, chunk - d % chunk))
    return torch.linalg.vector_norm(x.view(rows, -1, chunk), dim=-1).double().square().sum(1)


def _norm_growth(d: int) -> float:
    """``1 + gamma_(d+6)``: a computed fp32 norm of a d-vector, or its square, times this bounds the exact one
    (d roundings in the sum of squares, the square root, the squaring, with room to spare)."""
    gamma = (d + 6) * FP32_UNIT
    return 1 + gamma / (1 - gamma)


def _round(x: Tensor, precision: str) -> Tensor:
    """float64 -> values exactly representable in ``precision`` (fp32 tensor, or bf16 for 'bf16')."""
    x32 = x.float()
    if precision == "fp32":
        return x32
    if precision == "bf16":
        return x32.bfloat16()
    # TF32 keeps 10 mantissa bits: round the fp32 bit pattern, so that tensor cores see exact inputs.
    return ((x32.view(torch.int32) + 0x1000) & -0x2000).view(torch.float32)


def _approx_sq_dist(q: _Rows, k: _Rows) -> Tensor:
    """fp32 ``||q||^2 - 2 q.k + ||k||^2`` [m, n] from rounded rows (one GEMM, fp32 accumulation)."""
    if q.rounded.dtype == torch.bfloat16 and q.rounded.is_cuda:
        try:  # bf16 tensor cores with fp32 accumulation and output
            approx = k.norm2[None, :] - 2.0 * torch.mm(q.rounded, k.rounded.T, out_dtype=torch.float32)
            return approx.add_(q.norm2[:, None])
        except torch.cuda.OutOfMemoryError:
            raise  # the fp32 path below needs more memory, not less
        except (TypeError, NotImplementedError, RuntimeError):
            pass  # older torch: bf16 values are exact in TF32, so the fp32 path below is just as exact
    approx = torch.addmm(k.norm2[None, :], q.rounded.float(), k.rounded.float().T, alpha=-2.0)
    return approx.add_(q.norm2[:, None])


def _lower_bound(approx: Tensor, q_norm: Tensor, q_resid: Tensor, k_norm_max: Tensor, k_resid_max: Tensor,
                 d: int, tensor_cores: bool = False) -> Tensor:
    """Rigorous lower bound [m, t] on the float64 re-rank distance of every key of a block whose approximate
    distance (:func:`_approx_sq_dist`) is ``approx`` [m, t]; it never decreases as ``approx`` grows.

    ``q_norm`` [m] and ``q_resid`` [m] bound each query's rounded norm and residual, ``k_norm_max`` and
    ``k_resid_max`` (0-dim) the block's largest (:class:`_Rows`). Two steps, with ``a = q_norm``, ``b = k_norm_max``:

    * **GEMM error.** The dot product accumulates ``d`` products in fp32, so it errs by at most
      ``gamma a b`` (Cauchy-Schwarz), with ``gamma = 2 (d + 4) u`` (2u per addition in case the hardware
      truncates), times :data:`TENSOR_CORE_SAFETY` for a ``tensor_cores`` pass (tf32/bf16); it enters twice.
      The squared norms err by ``g (a^2 + b^2)`` with ``g = gamma_(NORM_CHUNK + 6)`` (:func:`_sq_norms`), their
      fp32 copies and the two fp32 additions by less than ``4 u (a + b)^2``; taking ``8 u`` leaves room for the
      float64 arithmetic of this bound. So ``||q_hat - k_hat||^2 >= approx - e`` with
      ``e = 2 gamma a b + (g + 8 u) (a + b)^2``.
    * **Rounding of the rows.** With ``r = q_resid + k_resid_max``, the triangle inequality gives
      ``||q - k|| >= ||q_hat - k_hat|| - r``.

    Hence ``exact >= max(0, sqrt(approx - e) - r)^2``, shrunk by ``8 (d + 4)`` float64 units for the
    re-rank's own summation. The rounding term is ``2 r ||q - k||`` rather than ``2 r (a + b)``: on close
    pairs it is much smaller than a bound in terms of the norms alone.
    """
    gamma = 2 * (d + 4) * FP32_UNIT * (TENSOR_CORE_SAFETY if tensor_cores else 1)
    gamma = gamma / (1 - gamma)
    a, b = q_norm.double()[:, None], k_norm_max.double()  # b in float64 too: 2 gamma b in fp32 would round
    gemm_error = a * (2 * gamma * b) + (a + b).square_() * (_norm_growth(min(d, NORM_CHUNK)) - 1 + 8 * FP32_UNIT)
    r = (q_resid.double()[:, None] + k_resid_max).mul_(1 + 4 * FP64_UNIT)
    # (1 - 4u) and (1 + 4u) keep each float64 rounding below on the safe side.
    near = torch.sub(approx.double(), gemm_error).clamp_(min=0).sqrt_().mul_(1 - 4 * FP64_UNIT).sub_(r).clamp_(min=0)
    return near.square_().mul_(1 - 8 * (d + 4) * FP64_UNIT)


def _rerank(queries: Tensor, keys: Tensor, candidates: Tensor, lower: Tensor) -> tuple[Tensor, Tensor, int]:
    """Exact float64 ``||q - k||^2`` over candidates [m, k] with lower bounds [m, k]: (best sq_dist [m], lowest
    best index [m], number of pairs computed).

    The first candidate of every query is re-ranked; of the rest, only those whose lower bound does not exceed
    that distance can still win or tie, and only they are re-ranked. With a tight bound that is about one more
    row per query instead of ``k - 1``: the float64 rows, not the GEMM's candidates, are what this step costs.
    """
    first = _pair_sq_dist(queries, keys, None, candidates[:, 0])
    # Skip only where the bound says so: a NaN bound (fp32 overflow) never rules a candidate out.
    rows, cols = (~(lower[:, 1:] > first[:, None])).nonzero(as_tuple=True)
    if len(rows) == 0:  # every other candidate is strictly farther: the first one wins outright
        return first, candidates[:, 0].contiguous(), len(candidates)
    exact = torch.full(candidates.shape, math.inf, dtype=torch.float64, device=queries.device)
    exact[:, 0] = first
    cols = cols + 1
    exact[rows, cols] = _pair_sq_dist(queries, keys, rows, candidates[rows, cols])
    return *_lowest_index_min(exact, candidates), len(candidates) + len(rows)


def _pair_sq_dist(queries: Tensor, keys: Tensor, query_rows: Tensor | None, key_rows: Tensor) -> Tensor:
    """float64 ``||queries[i] - keys[j]||^2`` [P] for the pairs (query_rows [P], key_rows [P]); ``query_rows=None``
    pairs query ``p`` with ``keys[key_rows[p]]``. Blocks of pairs keep the float64 rows within budget."""
    d = queries.shape[1]
    dist = torch.empty(len(key_rows), dtype=torch.float64, device=queries.device)
    budget = RERANK_BYTES_CPU if queries.device.type == "cpu" else BLOCK_BYTES
    step = max(1, budget // (8 * d))
    for start in range(0, len(key_rows), step):
        pairs = slice(start, start + step)
        near = queries[pairs] if query_rows is None else queries[query_rows[pairs]]
        # k - q with one float64 operand: fp32 keys are widened inside the subtraction (exact, no float64
        # copy of them), and the squares equal those of q - k bit for bit.
        dist[pairs] = torch.sub(keys[key_rows[pairs]], near.double()).square_().sum(1)
    return dist


def _lowest_index_min(dist: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """Row minima of dist [m, k] and, among equal minima, the lowest of the matching index [m, k]."""
    best = dist.min(1).values
    lowest = torch.where(dist == best[:, None], index, torch.iinfo(torch.int64).max).min(1).values
    return best, lowest


def _brute_force(queries: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
    """float64 ``||q - k||^2`` against every key (the reference answer; used only where no pass proved one)."""
    return _match_by_pairs(queries, keys, _squared_l2_float64, None)


def _squared_l2_float64(a: Tensor, b: Tensor) -> Tensor:
    """Per-pair squared L2 [B] computed in float64 (the brute-force reference arithmetic)."""
    return squared_l2(a.double(), b.double())


def _keep_nearer(best: Tensor, best_at: Tensor, dist: Tensor, at: Tensor) -> tuple[Tensor, Tensor]:
    """Fold one block of keys into a running nearest (dist, index); blocks come in index order, so
    strict < keeps the earlier, lower index on ties, as one search over all keys would."""
    better = dist < best
    return torch.where(better, dist, best), torch.where(better, at, best_at)


# ======================================================================================
# Distances, matching and the smoothed likelihood
# ======================================================================================


def squared_l2(a: Tensor, b: Tensor) -> Tensor:
    """Per-pair squared L2 distance: a, b [B, ...] -> [B] (summed over all non-batch dimensions)."""
    return (a - b).flatten(1).pow(2).sum(1)


def l1_distance(a: Tensor, b: Tensor) -> Tensor:
    """Per-pair L1 distance: a, b [B, ...] -> [B] (summed over all non-batch dimensions)."""
    return (a - b).flatten(1).abs().sum(1)


class LaplacianPyramidL1(nn.Module):
    """GLO's Lap1 per pair: x, y [B, C, H, W] -> [B], ``sum_j 2^(e j) ||L^j(x) - L^j(y)||_1`` with e = +2.

    ``L^0 .. L^(J-2)`` are band-pass levels ``G^j - up(G^(j+1))`` and ``L^(J-1) = G^(J-1)`` the
    low-pass residual, where ``G^0 = x`` and ``G^(j+1)`` is ``G^j`` blurred by the 5x5 kernel
    ``[1, 4, 6, 4, 1] / 16`` (outer product, replicate padding) and subsampled 2x; ``up`` is
    bilinear. ``j = 0`` is the finest level and ``||.||_1`` sums over channels and pixels.

    The exponent. GLO (Bojanowski et al., 2018) weights the levels by a power of 2, and
    reimplementations disagree on its sign (we could not check the paper offline). Level ``j`` has
    about ``4^(-j)`` as many entries as the image, so ``2^(+2j)`` on sums counts every level like its
    mean over the image's area: a constant shift ``c``, which only the low-pass residual sees, costs
    ``2^(2(J-1)) |c| C h w`` (``h x w`` the coarsest size), about ``|c| C H W`` as under pixel L1.
    With ``2^(-2j)`` (genlib's default until November 2026) the same shift costs ``16^(J-1)`` times
    less, 1/3136 of pixel L1 at 28 x 28, and GLO trained with it leaves the data's black backgrounds
    grey (chapter 1 measures it). ``level_exponent`` switches the convention.

    The pyramid is linear, so ``L^j(x) - L^j(y) = L^j(x - y)``: it is built once, on the
    difference, which also makes the loss exactly symmetric.
    """

    def __init__(self, levels: int | None = None, level_exponent: float = 2.0):
        super().__init__()
        if levels is not None and levels < 1:
            raise ValueError(f"levels must be >= 1 or None, got {levels}")
        self.levels, self.level_exponent = levels, level_exponent
        taps = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
        self.register_buffer("kernel", torch.outer(taps, taps)[None, None], persistent=False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape != y.shape or x.ndim != 4:
            raise ValueError(f"x and y must be [B, C, H, W] of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        bands = self.pyramid(x - y)
        return sum(2.0 ** (self.level_exponent * j) * band.abs().flatten(1).sum(1) for j, band in enumerate(bands))

    def pyramid(self, x: Tensor) -> list[Tensor]:
        """Laplacian pyramid of x [B, C, H, W]: band-pass levels, finest first, then the low-pass residual."""
        levels = self.levels or default_pyramid_levels(min(x.shape[-2:]))
        bands, current = [], x
        for _ in range(levels - 1):
            smaller = self._blur(current)[..., ::2, ::2]
            up = F.interpolate(smaller, size=current.shape[-2:], mode="bilinear", align_corners=False)
            bands.append(current - up)
            current = smaller
        return bands + [current]

    def _blur(self, x: Tensor) -> Tensor:
        """Depthwise 5x5 Gaussian blur; replicate padding keeps constants constant (no dark border)."""
        channels = x.shape[1]
        kernel = self.kernel.to(device=x.device, dtype=x.dtype).expand(channels, 1, 5, 5)
        return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), kernel, groups=channels)


def default_pyramid_levels(side: int) -> int:
    """Levels such that the coarsest side stays >= 4, at most 5 (64 -> 5, 28 -> 4, 8 -> 2)."""
    levels = 1
    while levels < 5 and math.ceil(side / 2**levels) >= 4:
        levels += 1
    return levels


class PixelFeatureL1(nn.Module):
    """GLANN's kind of loss per pair: ``||x - y||_1 + feature_weight * ||f(x) - f(y)||_1``; x, y [B, ...] -> [B]
    (with ``pixel_mean``, the pixel term is the mean absolute difference instead of the sum).

    ``features`` maps images to [B, D] (GLANN used VGG16 layers; here any callable, e.g. from
    ``genlib.features``); it is stored outside the module tree so that ``train()`` never flips
    a pretrained network out of eval mode and its weights stay out of checkpoints.
    """

    def __init__(self, features: Features, feature_weight: float = 1.0, pixel_mean: bool = False):
        super().__init__()
        object.__setattr__(self, "features", features)
        self.feature_weight, self.pixel_mean = feature_weight, pixel_mean

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        pixels = l1_distance(x, y) / (x[0].numel() if self.pixel_mean else 1)
        return pixels + self.feature_weight * l1_distance(self.features(x), self.features(y))


def _check_fits(nbytes: int, device: torch.device, what: str) -> None:
    """On CUDA, a clear error when ``nbytes`` of ``what`` would not fit in the device's free memory (free on the
    device, plus what PyTorch's allocator holds in reserve unused, e.g. after a block of VGG16 features)."""
    if device.type == "cuda":
        free = (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
                - torch.cuda.memory_allocated(device))
        if nbytes > free:
            raise MemoryError(f"{what} would take {nbytes / 2**30:.1f} GiB, and {device} has {free / 2**30:.1f} GiB "
                              "free: match in a smaller feature space, or every batch (refresh_every=1)")


def vgg16_feature_map() -> Features:
    """:func:`genlib.features.vgg16_perceptual`, after checking that its weights exist (a clear error when a
    model is built, not at its first step)."""
    features.vgg16_weights_path()
    return features.vgg16_perceptual


def pair_loss(spec: str | PairLoss) -> PairLoss:
    """A per-pair loss by name (``'l2'`` squared L2, ``'l1'``, ``'lap1'``, ``'vgg16'``: a GLANN-style perceptual
    loss, the mean absolute pixel difference plus the L1 between VGG16's relu1_2 to relu4_3 features, each layer
    averaged (:meth:`genlib.features.VGG16Features.perceptual`; GLANN's code averages other VGG16 layers), which
    needs ``$GENLIB_VGG16_WEIGHTS``) or the callable itself."""
    if callable(spec):
        return spec
    named = {"l2": lambda: squared_l2, "l1": lambda: l1_distance, "lap1": LaplacianPyramidL1,
             "vgg16": lambda: PixelFeatureL1(vgg16_feature_map(), pixel_mean=True)}
    if spec not in named:
        raise ValueError(f"loss must be one of {', '.join(map(repr, named))} or a callable "
                         f"(a [B, ...], b [B, ...]) -> [B]; got {spec!r}")
    return named[spec]()


def match(queries: Tensor, keys: Tensor, distance: PairLoss | None = None,
          chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Nearest key for each query: queries [M, ...], keys [N, ...] -> (distance [M], index [M]).

    With ``distance=None`` rows are flattened and searched exactly in squared L2 by
    :func:`nearest_neighbors` (one GEMM). A callable per-pair ``distance`` is instead evaluated
    on all M x N pairs (blocks of pairs, lowest index on ties): the expensive route that
    :func:`pairwise_cost_count` counts.
    """
    if distance is None:
        return nearest_neighbors(queries.flatten(1), keys.flatten(1), chunk_size)
    return _match_by_pairs(queries, keys, distance, chunk_size)


@torch.no_grad()
def _match_by_pairs(queries: Tensor, keys: Tensor, distance: PairLoss, chunk_size: int | None) -> tuple[Tensor, Tensor]:
    """Brute-force nearest key under a per-pair ``distance``, evaluated on blocks of (query, key) pairs."""
    if len(keys) == 0:
        raise ValueError("keys must hold at least one row")
    per_row = max(1, queries[0].numel() if len(queries) else 1)
    k_block = min(len(keys), chunk_size or len(keys), max(1, 2**22 // per_row))
    q_block = max(1, min(chunk_size or len(queries) or 1, 2**22 // (per_row * k_block)))
    dist = torch.full((len(queries),), math.inf, dtype=torch.float64, device=queries.device)
    index = torch.zeros(len(queries), dtype=torch.int64, device=queries.device)
    for q0 in range(0, len(queries), q_block):
        rows, q = slice(q0, q0 + q_block), queries[q0:q0 + q_block]
        for k0 in range(0, len(keys), k_block):
            k = keys[k0:k0 + k_block]
            values = distance(q.repeat_interleave(len(k), 0), k.repeat(len(q), *[1] * (k.ndim - 1)))
            values = values.double().view(len(q), len(k))
            # argmin returns the first of equal minima: the lowest index within the block
            dist[rows], index[rows] = _keep_nearer(dist[rows], index[rows], values.min(1).values, values.argmin(1) + k0)
    return dist, index


def pairwise_cost_count(n_real: int, n_fake: int, feature_flops: float, feature_dim: int) -> dict[str, float]:
    """Cost of one IMLE matching round under a perceptual distance, counted two ways.

    * ``pairwise``: the distance as a black box on pairs, as the source counts it (a batch of 64
      against 64 fakes is 64^2 = 4096 perceptual losses): ``n_real * n_fake`` evaluations, each
      running the feature network on both images (``2 n_real n_fake`` network runs).
    * ``cached``: a distance between per-image features (VGG/EfficientNet activations, even Gram
      matrices) lets each image be embedded once (``n_real + n_fake`` runs); matching then takes
      ``2 n_real n_fake feature_dim`` flops: one GEMM for squared L2 between features
      (``IMLE(match_features=...)``), about as many operations, but not a GEMM, for L1 between features.

    Honest caveat: caching removes the quadratic network cost, but IMLE still needs many more
    fakes than reals (10x in the reference code), each embedded at every re-match; that, and
    the memory of the fake pool, is what stays expensive.
    """
    pairs = n_real * n_fake
    pairwise = 2.0 * pairs * feature_flops
    cached = (n_real + n_fake) * feature_flops + 2.0 * pairs * feature_dim
    return {"pairs": pairs, "network_runs_pairwise": 2 * pairs, "network_runs_cached": n_real + n_fake,
            "flops_pairwise": pairwise, "flops_cached": cached, "speedup": pairwise / cached}


def pairwise_sq_dist(a: Tensor, b: Tensor) -> Tensor:
    """All squared L2 distances [M, N] between small sets a [M, ...], b [N, ...] (float64, direct, differentiable)."""
    a64, b64 = a.flatten(1).double(), b.flatten(1).double()
    return (a64[:, None, :] - b64[None, :, :]).pow(2).sum(-1)


def soft_assignment(reals: Tensor, fakes: Tensor, sigma: float) -> Tensor:
    """Posterior responsibility [M, N] of fake j for real i: softmax_j(-||x_i - G(z_j)||^2 / 2 sigma^2)."""
    check_positive("sigma", sigma)
    return torch.softmax(-pairwise_sq_dist(reals, fakes) / (2 * sigma**2), dim=1)


def smoothed_nll(reals: Tensor, fakes: Tensor, sigma: float) -> Tensor:
    """Source eq. (7): ``-mean_i logsumexp_j(-||x_i - G(z_j)||^2 / 2 sigma^2)`` (scalar, float64).

    The negative log-likelihood of reals under the Gaussian-smoothed model
    ``q_sigma(x) = mean_j N(x; G(z_j), sigma^2 I)`` with two constants dropped: the
    normaliser ``(d/2) log(2 pi sigma^2)`` and the ``+log N`` of the mean over fakes.
    Because ``max <= logsumexp <= max + log N``, each real's term obeys
    ``m_i - sigma^2 log N <= sigma^2 nll_i <= m_i`` with ``m_i = min_j ||x_i - G(z_j)||^2 / 2``,
    so ``sigma^2 * smoothed_nll -> mean_i m_i`` as sigma -> 0: the IMLE loss (halved). The full
    negative log-likelihood, this plus the two constants, goes to +inf as sigma -> 0 unless every
    ``m_i`` is 0: ``1/sigma^2`` growth beats the normaliser's ``log sigma``. ``sigma`` must be > 0.
    """
    check_positive("sigma", sigma)
    return -torch.logsumexp(-pairwise_sq_dist(reals, fakes) / (2 * sigma**2), dim=1).mean()


# ======================================================================================
# IMLE
# ======================================================================================


class _FromNoise(GenerativeModel):
    """Shared by IMLE and IMLEKL: a generator z [n, z_dim] -> x [n, ...] fed with z ~ N(0, I), one Adam."""

    def __init__(self, generator: nn.Module, z_dim: int, lr: float, betas: tuple[float, float]):
        super().__init__()
        if z_dim < 1:
            raise ValueError(f"z_dim must be >= 1, got {z_dim}")
        self.generator, self.z_dim = generator, z_dim
        self.optimizers = {"generator": torch.optim.Adam(generator.parameters(), lr=lr, betas=betas)}

    def ema_source(self) -> nn.Module:
        return self.generator

    def noise(self, n: int) -> Tensor:
        """n codes [n, z_dim] from N(0, I) on the model's device."""
        return torch.randn(n, self.z_dim, device=self.device)

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """n samples [n, ...] = G(z), z ~ N(0, I)."""
        return self.sampling_net()(self.noise(n))


class IMLE(_FromNoise):
    """Implicit maximum likelihood: pull, for every real, its nearest generated sample towards it.

    ``generator`` is any module z [n, z_dim] -> x [n, ...]. Each step, for a real batch x [B, ...]:

    * ``refresh_every == 1`` (the source's per-batch version): draw ``fakes_per_real * B``
      codes, generate without gradients, match every real to its nearest fake, regenerate the
      matched codes (plus ``z_jitter`` N(0, I)) with gradients and minimise the mean distance.
    * ``refresh_every > 1`` (the reference code's version): every ``refresh_every`` steps,
      :meth:`refresh` matches every item of ``data`` [n, ...] (on the model's device) to its
      nearest of ``fakes_per_real * n`` fresh fakes; steps in between reuse the cached code of
      each real (found through the batch's ``index``), jittered.

    Defaults follow the reference (Li & Malik): 10 fakes per real, jitter 0.01, Adam 1e-3 with
    betas (0.5, 0.999). ``step`` returns the mean training distance ``'loss'`` and the mean
    distance of the matches it used, ``'match_dist'`` (before jitter; cached ones may be stale).
    ``distance``: ``'l2'`` (squared L2, matched exactly by :func:`nearest_neighbors`), ``'vgg16'`` (squared L2
    between VGG16 perceptual features: ``'l2'`` with ``match_features`` = :func:`vgg16_feature_map`) or a
    per-pair loss (name or callable, e.g. ``'lap1'``). ``match_features``: a feature map; matching then
    uses squared L2 between features (M + N feature extractions instead of M x N pair
    evaluations) and ``'l2'`` means squared L2 in feature space. A callable ``distance``
    without ``match_features`` is matched by brute force over all pairs (slow, exact).
    With ``refresh_every > 1`` and ``match_features``, a refresh holds the features of the whole dataset;
    on CUDA a refresh that would not fit in free memory stops with an error saying so.

    The generator should treat each code on its own: with BatchNorm in training mode a sample depends on the
    rest of its batch, so the fake regenerated for training is not the fake that was matched (use
    ``ConvGenerator(norm='layer')`` or ``MLP(norm='layer')``); such a generator is accepted with a warning.
    """

    def __init__(self, generator: nn.Module, z_dim: int, *, fakes_per_real: int = 10, refresh_every: int = 1,
                 data: Tensor | None = None, z_jitter: float = 0.01, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.5, 0.999), distance: str | PairLoss = "l2",
                 match_features: Features | None = None, chunk_size: int | None = None, refresh_batch: int = 4096):
        super().__init__(generator, z_dim, lr, betas)
        _warn_if_batch_dependent(generator)
        if fakes_per_real < 1 or refresh_every < 1 or refresh_batch < 1:
            raise ValueError("fakes_per_real, refresh_every and refresh_batch must be >= 1")
        if refresh_every > 1 and (data is None or not data.is_floating_point()):
            raise ValueError("refresh_every > 1 needs the whole dataset as a float tensor: data=[n, ...]")
        self.fakes_per_real, self.refresh_every, self.z_jitter = fakes_per_real, refresh_every, z_jitter
        self.chunk_size, self.refresh_batch = chunk_size, refresh_batch
        if distance == "vgg16":
            distance, match_features = "l2", vgg16_feature_map()
        self.pair_loss = None if distance == "l2" else pair_loss(distance)
        # A plain attribute: a pretrained feature net must not follow train()/eval() or enter checkpoints.
        object.__setattr__(self, "match_features", match_features)
        device = next(generator.parameters()).device  # buffers start where the generator lives
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.int64, device=device))
        mirror_step_count(self, "steps_done", "_steps_done")  # when to refresh, without a device sync per step
        self.data = data  # not a buffer: it would copy the dataset into every checkpoint
        if data is not None:
            self.register_buffer("matched_z", torch.zeros(len(data), z_dim, device=device))
            self.register_buffer("matched_dist", torch.full((len(data),), math.inf, dtype=torch.float64, device=device))

    def step(self, x: Tensor, index: Tensor) -> dict[str, Tensor]:
        """One IMLE step on reals x [B, ...] with dataset indices [B]: {'loss', 'match_dist'}."""
        codes, match_dist = self._matched_codes(x, index)
        fake = self.generator(codes + self.z_jitter * torch.randn_like(codes))
        loss = self._loss(fake, x).mean()
        self.update("generator", loss)
        count_step(self, "steps_done", "_steps_done")
        return {"loss": loss.detach(), "match_dist": match_dist.float()}

    @torch.no_grad()
    def _matched_codes(self, x: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """The code matched to each real [B, z_dim] and the batch's mean matching distance."""
        if self.refresh_every > 1:
            if self._steps_done % self.refresh_every == 0:
                self.refresh()
            return self.matched_z[index], self.matched_dist[index].mean()
        codes = self.noise(self.fakes_per_real * len(x))
        dist, at = self._match(self._embed(x), self._embed(self.generator(codes)))
        return codes[at], dist.mean()

    @torch.no_grad()
    def refresh(self, codes: Tensor | None = None) -> None:
        """Match every data item to its nearest of ``codes`` [K, z_dim] (default ``fakes_per_real * n``
        fresh N(0, I) codes), generated in chunks of ``refresh_batch`` so memory stays bounded."""
        if self.data is None:
            raise ValueError("refresh() matches the whole dataset: construct IMLE with data=[n, ...]")
        data = self._data_on_device()
        if codes is None:
            codes = self.noise(self.fakes_per_real * len(data))
        step = self.refresh_batch
        reals = data
        if self.match_features is not None:  # the features of the whole dataset, filled in place (no 2x peak)
            first = self._embed(data[:step])
            _check_fits(first.element_size() * math.prod(first.shape[1:]) * len(data), data.device,
                        "the features of the whole dataset")
            reals = first.new_empty((len(data), *first.shape[1:]))
            reals[:len(first)] = first
            for i in range(step, len(data), step):
                reals[i:i + step] = self._embed(data[i:i + step])
        best = torch.full((len(data),), math.inf, dtype=torch.float64, device=data.device)
        best_at = torch.zeros(len(data), dtype=torch.int64, device=data.device)
        for start in range(0, len(codes), step):
            dist, at = self._match(reals, self._embed(self.generator(codes[start:start + step])))
            best, best_at = _keep_nearer(best, best_at, dist, at + start)
        self.matched_z.copy_(codes[best_at])
        self.matched_dist.copy_(best)

    def _data_on_device(self) -> Tensor:
        """The dataset, moved once to the model's device."""
        if self.data.device != self.device:
            self.data = self.data.to(self.device)
        return self.data

    def _embed(self, x: Tensor) -> Tensor:
        """What matching compares: features of x if ``match_features`` is set, else x itself."""
        return x if self.match_features is None else self.match_features(x).flatten(1)

    def _match(self, reals: Tensor, fakes: Tensor) -> tuple[Tensor, Tensor]:
        """Nearest fake for each real, in the matching space (see the class docstring)."""
        by_pairs = self.pair_loss is not None and self.match_features is None
        return match(reals, fakes, self.pair_loss if by_pairs else None, self.chunk_size)

    def _loss(self, fake: Tensor, real: Tensor) -> Tensor:
        """Per-pair training loss [B] between matched fakes and reals."""
        if self.pair_loss is None:
            return squared_l2(self._embed(fake), self._embed(real))
        return self.pair_loss(fake, real)


def _warn_if_batch_dependent(generator: nn.Module) -> None:
    """Warn when ``generator`` holds BatchNorm layers, whose training-mode output for one code depends on the
    other codes of its batch."""
    batch_norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    if any(isinstance(layer, batch_norms) for layer in generator.modules()):
        warnings.warn("IMLE's generator has BatchNorm: in training mode a sample depends on the rest of its batch, "
                      "so the fake trained on is not exactly the fake that was matched; a per-sample "
                      "normalisation (norm='layer') avoids this", UserWarning, stacklevel=3)


# ======================================================================================
# The KL(q || p) variant
# ======================================================================================


def kl_variant_terms(fakes_a: Tensor, fakes_b: Tensor, reals: Tensor) -> tuple[Tensor, Tensor]:
    """(attract [N], repel [N]): each fake's squared distance to its nearest real and to its nearest
    fake of the other batch. Gradients flow into ``fakes_a`` only (see :func:`kl_variant_loss`)."""
    _, to_real = match(fakes_a.detach(), reals)
    _, to_fake = match(fakes_a.detach(), fakes_b.detach())
    return squared_l2(fakes_a, reals[to_real]), squared_l2(fakes_a, fakes_b.detach()[to_fake])


def kl_variant_loss(fakes_a: Tensor, fakes_b: Tensor, reals: Tensor, margin: float | None, sign: int = 1) -> Tensor:
    """IMLE for KL(q||p): ``sign * mean_i [min_j ||a_i - x_j||^2 + relu(margin - min_k ||a_i - b_k||^2)]``.

    Derivation (source eqs. (9)-(11)). ``KL(q||p) = E_{x~q}[log q(x) - log p(x)]``. Estimate
    both densities with Gaussian kernels of width sigma, p on the reals x_j and q on a second,
    independent fake batch b_k (in the same batch the nearest fake is the fake itself, at
    distance 0). As sigma -> 0, ``log p(a_i) ~ -min_j ||a_i - x_j||^2 / 2 sigma^2`` and
    ``log q(a_i) ~ -min_k ||a_i - b_k||^2 / 2 sigma^2`` (equal normalising constants cancel), so
    ``2 sigma^2 KL -> mean_i [min_j ||a_i - x_j||^2 - min_k ||a_i - b_k||^2]``: attraction of
    each fake to its nearest real (the -log p term) and repulsion from its nearest other fake
    (the +log q term, i.e. -entropy). Minimising it decreases KL with ``sign = +1``. The source
    prints this with a leading minus; minimising that pushes fakes away from data and pulls each
    towards its nearest other fake (``sign = -1`` shows it). While the hinge is active the printed
    per-fake loss is ``-||a - x||^2 + ||a - b||^2 - margin = 2 a.(x - b) + const``, linear in ``a``:
    it has no minimum, and the fakes drift off the data. The margin replaces the unbounded
    ``-repel`` by ``relu(margin - repel)``: the same push while fakes are closer than
    ``sqrt(margin)``, none beyond, so repulsion cannot blow up; ``margin=None`` keeps the raw ``-repel``.

    Only ``fakes_a`` carries gradients: the score-function part of ``d/dtheta E_q[log q_theta]``
    has zero mean, so the pathwise gradient through the evaluated point is the estimator.
    """
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign}")
    return sign * _kl_per_fake(*kl_variant_terms(fakes_a, fakes_b, reals), margin).mean()


LOG_REPULSION_EPS = 1e-4
"""Added to the squared distance inside the log repulsion, so that coinciding fakes give a finite loss."""


def _kl_per_fake(attract: Tensor, repel: Tensor, margin: float | None, log_weight: float | None = None) -> Tensor:
    """Per-fake KL-variant loss [N]: attraction plus the hinged (or, with no margin, raw) repulsion; with
    ``log_weight`` w instead the entropy-style ``-w log(eps + repel)``, whose push grows as fakes meet."""
    if log_weight is not None:
        return attract - log_weight * torch.log(LOG_REPULSION_EPS + repel)
    return attract + (-repel if margin is None else F.relu(margin - repel))


class IMLEKL(_FromNoise):
    """The KL(q||p) variant of IMLE (:func:`kl_variant_loss`): each step draws two fake batches,
    ``n_fakes`` with gradients and ``n_other`` without (default: the real batch size each).

    Measured on ring8 (tanh MLP 2-32-32-32-2, Adam 1e-2, 500 steps, margins 1e-4 to 1): it
    collapses onto one or two modes with sharp samples, as reverse KL tends to. The repulsion
    cannot undo a collapse: the gradient of ``relu(m - ||a - b||^2)`` with respect to ``a`` is
    ``-2 (a - b)`` where the hinge is active (``||a - b||^2 < m``) and 0 beyond, so the push
    (minus the gradient, ``2 (a - b)``) vanishes as fakes coincide (the sigma -> 0 limit trades
    the log nearest-neighbour distance of entropy estimators, whose push grows as fakes meet,
    for a squared distance). ``log_repulsion`` w > 0 puts that log back: the repulsion becomes
    ``-w log(eps + min_k ||a - b_k||^2)`` (:data:`LOG_REPULSION_EPS`) and ``margin`` is not used.
    """

    def __init__(self, generator: nn.Module, z_dim: int, *, margin: float | None = 0.01, n_fakes: int | None = None,
                 n_other: int | None = None, lr: float = 1e-3, betas: tuple[float, float] = (0.5, 0.999),
                 log_repulsion: float | None = None):
        super().__init__(generator, z_dim, lr, betas)
        if log_repulsion is not None and not log_repulsion > 0:
            raise ValueError(f"log_repulsion must be a weight > 0 (or None), got {log_repulsion}")
        self.margin, self.n_fakes, self.n_other = margin, n_fakes, n_other
        self.log_repulsion = log_repulsion

    def step(self, x: Tensor, index: Tensor) -> dict[str, Tensor]:
        """One step on reals x [B, ...]: {'loss', 'attract', 'repel'} (mean squared distances)."""
        fakes = self.generator(self.noise(self.n_fakes or len(x)))
        with torch.no_grad():
            other = self.generator(self.noise(self.n_other or len(x)))
        attract, repel = kl_variant_terms(fakes, other, x)
        loss = _kl_per_fake(attract, repel, self.margin, self.log_repulsion).mean()
        self.update("generator", loss)
        return {"loss": loss.detach(), "attract": attract.detach().mean(), "repel": repel.detach().mean()}


# ======================================================================================
# GLO and GLANN
# ======================================================================================


def pca_codes(data: Tensor, z_dim: int, block: int = 8192) -> Tensor:
    """GLO's PCA initialisation: data [n, ...] projected on its top z_dim principal axes, on the sphere [n, z_dim].

    Exact: the eigenvectors of the float64 covariance [d, d], accumulated over blocks of ``block`` rows, so
    memory is d^2 doubles beside the data (1.2 GB at CelebA-64's d = 12,288); each axis's sign makes its
    largest-magnitude entry positive. (torch.pca_lowrank is randomised, draws from the global RNG and, with
    q = z_dim, returns axes far from the principal ones where the spectrum is flat: Fashion-MNIST's 23rd to
    32nd, with cosines below 0.3 in absolute value.)"""
    x = data.flatten(1)
    if z_dim > min(x.shape):
        raise ValueError(f"z_dim={z_dim} exceeds min(n, d)={min(x.shape)} for PCA codes")

    def blocks() -> Iterator[Tensor]:  # float64 copies of one block of rows at a time
        return (x[i:i + block].double() for i in range(0, len(x), block))

    mean = sum(part.sum(0) for part in blocks()) / len(x)
    covariance = sum((part - mean).T @ (part - mean) for part in blocks()) / len(x)
    _, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
    axes = vectors[:, -z_dim:].flip(1)  # [d, z_dim], the largest first
    axes = axes * axes.gather(0, axes.abs().argmax(0, keepdim=True)).sign()
    return torch.cat([F.normalize(((part - mean) @ axes).float(), dim=1) for part in blocks()])


class LazyAdam(torch.optim.Optimizer):
    """Adam on the rows of one parameter [n, d] that a step touched: ``step(rows [B], grads [B, d])``, rows distinct.

    The update of ``torch.optim.SparseAdam`` (tests/test_imle.py checks that they agree bit for bit): the moments
    and the values of the other rows stay as they are, and the bias correction counts every step. Written with
    gathers and scatters of fixed shape and its step count on the device, so that, unlike SparseAdam (whose
    sparse gradients are coalesced, a sort of data-dependent length), it can be captured in a CUDA graph.
    """

    def __init__(self, param: Tensor, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        super().__init__([param], {"lr": lr, "betas": tuple(betas), "eps": eps})

    @torch.no_grad()
    def step(self, rows: Tensor, grads: Tensor) -> None:  # type: ignore[override]
        group = self.param_groups[0]
        param = group["params"][0]
        state = self.state[param]
        if not state:  # float64: the same bias corrections as SparseAdam's Python arithmetic
            state.update(step=torch.zeros((), dtype=torch.float64, device=param.device),
                         exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))
        beta1, beta2 = group["betas"]
        state["step"] += 1
        old_mean, old_square = state["exp_avg"][rows], state["exp_avg_sq"][rows]
        mean_update = grads.sub(old_mean).mul_(1 - beta1)
        square_update = grads.pow(2).sub_(old_square).mul_(1 - beta2)
        state["exp_avg"][rows] = old_mean + mean_update
        state["exp_avg_sq"][rows] = old_square + square_update
        numer = mean_update.add_(old_mean)
        denom = square_update.add_(old_square).sqrt_().add_(group["eps"])
        step_size = group["lr"] * (1 - beta2 ** state["step"]).sqrt() / (1 - beta1 ** state["step"])
        param[rows] = param[rows] + (-step_size) * numer.div_(denom)


class GLO(GenerativeModel):
    """Generative latent optimisation: one learned code per image, jointly with the generator.

    ``min_{G, z_1..z_n} mean_i loss(G(z_i), x_i)`` s.t. ``||z_i|| = 1`` (source eq. (13)). Codes
    are the rows of an ``nn.Embedding`` [n_data, z_dim] picked by the batch's ``index``, updated by a lazy
    Adam (:class:`LazyAdam`) with their own learning rate (GLANN: code lr 1e-2, generator 1e-3, Adam
    (0.5, 0.999); GLO itself used SGD with a code learning rate much larger than the generator's,
    10:1 in a minimal reimplementation) and put back on the unit sphere after
    every step (GLANN's choice; GLO projects onto the unit ball). Lazy Adam moves only the codes
    of the batch: a dense Adam would keep drifting every other code on stale momentum.
    ``loss``: ``'l2'``, ``'l1'``, ``'lap1'`` or a per-pair callable (e.g. :class:`PixelFeatureL1`).
    :meth:`sample` is GLO's own sampler, a full-covariance Gaussian fitted to the codes.
    """

    def __init__(self, generator: nn.Module, n_data: int, z_dim: int, *, loss: str | PairLoss = "l2",
                 lr: float = 1e-3, code_lr: float = 1e-2, betas: tuple[float, float] = (0.5, 0.999),
                 init_codes: Tensor | None = None):
        super().__init__()
        self.generator, self.z_dim = generator, z_dim
        # the codes start where the generator lives, so that a model built around a GPU generator trains there
        self.codes = nn.Embedding(n_data, z_dim, device=next(generator.parameters()).device)
        with torch.no_grad():
            start = torch.randn(n_data, z_dim) if init_codes is None else init_codes
            if start.shape != (n_data, z_dim):
                raise ValueError(f"init_codes must be [{n_data}, {z_dim}], got {tuple(start.shape)}")
            self.codes.weight.copy_(F.normalize(start.float(), dim=1))
        self.loss_fn = pair_loss(loss)
        self.optimizers = {"generator": torch.optim.Adam(generator.parameters(), lr=lr, betas=betas),
                           "codes": LazyAdam(self.codes.weight, lr=code_lr, betas=betas)}

    graph_safe = True  # LazyAdam, unlike torch's SparseAdam, has static shapes and no host reads

    def ema_source(self) -> nn.Module:
        return self.generator

    def step(self, x: Tensor, index: Tensor) -> dict[str, Tensor]:
        """One joint step on images x [B, ...] with their dataset indices [B] (each at most once): {'loss'} (mean
        per-pair loss)."""
        codes = self.codes.weight[index].detach().requires_grad_(True)  # a leaf: backward fills codes.grad
        loss = self.loss_fn(self.generator(codes), x).mean()
        self.update("generator", loss, leaves=[codes])
        self.optimizers["codes"].step(index, codes.grad)
        with torch.no_grad():
            self.codes.weight[index] = F.normalize(self.codes.weight[index], dim=1)
        return {"loss": loss.detach()}

    def latent_codes(self) -> Tensor:
        """The learned codes [n_data, z_dim] (detached copy)."""
        return self.codes.weight.detach().clone()

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """Images [n, ...] from codes [n, z_dim] with the sampling generator (EMA when kept)."""
        return self.sampling_net()(codes)

    @torch.no_grad()
    def sample_codes(self, n: int) -> Tensor:
        """n new codes [n, z_dim] from a full-covariance Gaussian fitted to the learned codes (GLO's sampler)."""
        codes = self.codes.weight.double()
        cov = torch.cov(codes.T) + 1e-6 * torch.eye(self.z_dim, dtype=torch.float64, device=codes.device)
        noise = torch.randn(n, self.z_dim, dtype=torch.float64, device=codes.device)
        return (codes.mean(0) + noise @ torch.linalg.cholesky(cov).T).float()

    def sample(self, n: int) -> Tensor:
        """n images [n, ...] decoded from :meth:`sample_codes`."""
        return self.decode(self.sample_codes(n))


class UnitSphere(nn.Module):
    """Puts each row of x [B, d] on the unit sphere, where GLO keeps its codes."""

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1)


class GLANN(GenerativeModel):
    """GLANN: GLO, then IMLE in GLO's code space; samples go noise z -> T(z) -> G(T(z)) = x.

    One model, one :func:`genlib.train.fit`, one image sampler for both stages: the first
    ``glo_steps`` steps are GLO steps on the images; every later step is a latent IMLE step of
    the mapper ``T`` (an MLP ``noise_dim -> hidden -> hidden -> z_dim``, per-sample normalisation + ReLU;
    the reference's BatchNorm would make matched and trained outputs differ, see :class:`IMLE`) whose
    data are the learned codes, the batch's codes found through its ``index`` (the images are
    then unused). So either of::

        fit(GLANN(glo, glo_steps=5000), images, 5000 + 2000)              # both stages
        fit(glo, images, 5000); fit(GLANN(glo), images, 2000)             # GLO trained first

    Stage 1 reports ``{'glo_loss'}``, stage 2 the mapper's ``{'loss', 'match_dist'}``; in the
    history, each key's entries belong to the log steps of its own stage. Defaults follow
    GLANN: 2x random codes per data point, exact flat L2 search re-run every ``refresh_every``
    mapper steps (the reference re-matches about once an epoch; 50 steps is about 3 epochs of 1,000 codes in
    batches of 64 and 1/19 of one of 60,000), Adam 1e-3 (0.5, 0.999). With ``sphere`` the mapper ends in
    :class:`UnitSphere`: its outputs, matched and trained as they are sampled, lie on GLO's sphere (the paper's
    mapper has no such layer; chapter 1 measures why its codes otherwise come out short).
    """

    def __init__(self, glo: GLO, *, glo_steps: int = 0, noise_dim: int = 32, hidden: int = 128,
                 fakes_per_real: int = 2, refresh_every: int = 50, z_jitter: float = 0.01, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.5, 0.999), sphere: bool = False):
        super().__init__()
        if glo_steps < 0:
            raise ValueError(f"glo_steps must be >= 0, got {glo_steps}")
        self.glo, self.glo_steps, self.noise_dim = glo, glo_steps, noise_dim
        codes = glo.latent_codes()
        mapper = MLP(noise_dim, glo.z_dim, hidden=hidden, depth=2, act="relu", norm="layer").to(codes.device)
        if sphere:
            mapper = nn.Sequential(mapper, UnitSphere())
        self.mapper = IMLE(mapper, noise_dim, fakes_per_real=fakes_per_real, refresh_every=refresh_every,
                           data=codes, z_jitter=z_jitter, lr=lr, betas=betas)
        # Every optimiser of both stages, so that a checkpoint resumes either stage exactly.
        self.optimizers = {"glo_generator": glo.optimizers["generator"], "glo_codes": glo.optimizers["codes"],
                           "mapper": self.mapper.optimizers["generator"]}
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.int64, device=codes.device))
        mirror_step_count(self, "steps_done", "_steps_done")  # which stage, without a device sync per step
        self._codes_current = False  # not saved: after a resume the mapper's data are re-read from GLO

    def ema_source(self) -> nn.Module:
        return self.mapper.generator

    def step(self, x: Tensor, index: Tensor) -> dict[str, Tensor]:
        """A GLO step on images x [B, ...] for the first ``glo_steps`` steps, then a latent IMLE step."""
        if count_step(self, "steps_done", "_steps_done") <= self.glo_steps:
            return {"glo_loss": self.glo.step(x, index)["loss"]}
        if not self._codes_current:  # GLO is done: its codes are the mapper's data from now on
            self.mapper.data, self._codes_current = self.glo.latent_codes(), True
        return self.mapper.step(self.glo.codes.weight[index].detach(), index)

    @torch.no_grad()
    def sample_codes(self, n: int) -> Tensor:
        """n codes T(z) [n, z_dim] for noise z ~ N(0, I) [n, noise_dim]."""
        return self.sampling_net()(torch.randn(n, self.noise_dim, device=self.device))

    def sample(self, n: int) -> Tensor:
        """n images [n, ...] through the whole chain z -> T -> G."""
        return self.glo.decode(self.sample_codes(n))


# ======================================================================================
# Builders for ``python -m genlib train {imle,glo,glann}`` (see genlib.cli.TrainSpec)
# ======================================================================================


def _generator_for(spec: TrainSpec, norm: str = "batch") -> nn.Module:
    """An MLP generator for vectors (shape (d,)) or a ConvGenerator with ``norm`` for images (shape (C, H, W))."""
    if len(spec.shape) == 1:
        return MLP(spec.z_dim, spec.shape[0], hidden=spec.width, depth=3)
    channels, height, width = spec.shape
    if height != width:
        raise ValueError(f"square images only, got {height}x{width}")
    return ConvGenerator(spec.z_dim, resolution=height, channels=channels, width=spec.width, norm=norm)


def _float_data(spec: TrainSpec) -> Tensor:
    """The whole training set as float (uint8 images -> [-1, 1])."""
    return to_float(spec.data) if spec.data.dtype == torch.uint8 else spec.data.float()


def build_imle(spec: TrainSpec) -> IMLE:
    """IMLE for the CLI; ``--opt`` fakes_per_real (10), refresh_every (1), z_jitter (0.01), distance (l2; or a
    :func:`pair_loss` name, matched over all pairs; or ``vgg16``: squared L2 between VGG16 perceptual features,
    matched by one GEMM, with ``$GENLIB_VGG16_WEIGHTS``)."""
    refresh_every = spec.option("refresh_every", 1)
    return IMLE(_generator_for(spec, norm="layer"), spec.z_dim, fakes_per_real=spec.option("fakes_per_real", 10),
                refresh_every=refresh_every, data=_float_data(spec) if refresh_every > 1 else None,
                z_jitter=spec.option("z_jitter", 0.01), lr=spec.lr,
                distance=_distance_for(spec, "distance", spec.option("distance", "l2")))


def build_glo(spec: TrainSpec) -> GLO:
    """GLO for the CLI; ``--opt`` loss (lap1 for images, l2 for vectors; any :func:`pair_loss` name, e.g. vgg16,
    a GLANN-style perceptual loss), code_lr (10 x lr)."""
    loss = _distance_for(spec, "loss", spec.option("loss", "lap1" if len(spec.shape) == 3 else "l2"))
    return GLO(_generator_for(spec), len(spec.data), spec.z_dim, loss=loss, lr=spec.lr,
               code_lr=spec.option("code_lr", 10 * spec.lr))


def _distance_for(spec: TrainSpec, option: str, name: str) -> str:
    """``name``, the CLI's ``--opt`` distance or loss, unless it compares images (vgg16, lap1) and the data are
    not images: that is an error before any weights are looked for."""
    if name in ("vgg16", "lap1") and len(spec.shape) != 3:
        raise ValueError(f"--opt {option}={name} compares images; this data has samples of shape {tuple(spec.shape)}")
    return name


def build_glann(spec: TrainSpec) -> GLANN:
    """GLANN for the CLI (GLO then latent IMLE in one run); ``--opt`` glo_steps (1000), noise_dim (32),
    refresh_every (50), sphere (no: the mapper's outputs as they come), plus the GLO options."""
    return GLANN(build_glo(spec), glo_steps=spec.option("glo_steps", 1000), noise_dim=spec.option("noise_dim", 32),
                 refresh_every=spec.option("refresh_every", 50), sphere=spec.option("sphere", False))
