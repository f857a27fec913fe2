"""Tests for genlib.data: toys and their densities, image loaders and caches, the batch sampler."""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from genlib import data

FASHION = Path("/usr/share/datasets/fashion-mnist")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def isolated_data_home(tmp_path, monkeypatch):
    """No test reads or writes the user's ~/.cache/genlib."""
    monkeypatch.setenv("GENLIB_DATA", str(tmp_path / "genlib-data"))


# ---- toys ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(data.TOYS))
def test_toy_sampling_shape_and_determinism(name):
    t = data.toy(name)
    x = t.sample(500, gen(1))
    assert x.shape == (500, 2) and x.dtype == torch.float32 and torch.isfinite(x).all()
    torch.manual_seed(123)  # the global RNG must not matter
    assert torch.equal(x, t.sample(500, gen(1)))
    assert not torch.equal(x, t.sample(500, gen(2)))
    assert t.sample(0).shape == (0, 2)
    assert torch.equal(data.toy_dataset(name, 64, seed=5), t.sample(64, gen(5)))


def test_unknown_toy_lists_known_names():
    with pytest.raises(ValueError, match="ring8.*grid25"):
        data.toy("nine-gaussians")
    with pytest.raises(ValueError, match="toy .ring8. takes radius, std, not stdd"):
        data.toy_dataset("ring8", 10, stdd=0.1)


def test_ring8_has_8_distinct_modes_all_sampled():
    t = data.toy("ring8")
    assert t.modes.shape == (8, 2) and t.std == 0.02
    assert torch.allclose(t.modes.norm(dim=1), torch.full((8,), 2.0))
    gaps = torch.cdist(t.modes, t.modes) + 10 * torch.eye(8)
    assert gaps.min() > 1.5  # neighbours on a radius-2 circle are 4 sin(pi/8) = 1.53 apart
    nearest = torch.cdist(t.sample(8000, gen(0)), t.modes).argmin(dim=1)
    counts = torch.bincount(nearest, minlength=8)
    assert counts.min() > 850 and counts.max() < 1150
    bigger = data.toy("ring8", radius=3.0, std=0.5)
    assert torch.allclose(bigger.modes.norm(dim=1), torch.full((8,), 3.0)) and bigger.std == 0.5


def test_grid25_modes_and_spacing():
    t = data.toy("grid25")
    assert t.modes.shape == (25, 2) and t.std == 0.05
    assert sorted(set(t.modes[:, 0].tolist())) == [-4.0, -2.0, 0.0, 2.0, 4.0]
    assert len({tuple(m) for m in t.modes.tolist()}) == 25
    assert data.toy("grid25", spacing=1.0).modes.abs().max() == 2.0


def scipy_mixture_log_prob(x: np.ndarray, modes: np.ndarray, std: float, weights: np.ndarray) -> np.ndarray:
    per_mode = [multivariate_normal(m, std**2 * np.eye(2)).logpdf(x) for m in modes]
    return logsumexp(np.stack(per_mode, axis=1) + np.log(weights), axis=1)


@pytest.mark.parametrize(
    "t",
    [
        data.toy("ring8"),
        data.toy("ring8", std=0.3),
        data.toy("grid25"),
        data.gaussian_mixture([[0.0, 0.0], [1.0, -2.0], [3.0, 1.0]], std=0.7, weights=[0.2, 0.5, 0.3]),
    ],
    ids=["ring8", "ring8-wide", "grid25", "weighted"],
)
def test_mixture_log_prob_matches_scipy(t):
    x = torch.cat([t.sample(200, gen(0)), 4 * torch.randn(50, 2, generator=gen(1))]).double()
    expected = scipy_mixture_log_prob(x.numpy(), t.modes.double().numpy(), t.std, t.weights.double().numpy())
    np.testing.assert_allclose(t.log_prob(x).numpy(), expected, rtol=1e-9, atol=1e-9)
    assert t.log_prob(x.float()).dtype == torch.float32


def grid_integral(t: data.Toy, lo: float, hi: float, h: float) -> float:
    """Midpoint-rule integral of exp(log_prob) over [lo, hi]^2 with cells of side h."""
    axis = torch.arange(lo + h / 2, hi, h, dtype=torch.float64)
    points = torch.cartesian_prod(axis, axis)
    return float(t.log_prob(points).exp().sum() * h * h)


def test_densities_integrate_to_one():
    assert grid_integral(data.toy("ring8", std=0.3), -5, 5, 0.02) == pytest.approx(1.0, abs=1e-4)
    assert grid_integral(data.toy("checkerboard"), -5, 5, 0.05) == pytest.approx(1.0, abs=1e-6)


def test_checkerboard_support():
    t = data.toy("checkerboard")
    x = t.sample(5000, gen(0))
    assert torch.isfinite(t.log_prob(x)).all()
    assert x.min() >= -4 and x.max() < 4
    dark, light, outside = [-3.0, -3.0], [-1.0, -3.0], [4.5, 0.0]
    lp = t.log_prob(torch.tensor([dark, light, outside]))
    assert lp[0] == pytest.approx(-math.log(32)) and lp[1] == -math.inf and lp[2] == -math.inf


def test_mixture_sample_moments_match_closed_form():
    t = data.gaussian_mixture(data.toy("grid25").modes, std=0.5, weights=torch.linspace(1, 3, 25))
    x = t.sample(200_000, gen(3)).double()
    w, mu = t.weights.double(), t.modes.double()
    mean = w @ mu
    cov = (mu.T * w) @ mu - torch.outer(mean, mean) + t.std**2 * torch.eye(2, dtype=torch.float64)
    assert torch.allclose(x.mean(0), mean, atol=0.03)
    assert torch.allclose(torch.cov(x.T), cov, atol=0.12)


def test_checkerboard_samples_fill_each_dark_square_at_the_density_log_prob_gives():
    t = data.toy("checkerboard")
    n = 32_000
    x = t.sample(n, gen(4)).double().numpy()
    # the 64 unit squares of [-4, 4]^2 (each dark 2 x 2 cell holds four): expected counts n * density * area
    counts, _, _ = np.histogram2d(x[:, 0], x[:, 1], bins=8, range=[[-4, 4], [-4, 4]])
    centres = torch.cartesian_prod(*[torch.arange(-3.5, 4.0, dtype=torch.float64)] * 2)
    expected = n * t.log_prob(centres).exp().view(8, 8).numpy()
    assert set(np.unique(expected)) == {0.0, n / 32}
    assert (counts[expected == 0] == 0).all()
    np.testing.assert_allclose(counts[expected > 0], n / 32, atol=4 * math.sqrt(n / 32))  # binomial s.e. ~ 31


def test_moons_without_noise_lie_on_scikit_learns_two_half_circles_centred_at_zero():
    x = data.toy("moons", noise=0.0).sample(20_000, gen(0)).double()
    # make_moons's outer (cos t, sin t) and inner (1 - cos t, 1/2 - sin t), t in [0, pi], have mean (1/2, 1/4):
    # the toy subtracts it and doubles, so the data are centred
    assert x.mean(0).abs().max() < 0.05  # s.e. ~ 0.012
    y = x / 2 + torch.tensor([0.5, 0.25], dtype=torch.float64)
    outer = ((y.norm(dim=1) - 1).abs() < 1e-5) & (y[:, 1] >= -1e-6)
    centre = torch.tensor([1.0, 0.5], dtype=torch.float64)
    inner = (((y - centre).norm(dim=1) - 1).abs() < 1e-5) & (y[:, 1] <= 0.5 + 1e-6)
    assert (outer | inner).all()
    assert abs(outer.double().mean().item() - 0.5) < 0.02


def test_swissroll_lies_on_the_spiral_of_make_swiss_roll_scaled_with_its_noise():
    x = data.toy("swissroll", noise=0.0).sample(5000, gen(0)).double() / 0.2
    # make_swiss_roll: t = 1.5 pi (1 + 2 u) with u uniform, point t (cos t, sin t): radius t, angle t mod 2 pi
    r = x.norm(dim=1)
    assert r.min() >= 1.5 * math.pi - 1e-4 and r.max() <= 4.5 * math.pi + 1e-4
    gap = torch.remainder(torch.atan2(x[:, 1], x[:, 0]) - r, 2 * math.pi)
    assert ((gap < 1e-4) | (gap > 2 * math.pi - 1e-4)).all()
    quartiles = torch.quantile(r, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    np.testing.assert_allclose(quartiles.numpy(), math.pi * np.array([2.25, 3.0, 3.75]), atol=0.15)
    # noise N(0, 1) is added before scaling by 0.2: a point's distance from the (scaled) curve is |0.2 z|,
    # whose median is 0.2 * 0.674 (the arms are 2 pi * 0.2 apart, far beyond the noise)
    noisy = data.toy("swissroll").sample(1000, gen(1)).double()
    t = torch.linspace(1.5 * math.pi, 4.5 * math.pi, 5000, dtype=torch.float64)
    curve = 0.2 * torch.stack([t * t.cos(), t * t.sin()], dim=1)
    distance = torch.cdist(noisy, curve).min(dim=1).values
    assert distance.median().item() == pytest.approx(0.2 * 0.6745, rel=0.15)  # s.e. of the median ~ 4 %


def test_rings_without_noise_put_a_quarter_of_the_points_on_each_full_circle():
    radii = torch.tensor([0.75, 1.5, 2.25, 3.0], dtype=torch.float64)
    x = data.toy("rings", noise=0.0).sample(8000, gen(0)).double()
    off = (x.norm(dim=1)[:, None] - radii).abs()
    assert off.min(dim=1).values.max() < 1e-5
    quadrant = 2 * (x[:, 0] < 0).long() + (x[:, 1] < 0).long()  # the angle is uniform on the whole circle
    for counts in (torch.bincount(off.argmin(dim=1), minlength=4), torch.bincount(quadrant, minlength=4)):
        assert counts.min() > 2000 - 160 and counts.max() < 2000 + 160  # binomial s.e. ~ 39


def test_log_prob_without_closed_form_says_so():
    with pytest.raises(NotImplementedError, match="moons.*closed-form"):
        data.toy("moons").log_prob(torch.zeros(3, 2))
    for points in (torch.zeros(3, 3), torch.zeros(2), torch.zeros(3, 2, 1)):  # each half of the shape check
        with pytest.raises(ValueError, match=r"points of shape \[n, 2\]"):
            data.toy("ring8").log_prob(points)


@pytest.mark.parametrize("modes, std, weights, error", [
    ([[0.0, 0.0, 0.0]], 1.0, None, "modes"), ([0.0, 0.0], 1.0, None, "modes"), (torch.zeros(0, 2), 1.0, None, "modes"),
    ([[0.0, 0.0]], 0.0, None, "std"), ([[0.0, 0.0]], -1.0, None, "std"),
    ([[0.0, 0.0], [1.0, 1.0]], 1.0, [1.0], "weights"), ([[0.0, 0.0], [1.0, 1.0]], 1.0, [2.0, -1.0], "weights"),
    ([[0.0, 0.0], [1.0, 1.0]], 1.0, [0.0, 0.0], "weights")])
def test_a_gaussian_mixture_rejects_each_bad_argument_on_its_own(modes, std, weights, error):
    with pytest.raises(ValueError, match=error):
        data.gaussian_mixture(modes, std, weights)


@pytest.mark.parametrize("images", [torch.zeros(2, 1, 4, 4), torch.zeros(2, 4, 4, dtype=torch.uint8)])
def test_image_data_holds_only_uint8_images_with_four_dimensions(images):
    with pytest.raises(ValueError, match=r"images must be uint8 \[N, C, H, W\]"):
        data.ImageData(images, None, "bad")
    assert data.ImageData(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), None, "good").images.shape == (2, 1, 4, 4)


@pytest.mark.parametrize("resolution, crop_fraction", [(0, 0.5), (8, 0.0), (8, 1.5)])
def test_decode_folder_checks_its_resolution_and_crop_before_looking_for_images(tmp_path, resolution, crop_fraction):
    with pytest.raises(ValueError, match="need resolution >= 1 and 0 < crop_fraction <= 1"):
        data.decode_folder(tmp_path, resolution, crop_fraction, progress=False)


def test_a_gaussian_mixture_accepts_one_mode_and_zero_weights_beside_positive_ones():
    one = data.gaussian_mixture([[1.0, -1.0]], 0.5)
    assert torch.equal(one.weights, torch.ones(1))
    skewed = data.gaussian_mixture([[0.0, 0.0], [5.0, 5.0]], 0.1, weights=[0.0, 3.0])
    assert torch.equal(skewed.weights, torch.tensor([0.0, 1.0]))
    assert (skewed.sample(100, torch.Generator().manual_seed(0)).mean(0) > 4).all()  # all from the second mode


# ---- digits, IDX, CIFAR-10 ------------------------------------------------------------------------


def test_digits():
    d = data.load_images("digits")
    assert d.images.shape == (1797, 1, 8, 8) and d.images.dtype == torch.uint8
    assert d.images.max() == 255 and d.images.min() == 0
    from sklearn.datasets import load_digits

    # each 0..16 intensity becomes the nearest integer to it * 255 / 16
    assert np.abs(d.images[:, 0].numpy() - load_digits().images * 255 / 16).max() <= 0.5
    assert d.labels.dtype == torch.int64 and set(d.labels.tolist()) == set(range(10))


@pytest.mark.skipif(not FASHION.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian_package():
    d = data.load_images("fashion-mnist")
    assert d.images.shape == (60000, 1, 28, 28) and d.images.dtype == torch.uint8
    assert d.labels.dtype == torch.int64 and torch.equal(torch.bincount(d.labels), torch.full((10,), 6000))
    assert len(data.load_images("fashion-mnist", split="test")) == 10000


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> None:
    header = (magic or 0x0800 + array.ndim).to_bytes(4, "big")
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_idx_folder(folder: Path, n: int = 7) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)
    write_idx(folder / "train-images-idx3-ubyte.gz", images)
    write_idx(folder / "train-labels-idx1-ubyte.gz", labels)
    return images, labels


def test_idx_parser_on_fake_files(tmp_path):
    images, labels = fake_idx_folder(tmp_path / "fm")
    d = data.load_images("fashion-mnist", root=tmp_path / "fm", download=False)
    assert d.images.shape == (7, 1, 28, 28) and d.name == "fashion-mnist"
    assert np.array_equal(d.images[:, 0].numpy(), images) and np.array_equal(d.labels.numpy(), labels)
    # root/<name> is searched too, and MNIST shares the parser.
    fake_idx_folder(tmp_path / "mnist")
    assert len(data.load_images("mnist", root=tmp_path, download=False)) == 7


def test_idx_wrong_magic_and_truncation_are_clear(tmp_path):
    fake_idx_folder(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(7), magic=0x0803)
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte\.gz.*magic number 0x00000803.*0x00000801"):
        data.load_images("mnist", root=tmp_path, download=False)
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write((0x0803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (5, 28, 28)) + b"\0" * 100)
    with pytest.raises(ValueError, match="short.gz.*3920 bytes.*100 bytes follow"):
        data.read_idx(tmp_path / "short.gz", 3)
    (tmp_path / "notgz.gz").write_bytes(b"plain text")
    with pytest.raises(ValueError, match="notgz.gz"):
        data.read_idx(tmp_path / "notgz.gz", 1)


def test_missing_datasets_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_DATA", tmp_path / "no-system-data")
    nowhere = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*GENLIB_DATA"):
        data.load_images("fashion-mnist", root=nowhere, download=False)
    with pytest.raises(FileNotFoundError, match=f"{nowhere}.*ossci-datasets.*GENLIB_DATA"):
        data.load_images("mnist", root=nowhere, download=False)
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        data.load_images("cifar10", root=nowhere)
    with pytest.raises(FileNotFoundError, match="img_align_celeba.*--root"):
        data.load_images("celeba64", root=nowhere)
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
        data.load_images("folder", root=nowhere)


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="known datasets: digits, mnist, fashion-mnist, cifar10, celeba64, folder"):
        data.load_images("imagenet")
    with pytest.raises(ValueError, match="splits"):
        data.load_images("mnist", split="validation")


def write_cifar_batch(path: Path, images: np.ndarray, labels: list[int], bytes_keys: bool = True) -> None:
    content = {"data": images.reshape(len(images), -1), "labels": labels, "batch_label": "fake"}
    if bytes_keys:  # what the real Python 2 pickles look like when loaded with encoding="bytes"
        content = {k.encode(): v for k, v in content.items()}
    path.write_bytes(pickle.dumps(content))


def test_cifar10_on_fake_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8) for _ in range(5)]
    batches[0][0] = 0
    batches[0][0, 0] = 255  # first training image: pure red
    for i, b in enumerate(batches, start=1):
        write_cifar_batch(folder / f"data_batch_{i}", b, [i, 9 - i])
    write_cifar_batch(folder / "test_batch", np.zeros((3, 3, 32, 32), np.uint8), [0, 1, 2], bytes_keys=False)
    train = data.load_images("cifar10", root=tmp_path)
    assert train.images.shape == (10, 3, 32, 32) and train.images.dtype == torch.uint8
    assert np.array_equal(train.images.numpy(), np.concatenate(batches))
    assert (train.images[0, 0] == 255).all() and (train.images[0, 1:] == 0).all()
    assert train.labels.tolist() == [1, 8, 2, 7, 3, 6, 4, 5, 5, 4]
    assert data.load_images("cifar10", "test", root=folder).labels.tolist() == [0, 1, 2]


# ---- folders of images (CelebA, any) ------------------------------------------------------------

RED = (255, 0, 0)


def quadrant_colours(i: int) -> list[tuple[int, int, int]]:
    """Top-left, top-right, bottom-left, bottom-right colours of fake face ``i``."""
    return [(0, 40 * i, 200), (0, 200, 40 * i), (40 * i, 250, 250), (200, 200, 30 * i)]


def fake_face(i: int) -> Image.Image:
    """A 178x218 image, red except the central 140x140 box (19..159 x 39..179) split in 4 colours."""
    img = Image.new("RGB", (178, 218), RED)
    for (dx, dy), colour in zip([(0, 0), (70, 0), (0, 70), (70, 70)], quadrant_colours(i)):
        img.paste(colour, (19 + dx, 39 + dy, 19 + dx + 70, 39 + dy + 70))
    return img


@pytest.fixture
def faces(tmp_path) -> Path:
    """tmp/img_align_celeba with 3 PNG faces and 3 JPEG faces in a subfolder (sorted = index order), named as CelebA's
    first six (000001 to 000006)."""
    folder = tmp_path / "img_align_celeba"
    (folder / "sub").mkdir(parents=True)
    for i in range(6):
        path = folder / f"{i + 1:06d}.png" if i < 3 else folder / "sub" / f"{i + 1:06d}.jpg"
        fake_face(i).save(path, quality=95, subsampling=0) if i >= 3 else fake_face(i).save(path)
    (folder / "notes.txt").write_text("not an image")
    return tmp_path


def assert_quadrants(image: torch.Tensor, i: int, tol: int, margin: int) -> None:
    """Each 64x64 quadrant has its colour, from ``margin`` px off the outer border (where a wrong
    crop would let red in) to 4 px off the centre lines (where Lanczos filtering rings)."""
    near, far = slice(margin, 28), slice(36, 64 - margin)
    for (rows, cols), colour in zip([(near, near), (near, far), (far, near), (far, far)], quadrant_colours(i)):
        block = image[:, rows, cols].int()
        diff = (block - torch.tensor(colour)[:, None, None]).abs().max()
        assert diff <= tol, f"image {i} quadrant {(rows, cols)} differs by {diff}"


def test_celeba64_centre_crop_and_cache(faces, monkeypatch):
    cache = faces / "cache"
    calls = []
    decode_all = data._decode_all
    monkeypatch.setattr(data, "_decode_all", lambda *a, **k: calls.append(1) or decode_all(*a, **k))
    d = data.load_images("celeba64", root=faces, cache_dir=cache, workers=1, progress=False)
    assert d.images.shape == (6, 3, 64, 64) and d.images.dtype == torch.uint8 and d.labels is None
    assert calls == [1]
    for i in range(3):  # PNG: exact, right up to the border, so no red leaked in from outside the crop
        assert_quadrants(d.images[i], i, tol=1, margin=0)
    for i in range(3, 6):  # JPEG: lossy near edges, check block interiors
        assert_quadrants(d.images[i], i, tol=6, margin=4)
    assert len(list(cache.glob("celeba64-64px-*.npy"))) == 1 and len(list(cache.glob("*.json"))) == 1
    assert not list(cache.glob("*.tmp")) and not list(cache.glob(".*"))

    def no_decoding(*a, **k):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(data, "_decode_all", no_decoding)
    assert torch.equal(data.load_images("celeba64", root=faces, cache_dir=cache, progress=False).images, d.images)

    # A new file changes the key: decode again (and the root may be the image folder itself).
    monkeypatch.setattr(data, "_decode_all", decode_all)
    fake_face(6).save(faces / "img_align_celeba" / "000007.png")
    again = data.load_images("celeba64", root=faces / "img_align_celeba", cache_dir=cache, workers=1, progress=False)
    assert len(again) == 7 and torch.equal(again.images[:3], d.images[:3])


def test_celeba64_splits_follow_celeba_s_own_partition(tmp_path):
    """Each split holds the images whose numbers lie in its part of CelebA's partition, in the folder's order, and
    equals those rows of the whole decoded folder (a slice when contiguous, a gather when a subfolder breaks the
    order)."""
    folder = tmp_path / "img_align_celeba"
    (folder / "sub").mkdir(parents=True)
    numbers = {"000001": 0, "162770": 1, "162771": 2, "182637": 3, "182638": 4, "202599": 5, "sub/000002": 6}
    for name, i in numbers.items():
        fake_face(i).save(folder / f"{name}.png")
    kw = dict(root=tmp_path, cache_dir=tmp_path / "c", workers=1, progress=False)
    whole = data.decode_folder(folder, 64, data.CELEBA_CROP, tag="celeba64", cache_dir=tmp_path / "c", progress=False)
    order = sorted(numbers, key=lambda name: str(folder / name))  # list_images' order
    assert data.celeba_numbers(data.list_images(folder)) == [int(name.split("/")[-1]) for name in order]
    expected = {"train": ["000001", "162770", "sub/000002"], "valid": ["162771", "182637"],
                "test": ["182638", "202599"]}
    for split, names in expected.items():
        images = data.load_images("celeba64", split=split, **kw).images
        assert torch.equal(images, whole[[order.index(name) for name in names]]), split
    assert sum(last - first + 1 for first, last in data.CELEBA_PARTITION.values()) == 202_599  # CelebA's size


def test_celeba64_refuses_names_no_split_can_place_and_empty_splits(tmp_path):
    folder = tmp_path / "img_align_celeba"
    folder.mkdir()
    fake_face(0).save(folder / "000001.png")
    with pytest.raises(ValueError, match="holds no image of CelebA's test split"):
        data.load_images("celeba64", split="test", root=tmp_path, cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="has splits"):
        data.load_images("celeba64", split="dev", root=tmp_path, cache_dir=tmp_path / "c", progress=False)
    for wrong in ("face.png", "000000.png", "202600.png"):
        fake_face(1).save(folder / wrong)
        with pytest.raises(ValueError, match=f"{wrong}: not a CelebA image name.*--data folder"):
            data.load_images("celeba64", root=tmp_path, cache_dir=tmp_path / "c", progress=False)
        (folder / wrong).unlink()


def test_parallel_decoding_matches_serial(faces):
    kw = dict(root=faces, progress=False)
    serial = data.load_images("celeba64", cache_dir=faces / "c1", workers=1, **kw)
    parallel = data.load_images("celeba64", cache_dir=faces / "c2", workers=2, **kw)
    assert torch.equal(serial.images, parallel.images)


def test_folder_crops_central_square_at_any_resolution(tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    wide = Image.new("RGB", (100, 60), (0, 255, 0))
    wide.paste((0, 0, 255), (20, 0, 80, 60))  # the central 60x60 square is blue
    wide.save(folder / "a.png")
    Image.new("L", (30, 50), 77).save(folder / "b.bmp")  # greyscale becomes RGB
    d = data.load_images("folder", root=folder, resolution=32, cache_dir=tmp_path / "c", progress=False)
    assert d.images.shape == (2, 3, 32, 32)
    assert (d.images[0] - torch.tensor([0, 0, 255], dtype=torch.uint8)[:, None, None]).abs().max() <= 1
    assert (d.images[1] == 77).all()


def test_empty_folder_is_named(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=f"no images.*{tmp_path / 'empty'}"):
        data.load_images("folder", root=tmp_path / "empty", cache_dir=tmp_path / "c")


@pytest.mark.parametrize("workers", [1, 2])
def test_corrupt_image_is_named(faces, workers):
    bad = faces / "img_align_celeba" / "sub" / "000005.jpg"
    bad.write_bytes(bad.read_bytes()[:300])  # truncated JPEG
    with pytest.raises(ValueError, match=f"cannot decode image {bad}"):
        data.load_images("celeba64", root=faces, cache_dir=faces / "c", workers=workers, progress=False)
    assert not list((faces / "c").glob("*.npy")) if (faces / "c").exists() else True


# ---- batches ------------------------------------------------------------------------------------


def test_uint8_float_round_trip():
    pixels = torch.arange(256, dtype=torch.uint8)
    x = data.to_float(pixels)
    assert x.dtype == torch.float32 and x[0] == -1 and x[-1] == 1
    assert torch.equal(data.to_uint8(x), pixels)
    assert data.to_uint8(torch.tensor([-3.0, 0.0, 3.0])).tolist() == [0, 128, 255]
    with pytest.raises(TypeError):
        data.to_float(x)


def take(sampler: data.BatchSampler, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(sampler) for _ in range(k)]


def test_sampler_epochs_indices_and_determinism():
    points = data.toy_dataset("moons", 10, seed=0)
    sampler = data.BatchSampler(points, batch_size=3, seed=7)
    assert sampler.batches_per_epoch == 3
    batches = take(sampler, 6)
    for x, index in batches:
        assert x.dtype == torch.float32 and index.dtype == torch.int64 and torch.equal(x, points[index])
    for epoch in (batches[:3], batches[3:]):
        seen = torch.cat([index for _, index in epoch])
        assert len(set(seen.tolist())) == 9  # one permutation per epoch, last point dropped
    assert sampler.epoch == 2
    torch.manual_seed(0)  # the global RNG must not matter
    again = take(data.BatchSampler(points, batch_size=3, seed=7), 6)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    other = take(data.BatchSampler(points, batch_size=3, seed=8), 6)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(batches, other))


@pytest.mark.parametrize("steps_before", [0, 2, 3, 5])
def test_sampler_resumes_exactly(steps_before):
    points = torch.randn(10, 2, generator=gen(0))
    a = data.BatchSampler(points, batch_size=3, seed=1)
    take(a, steps_before)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    expected = take(a, 7)
    b = data.BatchSampler(points, batch_size=3, seed=99)
    b.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    resumed = take(b, 7)
    assert all(torch.equal(x[1], y[1]) and torch.equal(x[0], y[0]) for x, y in zip(expected, resumed))
    assert b.epoch == a.epoch
    with pytest.raises(ValueError, match="batches of"):
        data.BatchSampler(points, batch_size=2).load_state_dict(a.state_dict())


@pytest.mark.parametrize("on_device", [None, False])
def test_sampler_uint8_images_become_floats_in_range(on_device, device):
    images = torch.randint(0, 256, (20, 1, 4, 4), dtype=torch.uint8, generator=gen(0))
    images[0, 0, 0, 0], images[1, 0, 0, 0] = 0, 255
    labels = torch.arange(20) % 10
    sampler = data.BatchSampler(images, batch_size=20, device=device, seed=0, labels=labels, on_device=on_device)
    x, index = next(sampler)
    assert sampler.data.dtype == torch.uint8  # stored compactly
    assert x.dtype == torch.float32 and x.shape == (20, 1, 4, 4) and x.device.type == device.type
    assert x.min() == -1 and x.max() == 1
    assert torch.equal(data.to_uint8(x).cpu(), images[index.cpu()])
    assert torch.equal(sampler.labels[index].cpu(), labels[index.cpu()])
    # the batches are the CPU sampler's, whichever device holds the data
    assert torch.equal(index.cpu(), next(data.BatchSampler(images, batch_size=20, seed=0))[1])


def test_sampler_validates():
    with pytest.raises(ValueError, match="batch_size"):
        data.BatchSampler(torch.zeros(5, 2), batch_size=6)
    with pytest.raises(ValueError, match="non-empty"):
        data.BatchSampler(torch.zeros(0, 2), batch_size=1)
    with pytest.raises(ValueError, match="labels"):
        data.BatchSampler(torch.zeros(5, 2), batch_size=2, labels=torch.zeros(4))
    for bad_batch in (0, -1):
        with pytest.raises(ValueError, match="batch_size"):
            data.BatchSampler(torch.zeros(5, 2), batch_size=bad_batch)
    with pytest.raises(ValueError, match="non-empty"):
        data.BatchSampler(torch.tensor(3.0), batch_size=1)  # a scalar has no rows
    # the edges that are fine: one row, batches of one, the whole set, 1-D data (a batch of scalars)
    assert next(data.BatchSampler(torch.full((1, 2), 7.0), batch_size=1))[0].tolist() == [[7.0, 7.0]]
    assert sorted(next(data.BatchSampler(torch.arange(5.0), batch_size=5))[0].tolist()) == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_ring8_modes_sit_at_angles_2_pi_k_over_8_from_the_x_axis():
    k = np.arange(8)
    expected = 2.0 * np.stack([np.cos(2 * np.pi * k / 8), np.sin(2 * np.pi * k / 8)], axis=1)
    np.testing.assert_allclose(data.toy("ring8").modes.numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(data.toy("ring8", radius=3.0).modes.numpy(), 1.5 * expected, atol=1e-6)


def test_sampler_uses_every_full_batch_when_the_batch_size_divides_the_data():
    points = torch.arange(12.0)[:, None].expand(12, 2).contiguous()
    sampler = data.BatchSampler(points, batch_size=3, seed=4)
    assert sampler.batches_per_epoch == 4
    batches = [next(sampler) for _ in range(8)]
    for epoch in (batches[:4], batches[4:]):
        seen = torch.cat([index for _, index in epoch])
        assert sorted(seen.tolist()) == list(range(12))  # each row exactly once per epoch, none dropped
    assert sampler.epoch == 2


@pytest.mark.parametrize("suffix", [".png", ".bmp"])  # a new png has another size; a bmp of the same shape, the same
def test_folder_cache_is_invalidated_when_a_file_is_replaced_by_another_of_the_same_name(tmp_path, suffix):
    folder, cache = tmp_path / "pics", tmp_path / "cache"
    folder.mkdir()
    path = folder / f"a{suffix}"
    Image.new("RGB", (16, 16), (0, 0, 255)).save(path)
    first = data.load_images("folder", root=folder, resolution=8, cache_dir=cache, progress=False)
    assert (first.images[0, 2] == 255).all()
    size, mtime = path.stat().st_size, path.stat().st_mtime_ns
    noise = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)  # same name, other content
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))  # a later time, even on a coarse-grained file system
    assert (path.stat().st_size == size) == (suffix == ".bmp")
    again = data.load_images("folder", root=folder, resolution=8, cache_dir=cache, progress=False)
    expected = data.decode_image(path, 8)
    assert np.array_equal(again.images[0].numpy(), expected)


def lanczos_weights(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] Lanczos-3 resampling matrix by the textbook recipe (each output pixel a normalised
    window of sinc(x) sinc(x / 3), widened by the downscale factor), written from the definition, not from PIL."""
    scale = size_in / size_out
    stretch = max(scale, 1.0)
    centres = (np.arange(size_out) + 0.5) * scale
    offsets = (np.arange(size_in)[None] + 0.5 - centres[:, None]) / stretch
    weights = np.where(np.abs(offsets) < 3, np.sinc(offsets) * np.sinc(offsets / 3), 0.0)
    return weights / weights.sum(1, keepdims=True)


def test_decode_image_crops_the_central_square_and_resizes_it_as_lanczos_3_filtering_does(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)  # h x w: wider than tall
    Image.fromarray(pixels).save(tmp_path / "noise.png")
    decoded = data.decode_image(tmp_path / "noise.png", 12, crop_fraction=0.8)
    square = pixels[4:36, 9:41].astype(np.float64)  # side round(0.8 * 40) = 32, left (50 - 32) // 2, top 4
    rows = cols = lanczos_weights(32, 12)
    expected = np.einsum("ij,jkc,lk->cil", rows, square, cols)
    assert decoded.shape == (3, 12, 12) and decoded.dtype == np.uint8
    # PIL rounds to 8 bits between its two passes: one level of difference at most
    assert np.abs(decoded - expected.clip(0, 255)).max() <= 1.0
