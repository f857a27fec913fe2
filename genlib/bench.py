"""Benchmarks: ``python -m genlib bench`` measures, on the current device, in one run,

* exact nearest-neighbour search (chapter 1) against ``torch.cdist`` and the GEMM bound, and
* training throughput (images/s) of every registered family at 64x64 next to a plain-PyTorch
  reference: the PyTorch-examples DCGAN step, fp32 eager, written out here on purpose.

It writes ``bench.json`` (with provenance) and ``bench.md`` (a table) into ``--out``.
Speed is measured here, never in unit tests.

Sizes: the defaults are the GPU sizes (search 1024 and 4096 queries against 1024 and 4096 keys of
dimension 3072 = 3x32x32 and 12,288 = 3x64x64; training batch 512 on CUDA, 16 on the CPU); ``quick`` is a
seconds-long smoke run; ``nn_sizes``, ``batch_size`` and ``repeats`` set any of them by hand (the CLI's
``--nn-size MxNxD``, ``--batch-size``, ``--repeats``), e.g. for a CPU run of a few minutes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from genlib.data import to_float
from genlib.results import provenance, write_json


def timeit(fn: Callable[[], object], device: torch.device, repeats: int = 10, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA-synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - began) * 1e3)
    return sorted(times)[len(times) // 2]


def bench_nearest_neighbors(device: torch.device, sizes: list[tuple[int, int, int]], repeats: int) -> list[dict]:
    """Time genlib's exact search, ``torch.cdist`` + argmin and a bare GEMM for each (M, N, d).

    Queries and keys are standard Gaussian (the hard case for a certified search: all distances
    concentrate near ``2d``). ``brute_force_queries`` counts the queries that the GEMM passes could not
    prove and that went to the float64 brute force (``stats`` of :func:`genlib.imle.nearest_neighbors`)."""
    from genlib.imle import nearest_neighbors

    rows = []
    for m, n, d in sizes:
        gen = torch.Generator(device="cpu").manual_seed(0)
        queries = torch.randn(m, d, generator=gen).to(device)
        keys = torch.randn(n, d, generator=gen).to(device)
        settled: dict[str, int] = {}
        ours = nearest_neighbors(queries, keys, stats=settled)[1]
        exact = torch.cdist(queries.double(), keys.double()).argmin(1)
        low = torch.bfloat16 if device.type == "cuda" else torch.float32
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
            "brute_force_queries": settled.get("brute_force", 0),
        })
    return rows


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


def bench_training(device: torch.device, resolution: int, batch_size: int, steps: int) -> list[dict]:
    """Images/s of the reference DCGAN step and of each registered family's ``step`` at ``resolution``
    (``vs_reference``: images/s over the reference's, in the same run; genlib steps run under bf16
    autocast on CUDA, the reference in fp32 eager)."""
    from genlib.cli import FAMILIES, TrainSpec, build_family
    from genlib.train import autocast_context

    data = torch.randint(0, 256, (max(4 * batch_size, 256), 3, resolution, resolution), dtype=torch.uint8)
    real = to_float(data[:batch_size].to(device))
    index = torch.arange(batch_size, device=device)
    rows = []
    if resolution == 64:
        reference = ReferenceDCGAN().to(device)
        ms = timeit(lambda: reference.step(real), device, steps)
        rows.append({"model": "reference DCGAN (fp32 eager)", "batch": batch_size, "img_per_s": batch_size / ms * 1e3})
    for name in sorted(FAMILIES):
        spec = TrainSpec(data.to(device), tuple(data.shape[1:]), device, batch_size=batch_size, z_dim=100)
        try:
            model = build_family(name, spec).to(device)
        except (NotImplementedError, ValueError) as error:
            rows.append({"model": name, "batch": batch_size, "img_per_s": None, "note": str(error)})
            continue

        def one_step() -> None:
            with autocast_context(device, device.type == "cuda"):
                model.step(real, index)

        ms = timeit(one_step, device, steps)
        rows.append({"model": f"genlib {name}", "batch": batch_size, "img_per_s": batch_size / ms * 1e3})
    if rows and rows[0]["model"].startswith("reference"):
        for row in rows:
            if row["img_per_s"] is not None:
                row["vs_reference"] = row["img_per_s"] / rows[0]["img_per_s"]
    return rows


def format_number(value) -> str:
    """A table cell: floats with 3 significant digits (trailing zeros kept), from 1000 up as whole numbers
    (never 1.5e+03); a fraction just below 1 keeps the digits that show it is not 1 (0.9996, not 1.00)."""
    if value is None:
        return ""
    if not isinstance(value, float):
        return str(value)
    if abs(value) >= 1000:
        return f"{value:.0f}"
    text = f"{value:#.3g}"
    digits = 3
    while abs(value) < 1 and float(text) == 1 and digits < 12:
        digits += 1
        text = f"{value:#.{digits}g}"
    return text.rstrip(".")


NN_COLUMNS = ("M", "N", "d", "genlib_ms", "cdist_ms", "gemm_bound_ms", "gemm_dtype", "gemm_tflops",
              "genlib_over_gemm", "agrees_with_float64", "brute_force_queries")
TRAINING_COLUMNS = ("model", "batch", "img_per_s", "vs_reference", "note")


def markdown_table(rows: list[dict], columns: tuple[str, ...] = ()) -> str:
    """Rows of dicts as a Markdown table (cells by :func:`format_number`): the ``columns`` that occur
    first, in that order, then any other keys in order of appearance."""
    if not rows:
        return ""
    present = dict.fromkeys(k for row in rows for k in row)
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
    user, nice, system, idle, iowait, irq, softirq, steal = (a - b for a, b in zip(after["counters"], before["counters"]))
    total = user + nice + system + idle + iowait + irq + softirq + steal
    if total <= 0:
        return None
    own = min(after["own_ticks"] - before["own_ticks"], user + nice + system + irq + softirq)
    share = {"this_process": own, "other_processes": user + nice + system + irq + softirq - own,
             "idle": idle + iowait, "steal": steal}
    return {key: round(value / total, 3) for key, value in share.items()}


def render_markdown(report: dict) -> str:
    """``bench.md``: the two tables of a bench report (a pure function of ``bench.json``)."""
    resolution = report["training_resolution"]
    return (f"# genlib bench on {report['provenance']['device_name']}\n\n## Exact nearest neighbours\n\n"
            + markdown_table(report["nearest_neighbors"], NN_COLUMNS)
            + f"\n\n## Training throughput at {resolution}x{resolution}\n\n"
            + markdown_table(report["training"], TRAINING_COLUMNS) + "\n")


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


def main(device: str | None = None, out: str | Path = "results/bench", quick: bool = False,
         nn_sizes: list[tuple[int, int, int]] | None = None, batch_size: int | None = None,
         repeats: int | None = None) -> dict:
    """Run every benchmark, print the tables and write ``bench.json`` and ``bench.md`` into ``out``.

    ``nn_sizes`` (list of (M, N, d)), ``batch_size`` and ``repeats`` (timed calls per measurement, the
    median is kept) replace the preset's values when given."""
    from genlib.runtime import device as pick_device
    from genlib.runtime import use_fast_matmul

    dev = pick_device(device)
    use_fast_matmul(dev)
    if quick:
        preset_sizes, resolution, preset_batch, preset_repeats = [(256, 512, 64), (512, 1024, 784)], 8, 4, 1
    else:
        preset_sizes = [(1024, 1024, 3072), (4096, 4096, 3072), (4096, 4096, 12288)]
        cuda = dev.type == "cuda"
        resolution, preset_batch, preset_repeats = 64, 512 if cuda else 16, 10 if cuda else 3
    nn_sizes, batch, repeats = nn_sizes or preset_sizes, batch_size or preset_batch, repeats or preset_repeats
    if min(batch, repeats) < 1:
        raise ValueError(f"batch_size and repeats must be >= 1, got {batch} and {repeats}")
    cpu_before, began = _cpu_times(), time.perf_counter()
    report = {"provenance": {**provenance(dev), "torch_threads": torch.get_num_threads()},
              "nearest_neighbors": bench_nearest_neighbors(dev, nn_sizes, repeats),
              "training": bench_training(dev, resolution, batch, repeats),
              "training_resolution": resolution, "repeats": repeats}
    # Other processes on the same machine slow every number down: record who used the CPU during the run.
    report["provenance"]["cpu_share"] = cpu_share(cpu_before, _cpu_times())
    report["provenance"]["wall_s"] = round(time.perf_counter() - began, 1)
    text = render_markdown(report)
    print(text)
    out = Path(out)
    write_json(out / "bench.json", report)
    (out / "bench.md").write_text(text)
    return report
