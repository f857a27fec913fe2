"""Benchmarks: ``python -m genlib bench`` measures, on the current device, in one run,

* exact nearest-neighbour search (chapter 1) against ``torch.cdist`` and the GEMM bound, and
* training throughput (images/s) of every registered family at 64x64 next to a plain-PyTorch
  reference: the PyTorch-examples DCGAN step, fp32 eager, written out here on purpose.

It writes ``bench.json`` (with provenance) and ``bench.md`` (a table) into ``--out``.
Speed is measured here, never in unit tests.
"""

from __future__ import annotations

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
    """Time genlib's exact search, ``torch.cdist`` + argmin and a bare GEMM for each (M, N, d)."""
    from genlib.imle import nearest_neighbors

    rows = []
    for m, n, d in sizes:
        gen = torch.Generator(device="cpu").manual_seed(0)
        queries = torch.randn(m, d, generator=gen).to(device)
        keys = torch.randn(n, d, generator=gen).to(device)
        ours = nearest_neighbors(queries, keys)[1]
        exact = torch.cdist(queries.double(), keys.double()).argmin(1)
        low = torch.bfloat16 if device.type == "cuda" else torch.float32
        q_low, k_low = queries.to(low), keys.to(low)
        rows.append({
            "M": m, "N": n, "d": d,
            "genlib_ms": timeit(lambda: nearest_neighbors(queries, keys), device, repeats),
            "cdist_ms": timeit(lambda: torch.cdist(queries, keys).argmin(1), device, repeats),
            "gemm_bound_ms": timeit(lambda: q_low @ k_low.T, device, repeats),
            "gemm_dtype": str(low).replace("torch.", ""),
            "agrees_with_float64": float((ours == exact).float().mean()),
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
    """Images/s of the reference DCGAN step and of each registered family's ``step`` at ``resolution``."""
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
    return rows


def markdown_table(rows: list[dict]) -> str:
    """Rows of dicts as a Markdown table (floats with 3 significant digits)."""
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    cell = lambda v: f"{v:.3g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(row.get(k)) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def main(device: str | None = None, out: str | Path = "results/bench", quick: bool = False) -> dict:
    """Run every benchmark, print the tables and write ``bench.json`` and ``bench.md`` into ``out``."""
    from genlib.runtime import device as pick_device
    from genlib.runtime import use_fast_matmul

    dev = pick_device(device)
    use_fast_matmul(dev)
    if quick:
        nn_sizes, resolution, batch, repeats = [(256, 512, 64), (512, 1024, 784)], 8, 4, 1
    else:
        nn_sizes = [(1024, 1024, 3072), (4096, 4096, 3072), (4096, 4096, 12288)]
        resolution, batch, repeats = 64, 512 if dev.type == "cuda" else 16, 10 if dev.type == "cuda" else 3
    report = {"provenance": provenance(dev),
              "nearest_neighbors": bench_nearest_neighbors(dev, nn_sizes, repeats),
              "training": bench_training(dev, resolution, batch, repeats),
              "training_resolution": resolution}
    text = (f"# genlib bench on {report['provenance']['device_name']}\n\n## Exact nearest neighbours\n\n"
            + markdown_table(report["nearest_neighbors"])
            + f"\n\n## Training throughput at {resolution}x{resolution}\n\n" + markdown_table(report["training"]) + "\n")
    print(text)
    out = Path(out)
    write_json(out / "bench.json", report)
    (out / "bench.md").write_text(text)
    return report
