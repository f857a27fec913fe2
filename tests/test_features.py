"""Tests of genlib.features: the offline feature networks behind the sample-quality metrics."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from genlib import data, features
from genlib.data import ImageData

CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {504, 967, 968}  # coffee mug, espresso, cup


def test_fashion_classifier_shapes() -> None:
    model = features.FashionClassifier().eval()
    x = torch.rand(5, 1, 28, 28) * 2 - 1
    assert model.features(x).shape == (5, 128)
    assert model(x).shape == (5, 10)
    torch.testing.assert_close(model.probs(x).sum(1), torch.ones(5))
    assert features.count_parameters(model) < 300_000
    with pytest.raises(ValueError, match="28, 28"):
        model.features(torch.zeros(2, 1, 32, 32))


def test_augment_keeps_shape_and_range() -> None:
    x = torch.rand(8, 1, 28, 28) * 2 - 1
    y = features._augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1


def test_augment_flips_horizontally_and_shifts_by_up_to_two_pixels_each_way() -> None:
    base = torch.rand(28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1  # no symmetry: one origin each
    out = features._augment(base.expand(1000, 1, 28, 28).clone(), torch.Generator().manual_seed(0))
    # by hand: every left-right flip (or none) and every shift by -2..2 rows and columns, padded with black (-1)
    candidates = []
    for image in (base, base.flip(-1)):
        padded = np.pad(image.numpy(), 2, constant_values=-1.0)
        candidates += [padded[dy:dy + 28, dx:dx + 28] for dy in range(5) for dx in range(5)]
    match = (out[:, 0, None] == torch.from_numpy(np.stack(candidates))[None]).flatten(2).all(2)  # [1000, 50]
    assert (match.sum(1) == 1).all()  # each output is one flip-and-shift of the input
    assert match.any(0).all()  # and all 50 of them occur (each has chance 1/50 per image)


@pytest.mark.parametrize("batch_size", [1, 3, 7, 100])
def test_batched_applies_the_network_to_every_image_once_in_order(batch_size) -> None:
    images = torch.randint(0, 256, (7, 1, 2, 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    seen = []
    out = features._batched(lambda x: seen.append(len(x)) or 3 * x.flatten(1), images, batch_size, torch.device("cpu"))
    expected = 3 * (images.double() / 127.5 - 1).flatten(1)  # uint8 -> [-1, 1], then the network
    torch.testing.assert_close(out, expected.float())
    assert sum(seen) == 7 and max(seen) == min(batch_size, 7)
    with pytest.raises(ValueError, match="batch_size"):
        features._batched(lambda x: x, images, 0, torch.device("cpu"))
    assert features._batched(lambda x: x, images[:0], batch_size, torch.device("cpu")).numel() == 0


def linear_classifier_scores(linear: torch.nn.Linear, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """By hand in float64: accuracy and mean softmax cross-entropy of ``linear`` on the flattened [-1, 1] pixels of
    uint8 ``images``."""
    pixels = images.double().numpy().reshape(len(images), -1) / 127.5 - 1
    logits = pixels @ linear.weight.detach().double().numpy().T + linear.bias.detach().double().numpy()
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return {"accuracy": float(np.mean(logits.argmax(1) == labels.numpy())),
            "loss": float(-np.mean(log_probs[np.arange(len(images)), labels.numpy()]))}


def test_evaluate_classifier_reports_accuracy_and_mean_cross_entropy_in_eval_mode() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 3)
    model = torch.nn.Sequential(torch.nn.Flatten(), linear, torch.nn.Dropout(0.5)).train()
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (10, 1, 2, 2), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 3, (10,), generator=g)
    got = features.evaluate_classifier(model, images, labels, batch_size=4)
    assert model.training  # the caller's mode is restored
    # by hand, with dropout off (eval mode)
    assert got == pytest.approx(linear_classifier_scores(linear, images, labels), rel=1e-5)


def test_committed_classifier_is_accurate() -> None:
    data = pytest.importorskip("genlib.data")
    try:
        test = data.load_images("fashion-mnist", split="test", download=False)
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST is not available on this machine")
    images, labels = test.images[:2000], test.labels[:2000]
    accuracy = features.evaluate_classifier(features.load_fashion_classifier("cpu"), images, labels)["accuracy"]
    assert accuracy >= 0.88
    probs = features.fashion_probs(images[:64], device="cpu")
    assert probs.shape == (64, 10) and torch.allclose(probs.sum(1), torch.ones(64), atol=1e-5)
    # uint8 and [-1, 1] float inputs give the same features
    from genlib.data import to_float

    torch.testing.assert_close(features.fashion_features(images[:16], device="cpu"),
                               features.fashion_features(to_float(images[:16]), device="cpu"))


def test_asset_provenance_records_the_command() -> None:
    meta = json.loads(features.CLASSIFIER_NPZ.with_suffix(".json").read_text())
    assert meta["command"] == f"python -m genlib classifier --epochs {meta['epochs']} --seed {meta['seed']}"
    assert (meta["epochs"], meta["seed"]) == (features.DEFAULT_EPOCHS, 0)  # the asset is what the defaults make
    assert meta["test_accuracy"] >= 0.88 and meta["parameters"] < 300_000
    assert features.CLASSIFIER_NPZ.stat().st_size < 1.5 * 2**20


def test_save_load_round_trip_is_exact(tmp_path) -> None:
    torch.manual_seed(0)
    model = features.FashionClassifier(width=4, feature_dim=8)
    model.train()
    model(torch.randn(16, 1, 28, 28))  # moves the BatchNorm running statistics away from their defaults
    model.eval()
    path = tmp_path / "tiny.npz"
    path_json = features.save_classifier(model, path, {"command": "test", "seed": 0})
    loaded = features.load_classifier(path, "cpu")
    x = torch.randn(6, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x)) and torch.equal(model.features(x), loaded.features(x))
    meta = json.loads(path_json.read_text())
    assert meta["parameters"] == features.count_parameters(model) and meta["config"]["width"] == 4
    with np.load(path) as arrays:
        assert all(arrays[k].dtype == np.float32 for k in arrays.files if k != "__config__")


def _grey_levels(n: int, seed: int) -> ImageData:
    """A stand-in for Fashion-MNIST: ``n`` uint8 [n, 1, 28, 28] images whose class k (0..4 of the 10 labels) is a
    flat grey of level 45 k + 30 with noise of +-8: flips and shifts keep the class, and a small net learns it in a
    few steps whatever the training seed (ten tried reach test accuracy 1; levels 20 apart stopped some at 0.895)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (n,), generator=g)
    noise = torch.randint(-8, 9, (n, 1, 28, 28), generator=g)
    return ImageData((labels[:, None, None, None] * 45 + 30 + noise).to(torch.uint8), labels, "grey-levels")


@pytest.fixture
def grey_fashion(monkeypatch) -> dict[str, ImageData]:
    """Fashion-MNIST replaced by :func:`_grey_levels` (600 train, 200 test images) for the classifier's training."""
    splits = {"train": _grey_levels(600, 0), "test": _grey_levels(200, 1)}
    monkeypatch.setattr(data, "load_images", lambda name, split: splits[split])
    return splits


def test_epoch_reports_the_mean_loss_and_accuracy_over_all_images() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 3)
    model = torch.nn.Sequential(torch.nn.Flatten(), linear)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the model stays as it is, so the epoch's means are exact
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 256, (20, 1, 2, 2), dtype=torch.uint8, generator=g), torch.randint(0, 3, (20,), generator=g)

    class Bar:
        updates, postfix = 0, {}

        def update(self, n):
            self.updates += n

        def set_postfix(self, **postfix):
            self.postfix = postfix

    bar = Bar()
    loss, accuracy = features._epoch(model, opt, sched, x, y, 7, torch.Generator().manual_seed(2), False, bar)
    expected = linear_classifier_scores(linear, x, y)  # over all 20 images: batches of 7, 7 and 6, weighted by size
    assert (loss, accuracy) == pytest.approx((expected["loss"], expected["accuracy"]), rel=1e-5)
    assert bar.updates == 3 and bar.postfix == {"loss": f"{expected['loss']:.3f}", "acc": f"{expected['accuracy']:.3f}"}


def test_train_fashion_classifier_learns_reproducibly_and_reports_its_run(grey_fashion) -> None:
    def train():
        return features.train_fashion_classifier(epochs=3, batch_size=30, seed=3, device="cpu", progress=False)

    started = time.perf_counter()
    model, info = train()
    assert 0 < info["train_seconds"] <= time.perf_counter() - started + 0.1
    assert not model.training
    test = grey_fashion["test"]
    expected = features.evaluate_classifier(model, test.images, test.labels)
    assert info["test_accuracy"] == round(expected["accuracy"], 5) >= 0.9
    assert info["test_loss"] == round(expected["loss"], 5)
    assert (info["n_train"], info["n_test"], info["epochs"], info["batch_size"], info["seed"]) == (600, 200, 3, 30, 3)
    assert [row["epoch"] for row in info["history"]] == [1, 2, 3]
    assert info["history"][-1]["train_loss"] < info["history"][0]["train_loss"]
    assert info["augment"].startswith("random horizontal flip")
    again, _ = train()  # the seed fixes the order, the augmentation and the initial weights
    assert all(torch.equal(value, again.state_dict()[key]) for key, value in model.state_dict().items())
    _, other_seed = features.train_fashion_classifier(epochs=1, batch_size=50, seed=4, device="cpu",
                                                      progress=False, augment=False)
    assert other_seed["augment"] == "none" and len(other_seed["history"]) == 1
    with pytest.raises(ValueError, match="epochs"):
        features.train_fashion_classifier(epochs=0)


def test_train_fashion_classifier_progress_bar_counts_every_step(grey_fashion, capsys) -> None:
    features.train_fashion_classifier(epochs=2, batch_size=64, device="cpu", progress=True)
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert any(line.startswith("fashion classifier: 100%") and "20/20" in line for line in bar)  # 2 x ceil(600/64)


def test_main_train_classifier_writes_an_asset_that_loads_and_scores_as_recorded(grey_fashion, tmp_path) -> None:
    out_dir = tmp_path / "new" / "assets"  # made, parents too
    npz = features.main_train_classifier(out_dir=str(out_dir), epochs=1, seed=2, progress=False)
    assert npz == out_dir / features.CLASSIFIER_NPZ.name
    meta = json.loads(npz.with_suffix(".json").read_text())
    assert meta["command"] == "python -m genlib classifier --epochs 1 --seed 2"
    test = grey_fashion["test"]
    rescored = features.evaluate_classifier(features.load_classifier(npz, "cpu"), test.images, test.labels)
    assert meta["test_accuracy"] == round(rescored["accuracy"], 5)


def test_missing_asset_gives_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(features, "CLASSIFIER_NPZ", tmp_path / "fashion_classifier.npz")
    with pytest.raises(FileNotFoundError, match="python -m genlib classifier"):
        features.load_fashion_classifier("cpu")


@pytest.fixture(scope="module")
def lite0() -> features.EfficientNetLite0:
    return features.load_efficientnet_lite0("cpu")


def _photo(name: str) -> torch.Tensor:
    """A scikit-image colour photo as [1, 3, 224, 224] in [-1, 1], centre-cropped to a square."""
    skdata = pytest.importorskip("skimage.data")
    x = torch.from_numpy(getattr(skdata, name)()).permute(2, 0, 1)[None]
    h, w = x.shape[-2:]
    side = min(h, w)
    x = x[..., (h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
    return features.to_rgb(features.as_unit_range(x), 224)


def test_efficientnet_loads_strictly_every_checkpoint_tensor(lite0) -> None:
    raw = torch.load(features.efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    ours = lite0.state_dict()
    mapped = {features.map_lite0_key(k): v for k, v in raw.items()}
    assert set(mapped) == set(ours)
    assert all(mapped[k].shape == ours[k].shape for k in ours)
    assert features.count_parameters(lite0) == 4_652_008


@pytest.mark.parametrize("photo, expected", [("chelsea", CAT_CLASSES), ("coffee", COFFEE_CLASSES)])
def test_efficientnet_classifies_real_photos(lite0, photo, expected) -> None:
    with torch.no_grad():
        top = lite0(_photo(photo)).argmax(1).item()
    assert top in expected


def test_feature_shapes_for_grayscale_28px() -> None:
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    assert features.efficientnet_features(images, resolution=64, device="cpu").shape == (3, 1280)
    assert features.feature_extractor("efficientnet-lite0")(images[:1]).shape == (1, 1280)
    if features.CLASSIFIER_NPZ.is_file():
        assert features.feature_extractor("fashion-classifier")(images).shape == (3, 128)


def test_unknown_extractor_lists_names() -> None:
    with pytest.raises(ValueError, match="fashion-classifier.*efficientnet-lite0.*inception"):
        features.feature_extractor("vgg16")


def test_inception_unavailable_raises_clear_error(monkeypatch) -> None:
    monkeypatch.delenv(features.INCEPTION_ENV, raising=False)
    assert not features.inception_features_available()
    with pytest.raises(RuntimeError, match="FD with"):
        features.inception_features(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_inception_is_available_with_torchvision_and_a_weights_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(features, "_torchvision_available", lambda: True)
    monkeypatch.delenv(features.INCEPTION_ENV, raising=False)
    assert not features.inception_features_available()
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"not read")
    monkeypatch.setenv(features.INCEPTION_ENV, str(weights))
    assert features.inception_features_available()


def test_inception_needs_torchvision_even_with_a_file(tmp_path, monkeypatch) -> None:
    try:
        import torchvision  # noqa: F401
        pytest.skip("torchvision is installed here")
    except Exception:
        pass
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"not used")
    monkeypatch.setenv(features.INCEPTION_ENV, str(weights))
    assert not features.inception_features_available()
    with pytest.raises(RuntimeError, match="not available offline"):
        features.feature_extractor("inception")(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


# ----------------------------------------------------------------------------- VGG16 (optional weights)


def test_vgg16_unavailable_raises_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(features.VGG16_ENV, raising=False)
    assert not features.vgg16_weights_available()
    with pytest.raises(RuntimeError, match="GENLIB_VGG16_WEIGHTS.*efficientnet-lite0"):
        features.vgg16_features(torch.zeros(1, 1, 28, 28, dtype=torch.uint8))
    monkeypatch.setenv(features.VGG16_ENV, str(tmp_path / "missing.pth"))
    assert not features.vgg16_weights_available()
    with pytest.raises(RuntimeError, match="vgg16-397923af.pth"):
        features.load_vgg16(device="cpu")


def imagenet_normalised(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] RGB images [n, 3, h, w] -> [0, 1], then ImageNet's per-channel mean and std, written out by hand."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean) / std


def test_vgg16_random_weights_load_strictly_and_give_the_documented_features(tmp_path, monkeypatch) -> None:
    torch.manual_seed(0)
    state = features.VGG16Features().state_dict()
    assert len(state) == 26  # 13 convolutions, weight and bias each, as in torchvision's vgg16().features
    # VGG16 has 138,357,544 parameters, 123,642,856 of them in its three fully connected layers
    assert features.count_parameters(features.VGG16Features()) == 138_357_544 - 123_642_856
    path = tmp_path / "vgg16.pth"
    torch.save(state | {"classifier.6.bias": torch.zeros(3)}, path)  # torchvision's head is ignored
    monkeypatch.setenv(features.VGG16_ENV, str(path))
    images = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    feats = features.vgg16_features(images, device="cpu")
    expected_dim = 64 * 28 * 28 + 128 * 14 * 14 + 256 * 7 * 7 + 512 * 3 * 3
    assert feats.shape == (2, expected_dim) == (2, features.vgg16_feature_dim(28, 28))
    # relu1_2 by hand: grey -> RGB in [0, 1], ImageNet normalisation, conv-relu-conv-relu, divided by its size
    x = imagenet_normalised(features.as_unit_range(images).expand(-1, 3, -1, -1))
    h = torch.relu(torch.nn.functional.conv2d(x, state["features.0.weight"], state["features.0.bias"], padding=1))
    h = torch.relu(torch.nn.functional.conv2d(h, state["features.2.weight"], state["features.2.bias"], padding=1))
    torch.testing.assert_close(feats[:, :64 * 28 * 28], h.flatten(1) / (64 * 28 * 28), rtol=1e-4, atol=1e-7)
    model = features.load_vgg16(path, "cpu")
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():  # non-square: each pool halves height and width separately, rounding down
        wide = model.perceptual(torch.zeros(1, 1, 20, 28))
    assert wide.shape[1] == features.vgg16_feature_dim(20, 28) == 64 * 560 + 128 * 140 + 256 * 35 + 512 * 6
    for bad in (torch.zeros(1, 2, 16, 16), torch.zeros(3, 16, 16)):  # two channels; no batch dimension
        with pytest.raises(ValueError, match="1 or 3"):
            model.perceptual(bad)
    x = torch.zeros(1, 3, 16, 16, requires_grad=True)
    model.perceptual(x).sum().backward()  # differentiable in the image, for use inside a loss
    assert x.grad is not None and x.grad.abs().sum() > 0
    del state["features.28.bias"]
    torch.save(state, path)
    with pytest.raises(RuntimeError, match="features.28.bias"):
        features.load_vgg16(path, "cpu")
    torch.save(state | {"features.28.bias": torch.zeros(512), "fc.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="fc.weight"):
        features.load_vgg16(path, "cpu")


def test_vgg16_layout_matches_torchvision() -> None:
    try:
        from torchvision.models import vgg16
    except Exception:
        pytest.skip("torchvision is not installed here (it cannot be installed beside the CPU torch); "
                    "the layout is checked where it is")
    ours = features.VGG16Features().state_dict()
    theirs = {k: v for k, v in vgg16(weights=None).state_dict().items() if k.startswith("features.")}
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


# ----------------------------------------------------------------------------- GLANN's pixel + feature loss


def test_pixel_feature_l1_matches_an_independent_computation() -> None:
    from genlib import imle

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    projection = torch.randn(12, 5, generator=g)
    loss = imle.PixelFeatureL1(lambda images: images.flatten(1) @ projection, feature_weight=2.5)
    xn, yn, pn = x.double().numpy().reshape(4, 12), y.double().numpy().reshape(4, 12), projection.double().numpy()
    expected = [np.abs(xn[i] - yn[i]).sum() + 2.5 * np.abs(xn[i] @ pn - yn[i] @ pn).sum() for i in range(4)]
    torch.testing.assert_close(loss(x, y).double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    assert list(loss.state_dict()) == [] and list(loss.children()) == []  # the feature map is not part of the module


def test_feature_networks_are_cached_under_the_indexed_device_name(monkeypatch) -> None:
    assert features._model_device("cpu") == "cpu"
    monkeypatch.setattr(features.runtime, "device", lambda name=None: torch.device(name or "cuda"))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert features._model_device(None) == features._model_device("cuda") == "cuda:1"  # one cache entry, not two
    assert features._model_device(torch.device("cuda", 0)) == "cuda:0"


def _bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of a 1-D antialiased bilinear (triangle-filter) resize, as PIL defines it: output pixel
    i is centred at (i + 0.5) * n_in / n_out; the triangle is widened by the scale when downscaling."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale
    weights = np.maximum(0.0, 1 - np.abs(np.arange(n_in)[None] + 0.5 - centres[:, None]) / support)
    return weights / weights.sum(1, keepdims=True)


@pytest.mark.parametrize("size", [11, 14, 64])
def test_to_rgb_repeats_grey_and_resizes_with_antialiased_bilinear(size) -> None:
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    rgb = features.to_rgb(x, size)
    w = _bilinear_weights(28, size)
    expected = torch.from_numpy(np.einsum("ij,bjk,lk->bil", w, x[:, 0].double().numpy(), w)).float()
    assert rgb.shape == (2, 3, size, size)
    for channel in range(3):  # grey is the same in R, G and B
        torch.testing.assert_close(rgb[:, channel], expected, rtol=0, atol=1e-5)
    assert torch.equal(features.to_rgb(x, 28), x.expand(-1, 3, -1, -1))  # no resize at the native size


def test_efficientnet_features_average_pool_the_last_map(lite0) -> None:
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        fmap, feats = lite0.feature_map(x), lite0.features(x)
    assert fmap.shape == (2, 1280, 2, 2)
    torch.testing.assert_close(feats, fmap.double().mean(dim=(2, 3)).float())


def test_efficientnet_features_resize_to_the_requested_resolution(lite0) -> None:
    images = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = (images.double() / 127.5 - 1).float().expand(-1, 3, -1, -1)  # [-1, 1], grey as RGB
    feats = features.efficientnet_features(images, resolution=64, device="cpu")
    with torch.no_grad():
        at_64 = lite0.features(torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", antialias=True))
        at_224 = lite0.features(torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True))
    torch.testing.assert_close(feats, at_64, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(feats, at_224, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("shape, kernel, stride, rows, cols", [
    ((4, 4), 3, 2, [1, 3], [1, 3]), ((5, 5), 3, 2, [0, 2, 4], [0, 2, 4]), ((6, 6), 5, 2, [1, 3, 5], [1, 3, 5]),
    ((4, 4), 3, 1, [0, 1, 2, 3], [0, 1, 2, 3]),
    ((4, 5), 3, 2, [1, 3], [0, 2, 4]), ((5, 4), 3, 2, [0, 2, 4], [1, 3]),  # height and width padded each by its size
])
def test_conv2d_same_centres_its_taps_as_tensorflow_does(shape, kernel, stride, rows, cols) -> None:
    # TensorFlow 'SAME': ceil(size / stride) outputs; when the padding is odd the extra row/column goes bottom/right,
    # so output i is centred on input row i * stride + (kernel - 1) // 2 - (total padding) // 2. A kernel that
    # picks its centre tap therefore samples exactly these input rows and columns.
    conv = features.Conv2dSame(1, 1, kernel, stride, padding=0, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, kernel // 2, kernel // 2] = 1.0
        x = torch.arange(shape[0] * shape[1], dtype=torch.float32).view(1, 1, *shape)
        out = conv(x)
    assert torch.equal(out, x[:, :, rows][:, :, :, cols])


def test_efficientnet_batchnorms_use_tensorflow_epsilon(lite0) -> None:
    norms = [m for m in lite0.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 49 and all(m.eps == 1e-3 for m in norms)  # the checkpoint was trained with TF's 1e-3
    assert all(m.momentum == pytest.approx(1 - 0.99) for m in norms)  # TF's decay 0.99 is PyTorch's momentum 0.01


@pytest.mark.parametrize("size, side", [(224, 7), (100, 4), (33, 2)])
def test_efficientnet_feature_map_is_the_input_over_32_rounded_up(lite0, size, side) -> None:
    # five stride-2 'SAME' stages (stem, stages 2, 3, 4 and 6) each give ceil(size / 2)
    with torch.no_grad():
        assert lite0.feature_map(torch.zeros(1, 3, size, size)).shape == (1, 1280, side, side)


def test_augment_pads_shifts_with_black_background() -> None:
    x = torch.ones(16, 1, 28, 28)  # all white: anything else in the output came from the padding
    y = features._augment(x, torch.Generator().manual_seed(0))
    assert set(y.unique().tolist()) == {-1.0, 1.0}
    # a shift by (dy, dx) leaves whole rows / columns of background, never a pixel inside the image
    for image in y[:, 0]:
        white = image == 1
        rows, cols = white.any(1).nonzero().flatten(), white.any(0).nonzero().flatten()
        assert white[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
        assert len(rows) >= 26 and len(cols) >= 26


def test_vgg16_perceptual_features_are_the_four_documented_relu_layers() -> None:
    torch.manual_seed(0)
    state = features.VGG16Features().state_dict()
    model = features.VGG16Features()
    model.load_state_dict(state)
    x = torch.rand(2, 3, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    # by hand: [0, 1], ImageNet normalisation, then conv-relu blocks with 2x2 max pools; keep relu1_2, relu2_2,
    # relu3_3 and relu4_3 (the last ReLU of each of the first four blocks), each divided by its size per image
    h = imagenet_normalised(x)
    convs = iter(sorted({int(k.split(".")[1]) for k in state}))
    expected = []
    for block, n_convs in enumerate((2, 2, 3, 3)):
        if block:
            h = torch.nn.functional.max_pool2d(h, 2)
        for _ in range(n_convs):
            i = next(convs)
            h = torch.relu(torch.nn.functional.conv2d(h, state[f"features.{i}.weight"], state[f"features.{i}.bias"],
                                                      padding=1))
        expected.append(h.flatten(1) / h[0].numel())
    with torch.no_grad():
        torch.testing.assert_close(model.perceptual(x), torch.cat(expected, 1), rtol=1e-4, atol=1e-8)


def test_batched_extraction_shows_a_bar_only_inside_progress_bars(capsys) -> None:
    images, flat = torch.zeros(5, 1, 4, 4, dtype=torch.uint8), (lambda x: x.flatten(1))
    silent = features._batched(flat, images, 2, torch.device("cpu"))
    assert capsys.readouterr().err == ""  # the notebooks' extractions print nothing
    with features.progress_bars("test features"):
        shown = features._batched(flat, images, 2, torch.device("cpu"))
    assert "test features" in capsys.readouterr().err and torch.equal(shown, silent)
    features._batched(flat, images, 2, torch.device("cpu"))
    assert capsys.readouterr().err == ""  # the block's end turns the bars off again
