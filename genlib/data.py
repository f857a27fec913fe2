"""Data for every chapter: 2-D toy distributions, image datasets and a GPU-friendly batch sampler.

* :func:`toy` builds a :class:`Toy` (``ring8``, ``grid25``, ``moons``, ``swissroll``,
  ``checkerboard``, ``rings``); mixtures and the checkerboard have an exact ``log_prob``.
* :func:`load_images` returns an :class:`ImageData` of uint8 ``[N, C, H, W]`` images
  (``digits``, ``mnist``, ``fashion-mnist``, ``cifar10``, ``celeba64``, ``folder``).
  Folders of JPEG/PNG files are decoded once, in parallel, into a cached ``.npy`` array.
* :class:`BatchSampler` yields ``(x, index)`` minibatches forever; uint8 images stay uint8 in
  storage and become float in ``[-1, 1]`` on the device, one batch at a time.

Files are searched for in ``root``, then ``$GENLIB_DATA`` (default ``~/.cache/genlib``), then
``/usr/share/datasets`` (where Debian's ``dataset-fashion-mnist`` package puts Fashion-MNIST).
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import json
import math
import os
import pickle
import sys
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from genlib import runtime

# --------------------------------------------------------------------------------------
# 2-D toy distributions
# --------------------------------------------------------------------------------------

Draw = Callable[[int, torch.Generator | None], Tensor]


@dataclass(frozen=True, eq=False)
class Toy:
    """A 2-D distribution: ``sample(n)`` gives ``[n, 2]`` float32 points; mixtures also carry
    their ``modes [k, 2]``, per-component ``std`` and ``weights [k]``."""

    name: str
    draw: Draw = field(repr=False)
    modes: Tensor | None = None
    std: float | None = None
    weights: Tensor | None = None
    density: Callable[[Tensor], Tensor] | None = field(default=None, repr=False)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` points ``[n, 2]`` (float32, CPU); deterministic given a CPU ``generator``."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n == 0:
            return torch.empty(0, 2)
        return self.draw(n, generator).to(torch.float32)

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log density ``[n]`` at points ``x [n, 2]`` (``-inf`` outside the support)."""
        if self.density is None:
            raise NotImplementedError(
                f"toy {self.name!r} has no closed-form density; only the Gaussian mixtures "
                "(ring8, grid25, gaussian_mixture) and checkerboard have log_prob. "
                "Use a sample-based comparison (e.g. a KDE or an MMD) instead."
            )
        if x.ndim != 2 or x.shape[1] != 2:
            raise ValueError(f"log_prob expects points of shape [n, 2], got {tuple(x.shape)}")
        return self.density(x)


def gaussian_mixture(
    modes: Tensor | Sequence[Sequence[float]],
    std: float,
    weights: Tensor | Sequence[float] | None = None,
    name: str = "mixture",
) -> Toy:
    """A mixture of isotropic Gaussians ``N(modes[k], std^2 I)`` with ``weights`` (uniform if None)."""
    modes = torch.as_tensor(modes, dtype=torch.float32)
    if modes.ndim != 2 or modes.shape[1] != 2 or len(modes) == 0:
        raise ValueError(f"modes must have shape [k, 2], got {tuple(modes.shape)}")
    if std <= 0:
        raise ValueError(f"std must be positive, got {std}")
    k = len(modes)
    w = torch.full((k,), 1.0 / k) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    if w.shape != (k,) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"weights must be {k} non-negative numbers with a positive sum")
    w = w / w.sum()

    def draw(n: int, generator: torch.Generator | None) -> Tensor:
        which = torch.multinomial(w, n, replacement=True, generator=generator)
        return modes[which] + std * torch.randn(n, 2, generator=generator)

    def density(x: Tensor) -> Tensor:
        mu = modes.to(x)
        sq_dist = (x[:, None, :] - mu[None, :, :]).pow(2).sum(-1)  # [n, k]
        log_normal = -sq_dist / (2 * std**2) - math.log(2 * math.pi * std**2)
        return torch.logsumexp(log_normal + w.to(x).log(), dim=1)

    return Toy(name, draw, modes=modes, std=float(std), weights=w, density=density)


def _ring8(radius: float = 2.0, std: float = 0.02) -> Toy:
    """8 Gaussians on a circle of ``radius`` (WGAN-GP's toy); angles 2*pi*k/8 for k = 0..7."""
    # arange, not linspace(0, 2*pi, 8): linspace includes 2*pi and so repeats the first mode.
    angles = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8
    modes = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    return gaussian_mixture(modes, std, name="ring8")


def _grid25(spacing: float = 2.0, std: float = 0.05) -> Toy:
    """25 Gaussians on a 5x5 grid ``spacing * {-2..2}^2`` (default {-4,-2,0,2,4}^2)."""
    axis = spacing * torch.arange(-2, 3, dtype=torch.float64)
    modes = torch.cartesian_prod(axis, axis)
    return gaussian_mixture(modes, std, name="grid25")


def _checkerboard(cells: int = 4, side: float = 2.0) -> Toy:
    """Uniform on the dark squares of a ``cells x cells`` board of ``side``-wide squares centred
    at 0; the default covers [-4, 4]^2 like FFJORD's checkerboard."""
    lower = -cells * side / 2
    ij = torch.cartesian_prod(torch.arange(cells), torch.arange(cells))
    dark = ij[(ij.sum(1) % 2) == 0]
    corners = lower + side * dark.to(torch.float32)
    log_density = -math.log(len(dark) * side**2)

    def draw(n: int, generator: torch.Generator | None) -> Tensor:
        which = torch.randint(len(dark), (n,), generator=generator)
        return corners[which] + side * torch.rand(n, 2, generator=generator)

    def density(x: Tensor) -> Tensor:
        cell = torch.floor((x - lower) / side)
        on_board = ((cell >= 0) & (cell < cells)).all(dim=1)
        on_dark = (cell.sum(dim=1) % 2) == 0
        inside = torch.full_like(x[:, 0], log_density)
        return torch.where(on_board & on_dark, inside, torch.full_like(inside, -math.inf))

    return Toy("checkerboard", draw, density=density)


def _moons(noise: float = 0.05) -> Toy:
    """Two interleaved half circles (scikit-learn's ``make_moons``), centred and scaled by 2."""

    def draw(n: int, generator: torch.Generator | None) -> Tensor:
        upper = torch.randint(2, (n, 1), generator=generator).bool()
        t = math.pi * torch.rand(n, generator=generator)
        outer = torch.stack([t.cos(), t.sin()], dim=1)
        inner = torch.stack([1 - t.cos(), 0.5 - t.sin()], dim=1)
        x = torch.where(upper, outer, inner) + noise * torch.randn(n, 2, generator=generator)
        return 2 * (x - torch.tensor([0.5, 0.25]))

    return Toy("moons", draw)


def _swissroll(noise: float = 1.0, scale: float = 0.2) -> Toy:
    """A 2-D Swiss roll (``make_swiss_roll`` projected on x-z) times ``scale``, as in FFJORD."""

    def draw(n: int, generator: torch.Generator | None) -> Tensor:
        t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator))
        x = torch.stack([t * t.cos(), t * t.sin()], dim=1)
        return scale * (x + noise * torch.randn(n, 2, generator=generator))

    return Toy("swissroll", draw)


def _rings(radii: Sequence[float] = (0.75, 1.5, 2.25, 3.0), noise: float = 0.08) -> Toy:
    """Concentric circles of ``radii`` (equally likely) blurred by Gaussian ``noise``."""
    r = torch.as_tensor(radii, dtype=torch.float32)

    def draw(n: int, generator: torch.Generator | None) -> Tensor:
        which = torch.randint(len(r), (n,), generator=generator)
        t = 2 * math.pi * torch.rand(n, generator=generator)
        x = r[which, None] * torch.stack([t.cos(), t.sin()], dim=1)
        return x + noise * torch.randn(n, 2, generator=generator)

    return Toy("rings", draw)


TOYS: dict[str, Callable[..., Toy]] = {
    "ring8": _ring8,
    "grid25": _grid25,
    "moons": _moons,
    "swissroll": _swissroll,
    "checkerboard": _checkerboard,
    "rings": _rings,
}


def toy(name: str, **kw: Any) -> Toy:
    """The toy distribution ``name`` (see ``TOYS``), with keyword overrides such as ``std=0.1``."""
    if name not in TOYS:
        raise ValueError(f"unknown toy {name!r}; known toys: {', '.join(TOYS)}")
    options = inspect.signature(TOYS[name]).parameters
    unknown = sorted(set(kw) - set(options))
    if unknown:
        raise ValueError(f"toy {name!r} takes {', '.join(options) or 'no options'}, not {', '.join(unknown)}")
    return TOYS[name](**kw)


def toy_dataset(name: str, n: int, seed: int = 0, **kw: Any) -> Tensor:
    """A fixed dataset ``[n, 2]`` of ``n`` points from toy ``name``, drawn with ``seed``."""
    return toy(name, **kw).sample(n, torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------
# Image datasets
# --------------------------------------------------------------------------------------

SYSTEM_DATA = Path("/usr/share/datasets")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
CELEBA_CROP = 140 / 178  # the usual 140x140 centre crop of the 178x218 aligned faces
CELEBA_PARTITION = {"train": (1, 162_770), "valid": (162_771, 182_637), "test": (182_638, 202_599)}
"""CelebA's recommended partition (its list_eval_partition.txt) as ranges of image numbers: 000001.jpg is the first."""
CACHE_VERSION = 1

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_URLS = {
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
}
CIFAR_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
HOW_TO_GET = {
    "fashion-mnist": (
        "Install it with `sudo apt-get install dataset-fashion-mnist` (files go to "
        "/usr/share/datasets/fashion-mnist), or download the four *-ubyte.gz files from "
        f"{IDX_URLS['fashion-mnist']} into $GENLIB_DATA/fashion-mnist "
        "(GENLIB_DATA defaults to ~/.cache/genlib), or pass root=<folder holding them>."
    ),
    "mnist": (
        "There is no Debian package: download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        f"t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz from {IDX_URLS['mnist']} into "
        "$GENLIB_DATA/mnist (GENLIB_DATA defaults to ~/.cache/genlib), or pass root=<folder holding them>."
    ),
    "cifar10": (
        "Download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, unpack it with "
        "`tar xzf cifar-10-python.tar.gz -C $GENLIB_DATA` (GENLIB_DATA defaults to ~/.cache/genlib) "
        "so that $GENLIB_DATA/cifar-10-batches-py/data_batch_1 exists, or pass root=<folder>."
    ),
    "celeba64": (
        "Download img_align_celeba.zip ('Align&Cropped Images') from "
        "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html, unzip it into a folder DIR so that "
        "DIR/img_align_celeba/000001.jpg exists, and pass --root DIR (root=DIR), or unzip it into "
        "$GENLIB_DATA/celeba (GENLIB_DATA defaults to ~/.cache/genlib)."
    ),
}


@dataclass
class ImageData:
    """A dataset of ``images [N, C, H, W]`` uint8 in 0..255 with int64 ``labels [N]`` or None."""

    images: Tensor
    labels: Tensor | None
    name: str

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels is not None and len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.labels)} labels for {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)


def data_home() -> Path:
    """The data folder: ``$GENLIB_DATA``, default ``~/.cache/genlib``."""
    return Path(os.environ.get("GENLIB_DATA") or "~/.cache/genlib").expanduser()


def load_images(
    name: str,
    split: str = "train",
    root: str | os.PathLike[str] | None = None,
    *,
    resolution: int = 64,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    download: bool = True,
    progress: bool = True,
) -> ImageData:
    """Load image dataset ``name`` as uint8 ``[N, C, H, W]`` (see the module docstring for names).

    ``split`` is ``'train'`` or ``'test'`` for mnist, fashion-mnist and cifar10, and also ``'valid'`` for celeba64
    (CelebA's own partition, :data:`CELEBA_PARTITION`); digits and folder have no split and only accept ``'train'``
    (all images). ``resolution``, ``cache_dir``, ``workers`` and ``progress`` concern decoded folders (``celeba64``
    is always 64x64); ``download`` lets mnist/fashion-mnist be fetched into ``$GENLIB_DATA`` when missing.
    """
    folder_opts = dict(cache_dir=cache_dir, workers=workers, progress=progress)
    loaders: dict[str, Callable[[], ImageData]] = {
        "digits": lambda: _load_digits(split),
        "mnist": lambda: _load_idx("mnist", split, root, download),
        "fashion-mnist": lambda: _load_idx("fashion-mnist", split, root, download),
        "cifar10": lambda: _load_cifar10(split, root),
        "celeba64": lambda: _load_celeba64(split, root, **folder_opts),
        "folder": lambda: _load_image_folder(split, root, resolution, **folder_opts),
    }
    if name not in loaders:
        raise ValueError(f"unknown image dataset {name!r}; known datasets: {', '.join(loaders)}")
    return loaders[name]()


def _check_split(name: str, split: str, allowed: Sequence[str]) -> None:
    """Raise ValueError unless ``split`` is one of ``allowed`` for dataset ``name``."""
    if split not in allowed:
        raise ValueError(f"dataset {name!r} has splits {list(allowed)}, got {split!r}")


def _not_found(name: str, looked_in: Sequence[Path], note: str = "") -> FileNotFoundError:
    """The error for a dataset that is nowhere: where we looked and how to get it."""
    places = ", ".join(str(p) for p in looked_in) or "(nowhere)"
    return FileNotFoundError(f"dataset {name!r} not found; looked in: {places}. {HOW_TO_GET[name]}{note}")


def _search_dirs(root: str | os.PathLike[str] | None, subdir: str) -> list[Path]:
    """Where a dataset may live, in order: ``root``, ``root/subdir``, ``$GENLIB_DATA/subdir``,
    ``/usr/share/datasets/subdir``."""
    dirs = [] if root is None else [Path(root).expanduser(), Path(root).expanduser() / subdir]
    return dirs + [data_home() / subdir, SYSTEM_DATA / subdir]


# ---- digits --------------------------------------------------------------------------


def _load_digits(split: str) -> ImageData:
    """scikit-learn's 1,797 8x8 digits, 0..16 rescaled to 0..255, as ``[1797, 1, 8, 8]``."""
    from sklearn.datasets import load_digits  # heavy import, only paid by the digits chapters

    _check_split("digits", split, ["train"])
    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return ImageData(torch.from_numpy(images), torch.from_numpy(bunch.target.astype(np.int64)), "digits")


# ---- IDX (mnist, fashion-mnist) ------------------------------------------------------


def read_idx(path: str | os.PathLike[str], ndim: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (gzipped if it ends in .gz) with ``ndim`` dimensions
    (3 for images ``[N, H, W]``, 1 for labels ``[N]``), checking its magic number and size."""
    path = Path(path)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read IDX file ({e})") from e
    header = 4 + 4 * ndim  # magic, then one big-endian uint32 per dimension
    expected = 0x0800 + ndim  # 0x08 = unsigned byte data
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= header else None
    if magic != expected:
        found = "a truncated header" if magic is None else f"magic number {magic:#010x}"
        raise ValueError(
            f"{path}: not an IDX file of {ndim}-D unsigned bytes: found {found}, expected magic "
            f"number {expected:#010x}; the file is corrupt or is not a {'n image' if ndim == 3 else ' label'} file"
        )
    dims = [int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4)]
    data = np.frombuffer(raw, np.uint8, offset=header)
    if data.size != math.prod(dims):
        raise ValueError(f"{path}: IDX header says shape {dims} ({math.prod(dims)} bytes) but {data.size} bytes follow")
    return data.reshape(dims)


def _idx_pair(folder: Path, split: str) -> tuple[Path, Path] | None:
    """The (images, labels) IDX files of ``split`` in ``folder``, gzipped or not, or None."""
    found = []
    for stem in IDX_FILES[split]:
        candidates = [folder / f"{stem}.gz", folder / stem]
        found.append(next((p for p in candidates if p.is_file()), None))
    return None if None in found else (found[0], found[1])


def _load_idx(name: str, split: str, root: str | os.PathLike[str] | None, download: bool) -> ImageData:
    """MNIST or Fashion-MNIST ``split`` as ``[N, 1, 28, 28]`` uint8 with labels 0..9."""
    _check_split(name, split, list(IDX_FILES))
    dirs = _search_dirs(root, name)
    pair = next((p for p in (_idx_pair(d, split) for d in dirs) if p is not None), None)
    note = ""
    if pair is None and download:
        note = _try_download_idx(name, split)
        pair = _idx_pair(data_home() / name, split)
    if pair is None:
        raise _not_found(name, dirs, note)
    images, labels = read_idx(pair[0], 3), read_idx(pair[1], 1)
    if len(images) != len(labels):
        raise ValueError(f"{pair[0]} holds {len(images)} images but {pair[1]} holds {len(labels)} labels")
    return ImageData(torch.from_numpy(images[:, None].copy()), torch.from_numpy(labels.astype(np.int64)), name)


def _try_download_idx(name: str, split: str) -> str:
    """Fetch ``split`` of ``name`` into ``$GENLIB_DATA/name``; return '' or why it failed."""
    try:
        for stem in IDX_FILES[split]:
            url, dest = IDX_URLS[name] + stem + ".gz", data_home() / name / f"{stem}.gz"
            print(f"downloading {url} -> {dest}", file=sys.stderr)
            with urllib.request.urlopen(url, timeout=30) as response:
                runtime.write_atomically(dest, lambda f: f.write(response.read()))
    except OSError as e:  # URLError and socket timeouts are OSErrors
        return f" (Downloading failed: {e}.)"
    return ""


# ---- CIFAR-10 ------------------------------------------------------------------------


def _load_cifar10(split: str, root: str | os.PathLike[str] | None) -> ImageData:
    """CIFAR-10 ``split`` from the python pickle batches as ``[N, 3, 32, 32]`` uint8, labels 0..9."""
    _check_split("cifar10", split, list(CIFAR_BATCHES))
    dirs = _search_dirs(root, "cifar-10-batches-py")[:-1]  # no Debian package for CIFAR-10
    folder = next((d for d in dirs if all((d / b).is_file() for b in CIFAR_BATCHES[split])), None)
    if folder is None:
        raise _not_found("cifar10", dirs)
    images, labels = [], []
    for batch in CIFAR_BATCHES[split]:
        with open(folder / batch, "rb") as f:
            # The batches are (trusted) Python 2 pickles; bytes keys keep them loadable.
            content = pickle.load(f, encoding="bytes")
        data = np.asarray(_pickle_field(content, "data", folder / batch), dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{folder / batch}: expected data of shape [N, 3072], got {data.shape}")
        images.append(data.reshape(-1, 3, 32, 32))  # rows are R, G, B planes of 32x32
        labels.append(np.asarray(_pickle_field(content, "labels", folder / batch), dtype=np.int64))
    return ImageData(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)), "cifar10")


def _pickle_field(content: dict, key: str, path: Path) -> Any:
    """``content[key]`` whether the pickle's keys are str or bytes."""
    for k in (key.encode(), key):
        if k in content:
            return content[k]
    raise ValueError(f"{path}: not a CIFAR-10 batch (no {key!r} entry)")


# ---- folders of images (CelebA, anything) ------------------------------------------------


def _load_celeba64(split: str, root: str | os.PathLike[str] | None, **opts: Any) -> ImageData:
    """CelebA aligned faces of one part of :data:`CELEBA_PARTITION`: 140x140 centre crop of each 178x218 JPEG,
    resized to 64x64 RGB (the whole folder is decoded and cached once; a split is a slice of it)."""
    _check_split("celeba64", split, list(CELEBA_PARTITION))
    dirs = [] if root is None else [Path(root).expanduser() / "img_align_celeba"]
    if root is not None and Path(root).name == "img_align_celeba":
        dirs.insert(0, Path(root).expanduser())
    dirs += [data_home() / "celeba" / "img_align_celeba", data_home() / "img_align_celeba"]
    folder = next((d for d in dirs if d.is_dir()), None)
    if folder is None:
        raise _not_found("celeba64", dirs)
    first, last = CELEBA_PARTITION[split]
    paths = list_images(folder)  # listed once: 202,599 files
    rows = [i for i, number in enumerate(celeba_numbers(paths)) if first <= number <= last]
    if not rows:
        raise ValueError(f"{folder} holds no image of CelebA's {split} split (numbers {first:06d} to {last:06d})")
    images = decode_folder(folder, 64, CELEBA_CROP, tag="celeba64", paths=paths, **opts)
    # CelebA's zero-padded names sort by number, so a split is one slice of the cache: no copy of 2 GB
    contiguous = rows == list(range(rows[0], rows[-1] + 1))
    return ImageData(images[rows[0]:rows[-1] + 1] if contiguous else images[rows], None, "celeba64")


def celeba_numbers(paths: Sequence[Path]) -> list[int]:
    """The CelebA image number of each image file (000001.jpg is 1), in order; a file named otherwise is an error,
    since the split could not place it."""
    last = CELEBA_PARTITION["test"][1]
    numbers = [int(path.stem) if path.stem.isdigit() else 0 for path in paths]
    for path, number in zip(paths, numbers):
        if not 1 <= number <= last:
            raise ValueError(f"{path}: not a CelebA image name (000001.jpg to {last:06d}.jpg), "
                             "so no split can place it; train on other images with --data folder")
    return numbers


def _load_image_folder(split: str, root: str | os.PathLike[str] | None, resolution: int, **opts: Any) -> ImageData:
    """Every image under ``root`` (recursively), central square crop, resized to ``resolution``."""
    _check_split("folder", split, ["train"])
    if root is None:
        raise ValueError("dataset 'folder' needs root=<a folder of .jpg/.png/... images> (--root on the command line)")
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"image folder {folder} does not exist; pass root=<a folder of "
            f"{'/'.join(sorted(IMAGE_EXTENSIONS))} images> (searched recursively)"
        )
    return ImageData(decode_folder(folder, resolution, 1.0, tag="folder", **opts), None, "folder")


def list_images(folder: Path) -> list[Path]:
    """The image files under ``folder`` (recursive, by extension), in sorted order."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def decode_folder(
    folder: Path,
    resolution: int,
    crop_fraction: float,
    tag: str = "folder",
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    progress: bool = True,
    paths: Sequence[Path] | None = None,
) -> Tensor:
    """All images under ``folder`` as uint8 ``[N, 3, resolution, resolution]``, each cropped to
    its central square of side ``crop_fraction * min(width, height)`` and resized (``paths``: the
    folder's :func:`list_images`, when the caller has listed it already).

    The result is cached as ``.npy`` + ``.json`` in ``cache_dir`` (default ``$GENLIB_DATA/cache``),
    keyed by the folder, its file names and sizes, the resolution and the crop; a later call with
    the same key loads the cache instead of decoding.
    """
    if resolution < 1 or not 0 < crop_fraction <= 1:
        raise ValueError(f"need resolution >= 1 and 0 < crop_fraction <= 1, got {resolution}, {crop_fraction}")
    paths = list(paths) if paths is not None else list_images(folder)
    if not paths:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {folder}")
    meta = _cache_meta(folder, paths, resolution, crop_fraction)
    stem = Path(cache_dir or data_home() / "cache").expanduser() / f"{tag}-{resolution}px-{meta['key'][:16]}"
    cached = _read_cache(stem, meta)
    if cached is not None:
        return torch.from_numpy(cached)
    array = _decode_all(paths, resolution, crop_fraction, workers or os.cpu_count() or 1, progress)
    runtime.write_atomically(stem.with_suffix(".npy"), lambda f: np.save(f, array))
    # The JSON is written last: it marks the .npy as complete.
    runtime.write_atomically(stem.with_suffix(".json"), lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return torch.from_numpy(array)


def _cache_meta(folder: Path, paths: Sequence[Path], resolution: int, crop_fraction: float) -> dict[str, Any]:
    """What identifies a decoded folder: the hash of its files' names, sizes and modification times, their count,
    the resolution and the crop (a file replaced by another of the same size has another time)."""
    files = hashlib.sha256()
    for p in paths:
        status = p.stat()
        files.update(f"{p.relative_to(folder)}\t{status.st_size}\t{status.st_mtime_ns}\n".encode())
    meta = {
        "version": CACHE_VERSION,
        "folder": str(folder.resolve()),
        "count": len(paths),
        "files_sha256": files.hexdigest(),
        "resolution": resolution,
        "crop_fraction": crop_fraction,
    }
    meta["key"] = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    return meta


def _read_cache(stem: Path, meta: dict[str, Any]) -> np.ndarray | None:
    """The cached array at ``stem`` if its JSON matches ``meta`` and its shape is right, else None."""
    try:
        if json.loads(stem.with_suffix(".json").read_text()) != meta:
            return None
        array = np.load(stem.with_suffix(".npy"))
    except (OSError, ValueError):  # absent or unreadable: decode again
        return None
    expected = (meta["count"], 3, meta["resolution"], meta["resolution"])
    return array if array.shape == expected and array.dtype == np.uint8 else None


def _decode_all(
    paths: Sequence[Path], resolution: int, crop_fraction: float, workers: int, progress: bool
) -> np.ndarray:
    """Decode ``paths`` into ``[N, 3, R, R]`` uint8, in chunks over ``workers`` processes."""
    from tqdm.auto import tqdm

    out = np.empty((len(paths), 3, resolution, resolution), np.uint8)
    size = max(1, min(256, math.ceil(len(paths) / (8 * workers))))  # several chunks per worker balance the load
    chunks = [(a, min(a + size, len(paths))) for a in range(0, len(paths), size)]
    files = [str(p) for p in paths]  # plain strings pickle cheaply to the workers
    with tqdm(total=len(paths), desc=f"decoding {Path(paths[0]).parent}", unit="img", disable=not progress) as bar:
        if workers <= 1 or len(chunks) == 1:
            for a, b in chunks:
                out[a:b] = _decode_chunk(files[a:b], resolution, crop_fraction)
                bar.update(b - a)
            return out
        with ProcessPoolExecutor(workers) as pool:
            futures = {pool.submit(_decode_chunk, files[a:b], resolution, crop_fraction): (a, b) for a, b in chunks}
            try:
                for future in as_completed(futures):
                    a, b = futures[future]
                    out[a:b] = future.result()
                    bar.update(b - a)
            except BaseException:
                pool.shutdown(cancel_futures=True)  # a bad file stops the run without decoding the rest
                raise
    return out


def _decode_chunk(paths: Sequence[str], resolution: int, crop_fraction: float) -> np.ndarray:
    """Decode a list of image files into ``[k, 3, R, R]`` uint8 (runs in a worker process)."""
    return np.stack([decode_image(p, resolution, crop_fraction) for p in paths])


def decode_image(path: str | os.PathLike[str], resolution: int, crop_fraction: float = 1.0) -> np.ndarray:
    """One image file as RGB uint8 ``[3, R, R]``: central square of side
    ``crop_fraction * min(w, h)``, resized with Lanczos filtering. Bad files raise ValueError."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")  # forces the full decode, so truncated files fail here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode image {path}: {e}") from e
    w, h = rgb.size
    side = max(1, round(crop_fraction * min(w, h)))
    left, top = (w - side) // 2, (h - side) // 2
    square = rgb.crop((left, top, left + side, top + side))
    return np.asarray(square.resize((resolution, resolution), Image.Resampling.LANCZOS)).transpose(2, 0, 1)


# --------------------------------------------------------------------------------------
# Minibatches
# --------------------------------------------------------------------------------------


def to_float(x: Tensor) -> Tensor:
    """uint8 pixels 0..255 -> float32 in [-1, 1] (same shape, same device)."""
    if x.dtype != torch.uint8:
        raise TypeError(f"to_float expects uint8, got {x.dtype}")
    return x.to(torch.float32).div_(127.5).sub_(1.0)


def to_uint8(x: Tensor) -> Tensor:
    """Floats in [-1, 1] (clamped) -> uint8 pixels 0..255, rounded to nearest (same shape)."""
    return x.detach().clamp(-1.0, 1.0).add(1.0).mul_(127.5).round_().to(torch.uint8)


def _fits_on_device(data: Tensor, device: torch.device) -> bool:
    """Whether ``data`` may live on ``device``: always off CUDA, else under half its free memory."""
    if device.type != "cuda":
        return True
    free, _total = torch.cuda.mem_get_info(device)
    return data.numel() * data.element_size() < 0.5 * free


class BatchSampler(Iterator[tuple[Tensor, Tensor]]):
    """Infinite random minibatches ``(x [B, ...] float32, index [B] int64)`` on ``device``.

    Each epoch is a fresh permutation from the sampler's own CPU generator (deterministic,
    independent of the global RNG, the same on every device); the last incomplete batch is
    dropped. uint8 data is stored as uint8 and mapped to [-1, 1] per batch on the device.
    The data lives on the device when it fits (under half the free GPU memory, or ``on_device``);
    otherwise each batch is gathered on the CPU into pinned memory and copied asynchronously.
    ``labels [N]``, if given, are kept on the device as ``self.labels`` (use ``labels[index]``).
    """

    def __init__(
        self,
        data: Tensor,
        batch_size: int,
        device: torch.device | str = "cpu",
        seed: int = 0,
        labels: Tensor | None = None,
        on_device: bool | None = None,
    ) -> None:
        if data.ndim == 0 or len(data) == 0:
            raise ValueError("BatchSampler needs a non-empty dataset")
        if not 1 <= batch_size <= len(data):
            raise ValueError(f"batch_size must be in 1..{len(data)} (the dataset size), got {batch_size}")
        if labels is not None and len(labels) != len(data):
            raise ValueError(f"{len(labels)} labels for {len(data)} data points")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.size = len(data)
        self.resident = _fits_on_device(data, self.device) if on_device is None else on_device
        self.data = data.to(self.device) if self.resident else data.cpu().contiguous()
        self.labels = None if labels is None else torch.as_tensor(labels).to(self.device)
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self._epoch_rng = self.generator.get_state()  # generator state just before this epoch's permutation
        self._order: Tensor | None = None
        self._position = 0

    @property
    def batches_per_epoch(self) -> int:
        """Full batches in one pass over the data."""
        return self.size // self.batch_size

    def __next__(self) -> tuple[Tensor, Tensor]:
        """The next ``(x, index)``: x float32 ``[B, ...]`` and index int64 ``[B]``, both on the device."""
        if self._order is None or self._position + self.batch_size > self.size:
            self._epoch_rng = self.generator.get_state()
            self._order = torch.randperm(self.size, generator=self.generator)
            self._position = 0
            self.epoch += 1
        index = self._order[self._position : self._position + self.batch_size]
        self._position += self.batch_size
        # non_blocking from pageable memory still stages the copy at once, without a device sync.
        index_on_device = index.to(self.device, non_blocking=True)
        x = self.data[index_on_device] if self.resident else self._transfer(index)
        return (to_float(x) if x.dtype == torch.uint8 else x.to(torch.float32)), index_on_device

    def _transfer(self, index: Tensor) -> Tensor:
        """Gather rows ``index`` on the CPU and copy them to the device (via pinned memory on CUDA)."""
        pin = self.device.type == "cuda"
        # A fresh buffer from torch's caching host allocator is not reused while its copy is in flight.
        batch = torch.empty((len(index), *self.data.shape[1:]), dtype=self.data.dtype, pin_memory=pin)
        torch.index_select(self.data, 0, index, out=batch)
        return batch.to(self.device, non_blocking=pin)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume the exact sequence of batches (small: no permutation stored)."""
        return {
            "size": self.size,
            "batch_size": self.batch_size,
            "epoch": self.epoch,
            "position": self._position,
            "epoch_rng": self._epoch_rng.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the following batches are the ones the saved sampler would give."""
        if (state["size"], state["batch_size"]) != (self.size, self.batch_size):
            raise ValueError(
                f"state is for {state['size']} points in batches of {state['batch_size']}, "
                f"this sampler has {self.size} in batches of {self.batch_size}"
            )
        # A checkpoint loaded with map_location="cuda" carries this CPU generator's state on the GPU.
        epoch_rng = state["epoch_rng"].cpu()
        self.generator.set_state(epoch_rng)
        self._epoch_rng = epoch_rng.clone()
        self.epoch, self._position = int(state["epoch"]), int(state["position"])
        # Re-drawing this epoch's permutation also leaves the generator where the saved one was.
        self._order = torch.randperm(self.size, generator=self.generator) if self.epoch > 0 else None
