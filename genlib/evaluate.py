"""The numbers a recorded run reports, the same ones the chapters print live.

``python -m genlib train`` calls :func:`evaluate_model` after training, so that a full-scale run made
on a GPU fills the same table a chapter computes at small scale:

* every family: sampling speed (samples/s, timed after a warm-up batch);
* 2-D toys: MMD^2 to fresh real points and, for the Gaussian mixtures, modes covered and the
  high-quality fraction (:func:`genlib.metrics.mode_coverage`, 3 std);
* images: the Fréchet distance and KID between real and generated features, with the committed
  Fashion-MNIST classifier for 28x28 grey sets and EfficientNet-Lite0 otherwise (both offline), and
  the FID proper (Inception-v3 features) as well wherever its weights are available
  (:func:`genlib.features.inception_features_available`);
* families with an exact likelihood (``model.evaluate``, e.g. flows): held-out ``nll`` and ``bits_per_dim``.

This room only glues :mod:`genlib.metrics` (pure functions) to models and feature networks.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from genlib import data as gdata
from genlib import features, metrics, runtime
from genlib.train import GenerativeModel, NonFiniteLossError, fit

GREY_28 = (1, 28, 28)
MMD_POINTS = 2000  # MMD^2 builds an (2n)^2 kernel matrix: 2,000 points keep it at 64 MB


def feature_network_for(shape: tuple[int, ...]) -> str:
    """The feature extractor used for images of ``shape`` (C, H, W): Fashion classifier for 1x28x28."""
    return "fashion-classifier" if tuple(shape) == GREY_28 else "efficientnet-lite0"


@torch.no_grad()
def draw_samples(model: GenerativeModel, n: int, batch_size: int = 500, progress: bool = False) -> tuple[Tensor, float]:
    """``n`` samples ``[n, ...]`` from ``model`` (float32, CPU) and the sampling rate in samples/s; ``progress``
    shows a bar (a Langevin sampler's 10,000 samples take minutes on a CPU).

    On CUDA one extra batch is drawn first and thrown away, so that lazy initialisation and cuDNN
    autotuning do not count in the rate; on the CPU, where neither is worth a batch, it is skipped (for a
    Langevin sampler it would add up to half the evaluation's time)."""
    from tqdm.auto import tqdm

    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    if model.device.type == "cuda":
        model.sample(min(batch_size, n))
    chunks, drawn = [], 0
    with tqdm(total=n, desc="sampling", unit="sample", disable=not progress, dynamic_ncols=True,
              mininterval=0.5) as bar:
        began = time.perf_counter()  # the bar's set-up and close are not sampling time
        while drawn < n:
            chunk = model.sample(min(batch_size, n - drawn))
            chunks.append(chunk.float().cpu())  # the copy to the CPU also waits for the GPU to finish
            drawn += len(chunk)
            bar.update(len(chunk))
        seconds = time.perf_counter() - began
    return torch.cat(chunks), n / seconds


def toy_metrics(fake: Tensor, toy_name: str, seed: int = 0) -> dict[str, float]:
    """MMD^2 between (at most ``MMD_POINTS`` of) ``fake [n, 2]`` and as many fresh points of toy
    ``toy_name``; for the Gaussian mixtures also mode coverage, over all of ``fake``."""
    toy = gdata.toy(toy_name)
    subset = fake[:MMD_POINTS]
    real = toy.sample(len(subset), torch.Generator().manual_seed(seed + 1))
    out = {"mmd2": metrics.mmd2(real, subset)}
    if toy.modes is not None:
        covered, high_quality = metrics.mode_coverage(fake, toy.modes, toy.std)
        out.update(modes_covered=covered, modes_total=len(toy.modes), high_quality_fraction=high_quality)
    return out


def image_metrics(fake: Tensor, real: Tensor, device: torch.device | str | None = None,
                  seed: int = 0, progress: bool = False) -> dict[str, float | str]:
    """Fréchet distance and KID between generated ``fake [n, C, H, W]`` ([-1, 1] floats) and ``real``
    (uint8 or [-1, 1], same image shape), in the features of :func:`feature_network_for`; plus ``fid``, the
    Fréchet distance in Inception-v3 features, when those weights are available (never otherwise); ``progress``:
    a bar while extracting features."""
    if fake.shape[1:] != real.shape[1:]:
        raise ValueError(f"fake images {tuple(fake.shape[1:])} and real images {tuple(real.shape[1:])} differ in shape")
    name = feature_network_for(tuple(real.shape[1:]))
    fake = fake.clamp(-1, 1)
    features.check_inception_weights()
    real_feats, fake_feats = _features_of(name, real, fake, device, progress)
    kid_mean, kid_std = metrics.kid(real_feats, fake_feats, generator=torch.Generator().manual_seed(seed))
    out = {"features": name, "fd": metrics.frechet_distance(real_feats, fake_feats),
           "kid": kid_mean, "kid_std": kid_std}
    if features.inception_features_available():
        out["fid"] = metrics.frechet_distance(*_features_of("inception", real, fake, device, progress))
    return out


def _features_of(name: str, real: Tensor, fake: Tensor, device: torch.device | str | None,
                 progress: bool = False) -> tuple[Tensor, Tensor]:
    """The features [n, d] of ``real`` and of ``fake`` in the extractor registered as ``name`` (``progress``: with a
    bar for each)."""
    extract = features.feature_extractor(name)
    feats = []
    for which, images in (("real", real), ("fake", fake)):
        with features.progress_bars(f"{name} features, {which}") if progress else contextlib.nullcontext():
            feats.append(extract(images, device=device))
    return feats[0], feats[1]


def held_out_subset(images: Tensor, n: int, seed: int = 0) -> Tensor:
    """A fixed random subset of ``n`` rows of ``images`` (all of them when ``n >= len(images)``)."""
    if n >= len(images):
        return images
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]]


def evaluate_model(model: GenerativeModel, data_name: str, real: Tensor, n_samples: int,
                   held_out: Tensor | None = None, seed: int = 0, grid_to: str | Path | None = None,
                   progress: bool = False) -> dict[str, float | str]:
    """All the numbers of a run of ``model`` trained on dataset ``data_name``.

    ``real`` holds real data to compare samples with (uint8 images ``[N, C, H, W]``, the CLI passes the
    training set, as FID usually does; or toy points);
    ``held_out`` (test-split images or points) feeds ``model.evaluate`` when the family has a likelihood;
    ``grid_to``: a png path for an 8x8 grid of the first scored images (no extra sampling); ``progress``: bars
    while sampling and extracting features, a line before the held-out likelihood."""
    fake, rate = draw_samples(model, n_samples, progress=progress)
    if grid_to is not None and fake.dim() == 4:
        from genlib import viz

        viz.save_image_grid(fake[:64].float().cpu(), grid_to)
    out: dict[str, float | str] = {"eval_samples": len(fake), "samples_per_s": rate}
    if real.dim() == 2:
        out.update(toy_metrics(fake, data_name, seed))
    else:
        out.update(image_metrics(fake, held_out_subset(real, n_samples, seed), model.device, seed, progress=progress))
    if hasattr(model, "evaluate") and held_out is not None:
        if progress:  # the likelihood of a whole test split takes minutes on a CPU, with no bar of its own
            print(f"held-out likelihood of {len(held_out)} samples ...", flush=True)
        out.update({f"held_out_{k}": v for k, v in model.evaluate(held_out).items()})
    return out


def coverage_run(make_model: Callable[[], GenerativeModel], toy: gdata.Toy, seed: int, steps: int, batch_size: int,
                 n_data: int = 20_000, n_samples: int = 2500, device: str = "cpu", progress: bool = False,
                 desc: str = "", keep_samples: bool = False, track: Sequence[str] = (),
                 keep_model: bool = False, callback: Callable[[int, GenerativeModel], None] | None = None,
                 callback_every: int = 0) -> dict[str, Any]:
    """One seeded run on a Gaussian-mixture ``toy``, scored by mode coverage (the chapters' toy tables).

    Seeds everything with ``seed``, draws a fresh dataset of ``n_data`` points, builds the model,
    trains ``steps`` steps through :func:`genlib.train.fit` (the losses logged every ``steps // 10`` steps) and scores
    ``n_samples`` samples. Returns
    modes (covered), total_modes, hq (fraction within 3 std of a mode), mode_counts (the high-quality samples
    at each mode, :func:`genlib.metrics.mode_counts`), seconds (wall), cpu_seconds
    (process CPU time, stable on a shared machine) and diverged (a non-finite loss stopped the run;
    then modes = hq = 0 and every count 0); with ``keep_samples``, also samples: the scored samples [n_samples, 2]
    on the CPU; with ``track`` (names of logged losses), also history: each one's window means {name: [floats]}
    (empty lists for a diverged run); with ``keep_model``, also model: the trained model, moved to the CPU.
    ``callback`` / ``callback_every`` go to :func:`genlib.train.fit` (one that draws no random numbers leaves the run
    unchanged)."""
    if toy.modes is None or toy.std is None:
        raise ValueError(f"toy {toy.name!r} is not a Gaussian mixture; mode coverage needs modes and std")
    runtime.seed_everything(seed)
    dataset = toy.sample(n_data, torch.Generator().manual_seed(seed))
    sampler = gdata.BatchSampler(dataset, batch_size, device, seed=seed)
    model = make_model().to(device)
    began, cpu_began, diverged, samples = time.perf_counter(), time.process_time(), False, None
    history: dict[str, list[float]] = {name: [] for name in track}
    try:
        logged = fit(model, sampler, steps, log_every=max(steps // 10, 1), progress=progress, desc=desc,
                     callback=callback, callback_every=callback_every)
        samples = model.sample(n_samples).cpu()
        counts = metrics.mode_counts(samples, toy.modes, toy.std)
        missing = [name for name in track if name not in logged]
        if missing:
            raise ValueError(f"cannot track {', '.join(missing)}: the run logged "
                             f"{', '.join(name for name in logged if name != 'step')}")
        history = {name: logged[name] for name in track}
    except NonFiniteLossError:
        diverged, counts = True, torch.zeros(len(toy.modes), dtype=torch.int64)
    modes, high_quality = metrics.coverage_from_counts(counts, n_samples)
    row = {"modes": modes, "total_modes": len(toy.modes), "hq": high_quality, "mode_counts": counts.tolist(),
           "seconds": time.perf_counter() - began, "cpu_seconds": time.process_time() - cpu_began,
           "diverged": diverged}
    return (row | ({"history": history} if track else {}) | ({"samples": samples} if keep_samples else {})
            | ({"model": model.cpu()} if keep_model else {}))


def coverage_runs(runs: Sequence[tuple[Callable[[], GenerativeModel], int, str]], toy_name: str, steps: int,
                  batch_size: int, toy_options: Mapping[str, Any] | None = None, workers: int = 1,
                  cost: Sequence[float] | None = None, progress: bool = False, threads: int | None = 1,
                  **kw: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    """:func:`coverage_run` for each ``(make_model, seed, desc)`` of ``runs`` on ``gdata.toy(toy_name,
    **toy_options)``: yields ``(i, row)``, in order on one worker, else as the runs finish on ``workers``
    processes (:func:`genlib.runtime.parallel_map`; ``make_model`` must pickle, e.g. a ``functools.partial``
    of a class). Each run seeds itself, so the rows do not depend on ``workers``. Runs in this process use
    ``threads`` torch threads (None: unchanged; the toy networks run fastest on one, and several on a busy machine
    are far slower still), as the workers' processes do. ``kw`` go to :func:`coverage_run`; progress bars are shown
    on one worker only."""
    calls = [(make_model, toy_name, dict(toy_options or {}), seed, steps, batch_size, progress and workers == 1,
              desc, kw) for make_model, seed, desc in runs]
    with runtime.torch_threads(threads):
        yield from runtime.parallel_map(_coverage_run_on_named_toy, calls, workers, cost)


def _coverage_run_on_named_toy(make_model: Callable[[], GenerativeModel], toy_name: str,
                               toy_options: dict[str, Any], seed: int, steps: int, batch_size: int, progress: bool,
                               desc: str, kw: dict[str, Any]) -> dict[str, Any]:
    """:func:`coverage_run` with the toy built from its name (toys hold closures, which do not pickle)."""
    return coverage_run(make_model, gdata.toy(toy_name, **toy_options), seed, steps, batch_size, progress=progress,
                        desc=desc, **kw)
