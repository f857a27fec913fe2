"""Runtime: device choice, seeding, the run scale and a one-line description of a run.

The run scale is chosen by one environment variable, ``GENLIB_SCALE``: ``small`` (the
default, what CI and the committed notebooks run on a CPU) or ``full`` (GPU size).
Every experiment asks :func:`by_scale` for its sizes so that one switch changes them all.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np
import torch

SCALES = ("small", "full")
T = TypeVar("T")


class DeviceUnavailableError(RuntimeError):
    """Raised when a device is requested that this machine does not have."""


class MissingAssetError(RuntimeError):
    """Raised when weights or data that cannot be downloaded here (VGG16, Inception-v3) are not on this machine;
    the message says how to provide them or what to use instead."""


def scale() -> str:
    """The run scale from ``GENLIB_SCALE``: ``'small'`` (default) or ``'full'``."""
    value = os.environ.get("GENLIB_SCALE", "small").strip().lower() or "small"
    if value not in SCALES:
        raise ValueError(f"GENLIB_SCALE must be one of {SCALES}, got {value!r}")
    return value


def by_scale(small: T, full: T) -> T:
    """Return ``small`` or ``full`` according to the current run scale."""
    return full if scale() == "full" else small


def max_steps() -> int | None:
    """The cap ``GENLIB_MAX_STEPS`` puts on every :func:`genlib.train.fit` run (None when unset): it smoke-tests a
    notebook's full-scale path in minutes (``tools/smoke_full.py``); a capped run is not a result."""
    return positive_int_env("GENLIB_MAX_STEPS")


def positive_int_env(name: str) -> int | None:
    """The environment variable ``name`` as a positive integer (None when unset or blank); anything else is a
    ValueError naming the variable."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    if not (value.isascii() and value.isdecimal()) or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def make_folder(path: str | os.PathLike[str], name: str) -> Path:
    """Make the folder ``path`` (and its parents) now, not at the first save after hours of work; a path that cannot
    be a folder is a ValueError labelled ``name`` (e.g. ``--out``)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} {path} is a file, not a folder; name a folder (it is made if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{name} {path} cannot be made as a folder: {error.strerror or error}") from None
    return path


def device(name: str | None = None) -> torch.device:
    """Pick the device: ``name`` if given (``'cuda'``, ``'cpu'``, ``'cuda:1'``), else
    ``GENLIB_DEVICE``, else CUDA when available, else CPU. Asking for an absent GPU is an error."""
    name = name or os.environ.get("GENLIB_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(name)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"device {name!r} was requested but torch sees no CUDA GPU "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
            "use device='cpu' or install a CUDA build of torch"
        )
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise DeviceUnavailableError(f"device {name!r} was requested but torch sees {torch.cuda.device_count()} "
                                     f"CUDA GPU(s), numbered from 0")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceUnavailableError(f"device {name!r} was requested but this machine has no usable MPS "
                                     "(Apple GPU); use device='cpu'")
    if chosen.type not in ("cuda", "cpu", "mps"):
        raise ValueError(f"unsupported device type {chosen.type!r}; use 'cuda', 'mps' or 'cpu'")
    return chosen


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA); return a CPU generator seeded with ``seed``."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Run the block, then put back the global random states :func:`seed_everything` sets (Python, NumPy, torch's
    CPU and CUDA ones): a notebook cell that reseeds to rerun an experiment leaves later cells' draws unchanged."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def current_umask() -> int:
    """The process's file-creation mask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path: str | os.PathLike[str], write: Callable[[BinaryIO], Any]) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file in its folder, flushed to disk, then renamed
    over ``path``: a crash, of the process or the machine, leaves the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it private (0600); a plain open would not
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself, on disk: not every filesystem opens a folder
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads (``GENLIB_THREADS`` or all cores); return the number used."""
    threads = threads or positive_int_env("GENLIB_THREADS") or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with torch's intra-op threads set to ``threads`` (None: unchanged), restored after it: the
    small toy networks run fastest on one thread, and several threads on a busy machine are far slower still."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def use_fast_matmul(dev: torch.device) -> None:
    """Allow TF32 matmuls and cuDNN autotuning on CUDA (no effect on CPU)."""
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def native_bf16(dev: torch.device) -> bool:
    """Whether ``dev`` computes bf16 natively: a CUDA GPU of compute capability 8.0 or later (Ampere on).

    Older GPUs (a Colab T4 is 7.5) only emulate bf16, slowly and without cuDNN convolutions, although
    ``torch.cuda.is_bf16_supported()`` says yes by default; the CPU's autocast is not faster than fp32 here."""
    return dev.type == "cuda" and torch.cuda.get_device_capability(dev) >= (8, 0)


def device_name(dev: torch.device) -> str:
    """A human name for ``dev``: the GPU model, or the CPU with its core count."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def cpu_fingerprint(with_torch: bool = True) -> str:
    """What decides the CPU's floating-point rounding in torch: the processor's model name, the instruction set
    ATen dispatches to (AVX2, AVX512, ...) and (unless ``with_torch`` is False) torch's version. Two machines that
    differ here train the same seed to other numbers."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    machine = f"{model} | ATen {torch.backends.cpu.get_cpu_capability()}"
    return f"{machine} | torch {torch.__version__}" if with_torch else machine


def describe(seed: int, dev: torch.device | None = None, show_scale: bool = True) -> str:
    """One line saying what is being run: scale (unless ``show_scale`` is False: the CLI's flags set every size,
    not ``GENLIB_SCALE``), device, seed and versions."""
    from genlib import __version__

    dev = dev or device()
    return (
        (f"scale={scale()} | " if show_scale else "") + f"device={dev.type} [{device_name(dev)}] | seed={seed} | "
        f"genlib {__version__} | torch {torch.__version__}"
    )


def parallel_map(function: Callable[..., T], calls: Sequence[tuple[Any, ...]], workers: int = 1,
                 cost: Sequence[float] | None = None) -> Iterator[tuple[int, T]]:
    """Yield ``(i, function(*calls[i]))`` for every call: in order when ``workers`` is 1, else as they finish
    in ``workers`` fresh processes with one torch thread each (``function`` and the arguments must pickle).

    ``cost`` (one number per call) hands the costly calls out first, so no worker idles at the end while one
    long call finishes. Processes are spawned, not forked: a fork inherits the parent's OpenMP state, which
    can hang torch. Stopping early (an error, Ctrl-C, closing the iterator) cancels the calls not yet started and
    ends the running ones with their processes, so no orphaned worker trains on in the background."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers == 1 or len(calls) <= 1:  # a pool would only add the processes' start-up
        for i, args in enumerate(calls):
            yield i, function(*args)
        return
    import concurrent.futures
    import multiprocessing

    order = sorted(range(len(calls)), key=lambda i: -cost[i]) if cost is not None else range(len(calls))
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                                initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(function, *calls[i]): i for i in order}
        try:
            for future in concurrent.futures.as_completed(futures):
                yield futures[future], future.result()
        except BaseException:
            # shutdown alone lets a running call finish (minutes of training) in a worker that outlives us;
            # Python 3.14 has pool.terminate_workers(), earlier ones only the private process table
            running = list((getattr(pool, "_processes", None) or {}).values())
            manager = getattr(pool, "_executor_manager_thread", None)
            pool.shutdown(wait=False, cancel_futures=True)
            for process in running:
                process.terminate()
            for process in running:
                process.join()
            if manager is not None:  # it reaps the same processes; until it is done one may still look alive
                manager.join(timeout=30)
            raise


def _start_worker(parent: int) -> None:
    """Set up a :func:`parallel_map` worker: one torch thread, and (on Linux) death with its parent process, so that
    a parent killed outright (SIGKILL, or a SIGTERM it does not handle) leaves no worker training on; the parent
    keeps every finished result, so the worker has nothing to save."""
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), signal.SIGKILL)


def in_call_order(finished: Iterator[tuple[int, T]]) -> list[T]:
    """The results of :func:`parallel_map` (``(i, result)`` in any order) as a list in call order."""
    by_call = dict(finished)
    return [by_call[i] for i in range(len(by_call))]
