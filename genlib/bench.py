"""Benchmarks: ``python -m genlib bench`` measures, on the current device, in one run,

* exact nearest-neighbour search (chapter 1) against ``torch.cdist`` and the GEMM bound, and
* training throughput (images/s) of every registered family at 64x64 next to a plain-PyTorch
  reference: the PyTorch-examples DCGAN step, fp32 eager, written out here on purpose.

For the largest search it also times each number of first-pass candidates around the default
(``candidate_sweep``), since the best number depends on how many queries the first pass can prove.
It writes ``bench.json`` (with provenance) and ``bench.md`` (the tables) into ``--out``. After every timing,
one more search call per size runs under ``torch.profiler``: where its time goes (genlib's phases, the top
operators) is saved with each search row and summarised at the end of ``bench.md``.
Speed is measured here, never in unit tests.

Sizes: the defaults are the GPU sizes (search 1024 and 4096 queries against 1024 and 4096 keys of
dimension 3072 = 3x32x32 and 12,288 = 3x64x64; training batch 512 on CUDA, 16 on the CPU); ``quick`` is a
seconds-long smoke run; ``nn_sizes``, ``batch_size`` and ``repeats`` set any of them by hand (the CLI's
``--nn-size MxNxD``, ``--batch-size``, ``--repeats``), e.g. for a CPU run of a few minutes.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from genlib import runtime
from genlib.data import to_float
from genlib.results import provenance, write_json

if TYPE_CHECKING:
    from torch.autograd.profiler_util import FunctionEvent, FunctionEventAvg

    from genlib.train import GenerativeModel


def timeit(fn: Callable[[], object], device: torch.device, repeats: int = 10, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA-synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _synchronize(device)
        began = time.perf_counter()
        fn()
        _synchronize(device)
        times.append((time.perf_counter() - began) * 1e3)
    return sorted(times)[len(times) // 2]


def throughput_ms(fn: Callable[[], object], device: torch.device, calls: int = 10, warmup: int = 1) -> float:
    """Mean wall time per call of ``fn()`` in milliseconds over ``calls`` back-to-back calls, synchronised once
    before and once after: what a training loop sees (the host's launches overlap the device's work, and a step
    that is heavy only now and then, like DDE's generator update, counts at its share)."""
    for _ in range(warmup):
        fn()
    _synchronize(device)
    began = time.perf_counter()
    for _ in range(calls):
        fn()
    _synchronize(device)
    return (time.perf_counter() - began) * 1e3 / calls


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def search_inputs(m: int, n: int, d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The bench's standard Gaussian queries [m, d] and keys [n, d] on ``device``, the same at every call."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    queries = torch.randn(m, d, generator=gen).to(device)
    return queries, torch.randn(n, d, generator=gen).to(device)


PASS_ORDER = ("bf16", "tf32", "fp32", "fp32-wide", "brute_force")
"""The order in which the search settles queries (its passes in :mod:`genlib.imle`, then the brute force):
the ``settled`` cells follow it, since ``bench.json`` stores keys sorted."""


def settled_counts(stats: dict[str, int], device: torch.device) -> dict[str, int]:
    """Queries settled by each pass of the default search on ``device`` and by 'brute_force', 0 for a pass
    that did not run (``stats`` of :func:`genlib.imle.nearest_neighbors` names only the passes that ran)."""
    from genlib.imle import _passes, settled_queries

    return {**dict.fromkeys([p.name for p in _passes(None, device)] + ["brute_force"], 0), **settled_queries(stats)}


def reranked_per_query(stats: dict[str, int], queries: int) -> float:
    """Float64 rows the search computed per query (``stats['reranked_rows']`` of
    :func:`genlib.imle.nearest_neighbors` over ``queries``): the re-rank's share of the work."""
    from genlib.imle import RERANKED_ROWS

    return stats.get(RERANKED_ROWS, 0) / max(queries, 1)


def reference_nearest(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Index [M] of each query's [M, d] nearest key [N, d] by direct float64 differences ``sum((q - k)^2)``,
    the lowest index on ties: the bench's reference, independent of :mod:`genlib.imle`'s search.

    The float64 GEMM expansion ``|q|^2 + |k|^2 - 2 q.k`` errs by at most about ``2 d u`` of ``|q|^2 + |k|^2``
    (u = 2^-53, the standard dot-product bound), so the keys within ``8 d u`` of that of each row's smallest
    value (two entries' errors, with room) are shortlisted and only those pairs computed directly: the reference
    costs about one GEMM."""
    q, k = queries.flatten(1).double(), keys.flatten(1).double()
    q_sq, k_sq = q.pow(2).sum(1), k.pow(2).sum(1)
    expanded = q_sq[:, None] + k_sq[None, :] - 2 * q @ k.T
    slack = 4 * q.shape[1] * torch.finfo(torch.float64).eps * (q_sq + k_sq.max())[:, None]
    rows, cols = (expanded <= expanded.amin(1, keepdim=True) + slack).nonzero(as_tuple=True)
    direct = torch.cat([(q[r] - k[c]).pow(2).sum(1) for r, c in zip(rows.split(1024), cols.split(1024))])
    nearest = torch.full((len(q),), torch.inf, dtype=torch.float64, device=q.device)
    nearest = nearest.scatter_reduce(0, rows, direct, "amin")
    # among the pairs at their row's minimum, the lowest key index
    index = torch.full((len(q),), len(k), dtype=torch.long, device=q.device)
    return index.scatter_reduce(0, rows, torch.where(direct == nearest[rows], cols, len(k)), "amin")


def bench_nearest_neighbors(device: torch.device, sizes: list[tuple[int, int, int]], repeats: int) -> list[dict]:
    """Time genlib's exact search, ``torch.cdist`` + argmin and a bare GEMM for each (M, N, d).

    Queries and keys are standard Gaussian (the hard case for a certified search: all distances
    concentrate near ``2d``). ``settled`` counts the queries proven by each pass (:func:`settled_counts`);
    ``brute_force_queries`` (its last entry) those that no GEMM pass could prove and that went to the float64
    brute force; ``reranked_per_query`` the float64 rows computed per query (:func:`reranked_per_query`)."""
    from genlib.imle import nearest_neighbors

    rows = []
    for m, n, d in sizes:
        queries, keys = search_inputs(m, n, d, device)
        stats: dict[str, int] = {}
        ours = nearest_neighbors(queries, keys, stats=stats)[1]
        settled = settled_counts(stats, device)
        exact = reference_nearest(queries, keys)
        low = torch.bfloat16 if runtime.native_bf16(device) else torch.float32
        q_low, k_low = queries.to(low), keys.to(low)
        genlib_ms = timeit(lambda: nearest_neighbors(queries, keys), device, repeats)
        cdist_ms = timeit(lambda: torch.cdist(queries, keys).argmin(1), device, repeats)
        gemm_ms = timeit(lambda: q_low @ k_low.T, device, repeats)
        rows.append({
            "M": m, "N": n, "d": d,
            "genlib_ms": genlib_ms, "cdist_ms": cdist_ms, "gemm_bound_ms": gemm_ms,
            "gemm_dtype": str(low).replace("torch.", ""),
            "gemm_tflops": 2 * m * n * d / (gemm_ms * 1e-3) / 1e12,
            "genlib_over_gemm": genlib_ms / gemm_ms,
            "agrees_with_float64": float((ours == exact).float().mean()),
            "settled": settled, "reranked_per_query": reranked_per_query(stats, m),
            "brute_force_queries": settled["brute_force"],
        })
    return rows


def bench_candidates(device: torch.device, size: tuple[int, int, int], keeps: tuple[int, ...],
                     repeats: int) -> dict:
    """The search at one (M, N, d) with each number of first-pass candidates in ``keeps``: more candidates cost
    a larger top-k selection (the re-rank computes only those that can still win), fewer leave more queries
    unproven for the later full passes. Rows hold
    ``candidates``, ``genlib_ms``, ``settled`` (:func:`settled_counts`) and ``reranked_per_query``."""
    from genlib.imle import nearest_neighbors

    m, n, d = size
    queries, keys = search_inputs(m, n, d, device)
    rows = []
    for keep in keeps:
        stats: dict[str, int] = {}
        nearest_neighbors(queries, keys, candidates=keep, stats=stats)
        ms = timeit(lambda: nearest_neighbors(queries, keys, candidates=keep), device, repeats)
        rows.append({"candidates": keep, "genlib_ms": ms, "settled": settled_counts(stats, device),
                     "reranked_per_query": reranked_per_query(stats, m)})
    return {"M": m, "N": n, "d": d, "rows": rows}


PROFILE_TOP = 12
"""Operators kept per profile (by self time); device kernels keep half as many."""


def profile_nearest_neighbors(device: torch.device, rows: list[dict]) -> None:
    """Add ``profile`` (:func:`profile_call` of one more search call at the row's size) to each search row.

    Run it after every timing: a profiler session can leave hooks (CUPTI) that slow later kernel launches."""
    from genlib.imle import nearest_neighbors

    for row in rows:
        queries, keys = search_inputs(row["M"], row["N"], row["d"], device)
        if device.type == "cuda":  # the allocator and cuBLAS may have to grow again after the training bench
            nearest_neighbors(queries, keys)
        row["profile"] = profile_call(lambda: nearest_neighbors(queries, keys), device)


def profile_call(fn: Callable[[], object], device: torch.device) -> dict:
    """One call of ``fn`` under torch.profiler: ``wall_ms`` (of the call, profiler overhead included),
    ``phases`` (:func:`phase_times`), ``ops`` (:func:`top_operators`) and, on CUDA, ``device_ms`` (kernel
    time, all streams) and ``kernels``; or ``{'error': why}`` when profiling fails, so the bench goes on."""
    if not profiler_marks_ranges():
        return {"error": f"torch {torch.__version__}'s profiler does not mark record_function ranges; torch 2.5+ does"}
    try:
        from torch.profiler import ProfilerActivity, profile

        cuda = device.type == "cuda"
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            _synchronize(device)
            began = time.perf_counter()
            fn()
            _synchronize(device)
            wall_ms = (time.perf_counter() - began) * 1e3
        averages = prof.key_averages()
        report = {"wall_ms": round(wall_ms, 4), "phases": phase_times(prof.events(), cuda),
                  "ops": top_operators(averages, cuda)}
        if cuda:
            kernels = [e for e in averages if not _is_host(e) and not e.is_user_annotation]
            report["device_ms"] = _ms(sum(e.self_device_time_total for e in kernels))
            report["kernels"] = _top(kernels, lambda e: e.self_device_time_total, PROFILE_TOP // 2)
        return report
    except Exception as error:  # no CUPTI, another torch's event fields: the timings stand without a profile
        return {"error": f"{type(error).__name__}: {error}"}


def profiler_marks_ranges() -> bool:
    """Whether this torch's profiler events say which are ``record_function`` ranges (``is_user_annotation``,
    torch 2.5+): the phases and operator tables are told apart by it."""
    from torch.autograd.profiler_util import FunctionEvent

    return "is_user_annotation" in inspect.signature(FunctionEvent.__init__).parameters


def _is_host(event: FunctionEvent | FunctionEventAvg) -> bool:
    """Whether a profiler event ran on the CPU (an operator or a range), not on the device."""
    return event.device_type == torch.autograd.DeviceType.CPU


def _ms(microseconds: float) -> float:
    """Profiler microseconds as milliseconds, to 0.1 us."""
    return round(microseconds / 1e3, 4)


def phase_times(events: Iterable[FunctionEvent], cuda: bool) -> list[dict]:
    """The ``record_function`` ranges (genlib's ``nn.*`` in :mod:`genlib.imle`), in order of first entry:
    ``calls``, ``cpu_ms`` and on CUDA ``device_ms`` (the kernels launched inside), both including the ranges
    nested inside (``nn.pass.*`` hold the phases of their pass)."""
    phases: dict[str, dict] = {}
    for event in events:
        if event.is_user_annotation and _is_host(event):
            row = phases.setdefault(event.name, {"name": event.name, "calls": 0, "cpu_ms": 0.0}
                                    | ({"device_ms": 0.0} if cuda else {}))
            row["calls"] += 1
            row["cpu_ms"] += event.cpu_time_total / 1e3
            if cuda:
                row["device_ms"] += event.device_time_total / 1e3
    return [{key: round(value, 4) if isinstance(value, float) else value for key, value in row.items()}
            for row in phases.values()]


def top_operators(averages: Iterable[FunctionEventAvg], cuda: bool) -> list[dict]:
    """The PROFILE_TOP operators by self time: ``self_ms`` is device time on CUDA (then ``self_cpu_ms`` too),
    CPU time on the CPU."""
    ops = [e for e in averages if _is_host(e) and not e.is_user_annotation]
    if cuda:
        return _top(ops, lambda e: e.self_device_time_total, PROFILE_TOP, with_cpu=True)
    return _top(ops, lambda e: e.self_cpu_time_total, PROFILE_TOP)


def _top(events: Iterable[FunctionEventAvg], self_time: Callable[[object], float], count: int,
         with_cpu: bool = False) -> list[dict]:
    """The ``count`` events with the largest positive ``self_time`` (us): {name, calls, self_ms}, and with
    ``with_cpu`` their ``self_cpu_ms``."""
    ranked = sorted((e for e in events if self_time(e) > 0), key=self_time, reverse=True)[:count]
    return [{"name": e.key[:120], "calls": e.count, "self_ms": _ms(self_time(e))}
            | ({"self_cpu_ms": _ms(e.self_cpu_time_total)} if with_cpu else {}) for e in ranked]


class ReferenceDCGAN(nn.Module):
    """The PyTorch-examples DCGAN (z 100, 64 feature maps, 64x64x3), written plainly as the baseline."""

    def __init__(self, nz: int = 100, ngf: int = 64, ndf: int = 64):
        super().__init__()
        self.nz = nz
        self.generator = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 8), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
            nn.ConvTranspose2d(ngf, 3, 4, 2, 1, bias=False), nn.Tanh())
        self.discriminator = nn.Sequential(
            nn.Conv2d(3, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 8), nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False), nn.Flatten())
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), 2e-4, betas=(0.5, 0.999))
        self.opt_g = torch.optim.Adam(self.generator.parameters(), 2e-4, betas=(0.5, 0.999))
        self.bce = nn.BCEWithLogitsLoss()

    def step(self, real: torch.Tensor) -> None:
        """One D step and one G step exactly as in the PyTorch example."""
        b = real.shape[0]
        ones, zeros = torch.ones(b, 1, device=real.device), torch.zeros(b, 1, device=real.device)
        fake = self.generator(torch.randn(b, self.nz, 1, 1, device=real.device))
        self.opt_d.zero_grad()
        (self.bce(self.discriminator(real), ones) + self.bce(self.discriminator(fake.detach()), zeros)).backward()
        self.opt_d.step()
        self.opt_g.zero_grad()
        self.bce(self.discriminator(fake), ones).backward()
        self.opt_g.step()


def bench_training(device: torch.device, resolution: int, batch_size: int, steps: int, channels: int = 3,
                   graphs: bool | None = None, graph_safe_only: bool = False) -> list[dict]:
    """Images/s of the reference DCGAN step (at 64x64) and of each registered family's ``step`` on
    ``channels`` x ``resolution`` x ``resolution`` images (``vs_reference``: images/s over the reference's, in the
    same run; genlib steps run under bf16 autocast where fit would, :func:`genlib.runtime.native_bf16`, the
    reference in fp32 eager; each rate is the mean over ``steps`` back-to-back steps, :func:`throughput_ms`).
    With ``graphs`` (default: on CUDA) each graph-safe family also gets a row of its step replayed as a CUDA graph,
    after every eager row: a failed capture may leave the CUDA generator unusable, so it ends the graph rows;
    ``graph_safe_only`` keeps only those families."""
    from genlib.cli import FAMILIES, TrainSpec, build_family
    from genlib.train import train_step

    graphs = device.type == "cuda" if graphs is None else graphs
    data = torch.randint(0, 256, (max(4 * batch_size, 256), channels, resolution, resolution), dtype=torch.uint8)
    real = to_float(data[:batch_size].to(device))
    rows, graph_safe = [], []
    if resolution == 64 and channels == 3:
        reference = ReferenceDCGAN().to(device)
        ms = throughput_ms(lambda: reference.step(real), device, steps)
        rows.append({"model": "reference DCGAN (fp32 eager)", "batch": batch_size, "img_per_s": batch_size / ms * 1e3})
    amp = runtime.native_bf16(device)  # as fit would train
    for name in sorted(FAMILIES):
        spec = TrainSpec(data.to(device), tuple(data.shape[1:]), device, batch_size=batch_size, z_dim=100)
        try:
            model = build_family(name, spec).to(device)
        except (NotImplementedError, ValueError) as error:
            rows.append({"model": name, "batch": batch_size, "img_per_s": None, "note": str(error)})
            continue
        if graph_safe_only and not model.graph_safe:
            continue
        reals, indices = step_reals(model, data, batch_size, device)
        ms = throughput_ms(lambda: train_step(model, reals, indices, amp=amp), device, steps)
        rows.append({"model": f"genlib {name}", "batch": batch_size, "img_per_s": batch_size / ms * 1e3})
        if graphs and model.graph_safe:
            graph_safe.append((name, model, reals, indices))
    for name, model, reals, indices in graph_safe:
        rows.append(graphed_step_row(model, name, reals, indices, steps))
        if rows[-1]["img_per_s"] is None:
            break
    if rows and rows[0]["model"].startswith("reference"):
        for row in rows:
            if row["img_per_s"] is not None:
                row["vs_reference"] = row["img_per_s"] / rows[0]["img_per_s"]
    return rows


SMALL_BATCH = {"channels": 1, "resolution": 28, "batch": 64}
"""The full-scale Fashion-MNIST runs' images and batch (tools/record_full.sh): steps this small are bound by kernel
launches, not by arithmetic."""


def step_reals(model: GenerativeModel, data: torch.Tensor, batch_size: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """What fit hands one step of ``model``: its ``batches_per_step`` batches of ``batch_size`` rows of uint8
    ``data`` (cycled when it has fewer), in [-1, 1] on ``device``, and their indices. A critic that wants fresh reals
    per update gets them; the bench's rates still count one batch per step."""
    index = torch.arange(batch_size * model.batches_per_step) % len(data)
    return to_float(data[index].to(device)), index.to(device)


def bench_small_batches(device: torch.device, steps: int) -> list[dict]:
    """:func:`bench_training` at :data:`SMALL_BATCH`'s size for the graph-safe families, eager and replayed as a
    CUDA graph, each row with its steps/s."""
    rows = bench_training(device, SMALL_BATCH["resolution"], SMALL_BATCH["batch"], steps, SMALL_BATCH["channels"],
                          graphs=True, graph_safe_only=True)
    return [row | ({"steps_per_s": row["img_per_s"] / row["batch"]} if row["img_per_s"] else {}) for row in rows]


def graphed_step_row(model: GenerativeModel, name: str, real: torch.Tensor, index: torch.Tensor, steps: int) -> dict:
    """The bench row of ``model``'s step (on reals ``real``: its ``batches_per_step`` batches, joined) replayed as
    a CUDA graph (:class:`genlib.train.StepGraph`, autocast as in fit), captured after its warm-up steps; a failed
    capture gives a row with the error as its note instead of a rate."""
    from genlib.train import GRAPH_WARMUP_STEPS, StepGraph

    graph = StepGraph(model, amp=runtime.native_bf16(model.device))
    batch = len(real) // model.batches_per_step  # the rate counts one batch per step, as the eager rows do
    row = {"model": f"genlib {name} (CUDA graph)", "batch": batch, "img_per_s": None}
    try:
        for _ in range(GRAPH_WARMUP_STEPS + 1):
            graph(real, index)
    except RuntimeError as error:
        return row | {"note": str(error)}
    row["img_per_s"] = batch / throughput_ms(lambda: graph(real, index), real.device, steps) * 1e3
    model.zero_grad(set_to_none=True)  # the grads live in the graph's memory pool: free it for the next family
    return row


def format_number(value: float | int | str | dict[str, int] | None) -> str:
    """A table cell: floats with 3 significant digits (trailing zeros kept), from 1000 up as whole numbers
    (never 1.5e+03); a fraction just below 1 in size keeps the digits that show it is not 1 (0.9996, not 1.00);
    counts per pass (``settled``) as 'tf32 3400 / fp32-wide 684', nonzero ones only, in PASS_ORDER."""
    if value is None:
        return ""
    if isinstance(value, dict):
        rank = {name: i for i, name in enumerate(PASS_ORDER)}
        ordered = sorted(value.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0]))
        return " / ".join(f"{name} {count}" for name, count in ordered if count)
    if not isinstance(value, float):
        return str(value)
    if abs(value) >= 999.5:  # rounds to 1000 or more: 3 significant digits would print 1.00e+03
        return f"{value:.0f}"
    text = f"{value:#.3g}"
    digits = 3
    while abs(value) < 1 and abs(float(text)) == 1 and digits < 12:
        digits += 1
        text = f"{value:#.{digits}g}"
    return text.rstrip(".")


NN_COLUMNS = ("M", "N", "d", "genlib_ms", "cdist_ms", "gemm_bound_ms", "gemm_dtype", "gemm_tflops",
              "genlib_over_gemm", "agrees_with_float64", "settled", "reranked_per_query", "brute_force_queries")
TRAINING_COLUMNS = ("model", "batch", "img_per_s", "vs_reference", "note")
PHASE_COLUMNS = ("name", "calls", "cpu_ms", "device_ms")
OPERATOR_COLUMNS = ("name", "calls", "self_ms", "self_cpu_ms")


def markdown_table(rows: list[dict], columns: tuple[str, ...] = (), hidden: tuple[str, ...] = ()) -> str:
    """Rows of dicts as a Markdown table (cells by :func:`format_number`): the ``columns`` that occur
    first, in that order, then any other keys but ``hidden`` in order of appearance."""
    if not rows:
        return ""
    present = dict.fromkeys(k for row in rows for k in row if k not in hidden)
    keys = [k for k in columns if k in present] + [k for k in present if k not in columns]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(format_number(row.get(k)) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def _cpu_times() -> dict | None:
    """Machine-wide CPU time counters (Linux ``/proc/stat``) and this process's CPU time, or None."""
    try:
        counters = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    own = os.times()
    return {"counters": counters, "own_ticks": (own.user + own.system) * ticks}


def cpu_share(before: dict | None, after: dict | None) -> dict | None:
    """How the machine's CPU time was spent between two ``_cpu_times()`` snapshots, as fractions of all
    cores' time: ``this_process``, ``other_processes``, ``idle`` and ``steal`` (taken by the hypervisor).
    Other processes or steal above a few percent mean that the timings are slower than the device can do."""
    if before is None or after is None:
        return None
    spent = (end - start for end, start in zip(after["counters"], before["counters"]))
    user, nice, system, idle, iowait, irq, softirq, steal = spent
    total = user + nice + system + idle + iowait + irq + softirq + steal
    if total <= 0:
        return None
    own = min(after["own_ticks"] - before["own_ticks"], user + nice + system + irq + softirq)
    share = {"this_process": own, "other_processes": user + nice + system + irq + softirq - own,
             "idle": idle + iowait, "steal": steal}
    return {key: round(value / total, 3) for key, value in share.items()}


def render_markdown(report: dict) -> str:
    """``bench.md``: the two tables of a bench report, then the search profiles if it has them (a pure
    function of ``bench.json``)."""
    resolution = report["training_resolution"]
    return (f"# genlib bench on {report['provenance']['device_name']}\n\n## Exact nearest neighbours\n\n"
            + markdown_table(report["nearest_neighbors"], NN_COLUMNS, hidden=("profile",))
            + f"\n\n## Training throughput at {resolution}x{resolution}\n\n"
            + markdown_table(report["training"], TRAINING_COLUMNS) + "\n"
            + render_small_batches(report.get("small_batch_training"))
            + render_sweep(report.get("candidate_sweep")) + render_profiles(report["nearest_neighbors"]))


def render_small_batches(rows: list[dict] | None) -> str:
    """The Markdown section of :func:`bench_small_batches` ("" for reports without it)."""
    if not rows:
        return ""
    shape = f"{SMALL_BATCH['channels']}x{SMALL_BATCH['resolution']}x{SMALL_BATCH['resolution']}"
    return (f"\n## Small batches: eager and replayed steps\n\nThe graph-safe families at the full-scale runs' size "
            f"({shape} images, batch {SMALL_BATCH['batch']}):\n\n"
            + markdown_table(rows, ("model", "batch", "steps_per_s", "img_per_s", "note")) + "\n")


SWEEP_HEADING = "## First-pass candidates"


def render_sweep(sweep: dict | None) -> str:
    """The Markdown section of :func:`bench_candidates` ("" for older reports, which have none)."""
    if not sweep:
        return ""
    return (f"\n{SWEEP_HEADING}\n\nThe search at {sweep['M']} x {sweep['N']} x {sweep['d']} keeping each number of "
            "candidates in its first pass (times in ms):\n\n"
            + markdown_table(sweep["rows"], ("candidates", "genlib_ms", "settled", "reranked_per_query")) + "\n")


PROFILE_HEADING = "## Where the search's time goes"
PROFILE_NOTE = ("One more call per size under torch.profiler, after all timings. Phases are genlib's ranges: "
                "`nn.pass.*` include the phases run inside them, the top-level ones (check_inputs, pass.*, settle, "
                "brute_force) add up to about the wall time; `device_ms` sums the kernels launched inside a range. "
                "Operators and kernels are ranked by self time on the device (on the CPU: CPU time).")


def render_profiles(rows: list[dict]) -> str:
    """The Markdown section of the search rows' profiles ("" when no row has one, as in older reports)."""
    profiled = [row for row in rows if "profile" in row]
    if not profiled:
        return ""
    return "\n".join([f"\n{PROFILE_HEADING}\n\n{PROFILE_NOTE}\n"] + [_render_profile(row) for row in profiled])


def _render_profile(row: dict) -> str:
    """One size's profile: a heading with its wall (and kernel) time, then its phase, operator and kernel tables."""
    profile, size = row["profile"], f"### {row['M']} x {row['N']} x {row['d']}"
    if "error" in profile:
        return f"{size}: the profiler failed ({profile['error']})\n"
    device = f", {format_number(profile['device_ms'])} ms of device kernels" if "device_ms" in profile else ""
    tables = [("Phases", profile["phases"], PHASE_COLUMNS), ("Top operators", profile["ops"], OPERATOR_COLUMNS),
              ("Top kernels", profile.get("kernels"), OPERATOR_COLUMNS)]
    return (f"{size}: {format_number(profile['wall_ms'])} ms wall (profiled){device}\n"
            + "".join(f"\n{title}:\n\n{markdown_table(table, columns)}\n" for title, table, columns in tables if table))


def parse_nn_size(text: str) -> tuple[int, int, int]:
    """``'1024x4096x3072'`` -> (M queries, N keys, d dimension), all positive."""
    parts = text.lower().split("x")
    try:
        size = tuple(int(part) for part in parts)
    except ValueError:
        size = ()
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"a search size is MxNxD with three positive integers, e.g. 1024x4096x3072; got {text!r}")
    return size  # type: ignore[return-value]


def _section(name: str, run: Callable[..., Any], *args: Any) -> Any:
    """``run(*args)`` after a line naming the section: the tables print only at the end, minutes later."""
    print(f"bench: {name} ...", flush=True)
    return run(*args)


def main(device: str | None = None, out: str | Path = "results/bench", quick: bool = False,
         nn_sizes: list[tuple[int, int, int]] | None = None, batch_size: int | None = None,
         repeats: int | None = None) -> dict:
    """Run every benchmark, print the tables and write ``bench.json`` and ``bench.md`` into ``out``.

    ``nn_sizes`` (list of (M, N, d)), ``batch_size`` and ``repeats`` (timed calls per measurement: the median of
    the search's, the mean of back-to-back training steps) replace the preset's values when given."""
    from genlib.runtime import device as pick_device
    from genlib.runtime import make_folder
    from genlib.runtime import use_fast_matmul

    out = make_folder(out, "out")  # now: a path that cannot be a folder fails before the benchmark
    dev = pick_device(device)
    use_fast_matmul(dev)
    cuda = dev.type == "cuda"
    keeps = (8, 16, 32, 64) if cuda else (4, 8, 16, 32)  # around the first pass's default (tf32 16, fp32 8)
    if quick:
        preset_sizes, resolution, preset_batch, preset_repeats = [(256, 512, 64), (512, 1024, 784)], 8, 4, 1
        keeps = keeps[:2]
    else:
        preset_sizes = [(1024, 1024, 3072), (4096, 4096, 3072), (4096, 4096, 12288)]
        resolution, preset_batch, preset_repeats = 64, 512 if cuda else 16, 10 if cuda else 3
    nn_sizes, batch, repeats = nn_sizes or preset_sizes, batch_size or preset_batch, repeats or preset_repeats
    if min(batch, repeats) < 1:
        raise ValueError(f"batch_size and repeats must be >= 1, got {batch} and {repeats}")
    cpu_before, began = _cpu_times(), time.perf_counter()
    # the most work; on a tie the larger d, where the bound is hardest to meet
    swept = max(nn_sizes, key=lambda size: (size[0] * size[1] * size[2], size[2]))
    report = {"provenance": {**provenance(dev), "torch_threads": torch.get_num_threads()},
              "nearest_neighbors": _section("nearest-neighbour search", bench_nearest_neighbors, dev, nn_sizes,
                                            repeats),
              "candidate_sweep": _section("candidates of the first pass", bench_candidates, dev, swept, keeps, repeats),
              "training": _section("training steps", bench_training, dev, resolution, batch, repeats),
              "training_resolution": resolution, "repeats": repeats}
    failed_capture = any(row["model"].endswith("(CUDA graph)") and row["img_per_s"] is None
                         for row in report["training"])
    if cuda and not quick and not failed_capture:  # where replayed graphs matter: launch-bound steps
        report["small_batch_training"] = _section("small-batch training", bench_small_batches, dev, repeats)
    _section("profile of the search", profile_nearest_neighbors, dev, report["nearest_neighbors"])
    # Other processes on the same machine slow every number down: record who used the CPU during the run.
    report["provenance"]["cpu_share"] = cpu_share(cpu_before, _cpu_times())
    report["provenance"]["wall_s"] = round(time.perf_counter() - began, 1)
    text = render_markdown(report)
    print(text)
    write_json(out / "bench.json", report)
    (out / "bench.md").write_text(text)
    return report
