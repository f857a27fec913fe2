"""The run metrics of genlib.evaluate, checked on models whose answer is known in closed form."""

from __future__ import annotations

import dataclasses
import math
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from genlib import data, evaluate, features, metrics, viz
from genlib.flows import FlowModel, RealNVP
from genlib.train import GenerativeModel


class Replay(GenerativeModel):
    """A 'model' whose samples are rows of a fixed tensor, in order (a perfect or a broken generator)."""

    def __init__(self, rows: torch.Tensor):
        super().__init__()
        self.rows = rows
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device
        self.cursor = 0

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        out = self.rows[self.cursor:self.cursor + n]
        self.cursor = (self.cursor + n) % len(self.rows)
        return data.to_float(out) if out.dtype == torch.uint8 else out


def test_perfect_toy_model_covers_every_mode_with_the_closed_form_quality():
    toy = data.toy("grid25")
    real = toy.sample(20_000, torch.Generator().manual_seed(5))
    out = evaluate.evaluate_model(Replay(real), "grid25", real, n_samples=20_000)
    assert out["modes_covered"] == out["modes_total"] == 25
    # an isotropic 2-D Gaussian puts 1 - exp(-3^2 / 2) of its mass within 3 std of its mean
    assert out["high_quality_fraction"] == pytest.approx(1 - math.exp(-4.5), abs=0.003)
    assert abs(out["mmd2"]) < 2e-3 and out["eval_samples"] == 20_000


def test_collapsed_toy_model_covers_one_mode():
    toy = data.toy("ring8")
    one_mode = toy.modes[3] + toy.std * torch.randn(1000, 2, generator=torch.Generator().manual_seed(0))
    out = evaluate.evaluate_model(Replay(one_mode), "ring8", one_mode, n_samples=1000)
    assert out["modes_covered"] == 1 and out["mmd2"] > 0.1


class ReplayOnCuda(Replay):
    """A Replay that says it is on CUDA (its rows stay on the CPU): draw_samples warms it up first."""

    @property
    def device(self) -> torch.device:
        return torch.device("cuda")


ROWS = torch.arange(23.0)[:, None].expand(23, 2)  # 23 distinct samples: their order shows how batches join


def test_draw_samples_concatenates_batches_in_order():
    samples, rate = evaluate.draw_samples(Replay(ROWS), 23, batch_size=5)  # on the CPU: no warm-up batch
    assert torch.equal(samples, ROWS) and rate > 0
    model = ReplayOnCuda(torch.cat([ROWS[:5], ROWS]))  # on CUDA the first batch is the discarded warm-up
    assert torch.equal(evaluate.draw_samples(model, 23, batch_size=5)[0], ROWS)
    assert torch.equal(evaluate.draw_samples(Replay(ROWS), 1)[0], ROWS[:1])  # one sample is enough
    with pytest.raises(ValueError, match="positive"):
        evaluate.draw_samples(Replay(ROWS), 0)


def test_draw_samples_shows_its_progress_when_asked(capsys):
    evaluate.draw_samples(Replay(ROWS), 23, batch_size=5)
    assert capsys.readouterr().err == ""
    evaluate.draw_samples(Replay(ROWS), 23, batch_size=5, progress=True)
    assert re.search(r"sampling: 100%.*23/23", capsys.readouterr().err)


@pytest.fixture(scope="module")
def fashion():
    return data.load_images("fashion-mnist", split="test").images


def test_image_metrics_use_the_fashion_classifier_and_agree_with_metrics(fashion):
    real, fake = fashion[:400], fashion[400:800]
    out = evaluate.image_metrics(data.to_float(fake), real)
    assert out["features"] == "fashion-classifier"
    expected = metrics.frechet_distance(features.fashion_features(real), features.fashion_features(fake))
    assert out["fd"] == pytest.approx(expected, rel=1e-5)
    noise = torch.rand(400, 1, 28, 28) * 2 - 1
    assert evaluate.image_metrics(noise, real)["fd"] > 10 * out["fd"]


def test_fid_is_reported_only_where_inception_weights_are_available(fashion, monkeypatch):
    real, fake = fashion[:300], data.to_float(fashion[300:600]) * 1.5  # out of range: scored clamped, as samples
    monkeypatch.setattr(features, "inception_features_available", lambda: False)
    assert "fid" not in evaluate.image_metrics(fake, real)
    projection = torch.randn(28 * 28, 16, generator=torch.Generator().manual_seed(0))
    seen = []

    def stand_in(images, device=None):  # a fixed random projection in place of Inception-v3
        seen.append(images)
        as_float = data.to_float(images) if images.dtype == torch.uint8 else images
        return as_float.flatten(1) @ projection

    monkeypatch.setattr(features, "inception_features_available", lambda: True)
    monkeypatch.setitem(features.EXTRACTORS, "inception", stand_in)
    out = evaluate.image_metrics(fake, real)
    clamped = fake.clamp(-1, 1)
    assert out["fid"] == pytest.approx(metrics.frechet_distance(stand_in(real), stand_in(clamped)), rel=1e-6)
    assert out["features"] == "fashion-classifier" and torch.equal(seen[1], clamped)
    assert out["fid"] != pytest.approx(out["fd"], rel=1e-3)  # a separate distance, not the offline FD renamed


def test_feature_network_follows_the_image_shape():
    assert evaluate.feature_network_for((1, 28, 28)) == "fashion-classifier"
    assert evaluate.feature_network_for((3, 64, 64)) == "efficientnet-lite0"
    with pytest.raises(ValueError, match="differ in shape"):
        evaluate.image_metrics(torch.zeros(4, 1, 28, 28), torch.zeros(4, 3, 64, 64, dtype=torch.uint8))


def test_held_out_likelihood_is_the_flows_own_evaluation(capsys):
    torch.manual_seed(0)
    model = FlowModel(RealNVP(dim=2, n_layers=2, hidden=16))
    held_out = data.toy_dataset("moons", 300, seed=1)
    out = evaluate.evaluate_model(model, "moons", held_out, n_samples=200, held_out=held_out)
    assert out["held_out_nll"] == pytest.approx(model.evaluate(held_out)["nll"], rel=1e-6)
    # no held-out set, or a family without a likelihood: no held_out_* numbers, and no error
    assert not [key for key in evaluate.evaluate_model(model, "moons", held_out, n_samples=200)
                if key.startswith("held_out")]
    assert not [key for key in evaluate.evaluate_model(Replay(held_out), "moons", held_out, n_samples=200,
                                                       held_out=held_out) if key.startswith("held_out")]
    assert capsys.readouterr().out == ""
    evaluate.evaluate_model(model, "moons", held_out, n_samples=200, held_out=held_out, progress=True)
    assert "held-out likelihood of 300 samples ..." in capsys.readouterr().out  # it has no bar of its own


def test_the_sample_grid_shows_the_first_64_scored_images_and_toys_get_none(fashion, tmp_path):
    images = fashion[:100]
    evaluate.evaluate_model(Replay(images), "fashion-mnist", fashion[100:200], n_samples=100,
                            grid_to=tmp_path / "grid.png")
    viz.save_image_grid(data.to_float(images[:64]), tmp_path / "expected.png")
    assert (tmp_path / "grid.png").read_bytes() == (tmp_path / "expected.png").read_bytes()
    points = data.toy_dataset("moons", 200, seed=1)
    evaluate.evaluate_model(Replay(points), "moons", points, n_samples=200, grid_to=tmp_path / "toy.png")
    assert not (tmp_path / "toy.png").exists()  # a toy run's picture is a scatter plot, drawn elsewhere


def test_held_out_subset_is_fixed_and_bounded():
    rows = torch.arange(100)
    first, again = evaluate.held_out_subset(rows, 10, seed=3), evaluate.held_out_subset(rows, 10, seed=3)
    assert torch.equal(first, again) and len(first.unique()) == 10
    assert torch.equal(evaluate.held_out_subset(rows, 500), rows)
    assert torch.equal(evaluate.held_out_subset(rows, 100), rows)  # as many as there are: all, in their order


class Exploding(GenerativeModel):
    """A model whose loss becomes infinite at its third step."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))
        self.calls = 0

    def step(self, x, index):
        self.calls += 1
        return {"loss": torch.tensor(float("inf") if self.calls >= 3 else 1.0)}

    @torch.no_grad()
    def sample(self, n):
        return torch.zeros(n, 2)


class MeanShift(GenerativeModel):
    """Samples N(mu, 1) with mu moved towards each batch mean (a tiny, seed-dependent learner)."""

    def __init__(self):
        super().__init__()
        self.mu = nn.Parameter(torch.zeros(2))
        self.optimizers = {"mu": torch.optim.SGD([self.mu], lr=0.5)}

    def step(self, x, index):
        loss = ((self.mu - x) ** 2).sum(1).mean()
        self.optimizers["mu"].zero_grad()
        loss.backward()
        self.optimizers["mu"].step()
        return {"loss": loss.detach()}

    @torch.no_grad()
    def sample(self, n):
        return self.mu + torch.randn(n, 2)


def test_coverage_run_reports_divergence_instead_of_raising():
    row = evaluate.coverage_run(Exploding, data.toy("ring8"), seed=0, steps=10, batch_size=8, n_data=64)
    assert row["diverged"] and row["modes"] == 0 and row["hq"] == 0.0 and row["total_modes"] == 8
    assert row["mode_counts"] == [0] * 8


def test_coverage_run_is_reproducible_by_seed_and_scores_like_mode_coverage():
    toy = data.toy("ring8", std=1.0)  # modes at radius 2: unit-variance samples near 0 are all within 3 std
    first, again = (evaluate.coverage_run(MeanShift, toy, seed=3, steps=20, batch_size=16, n_data=256,
                                          n_samples=500) for _ in range(2))
    assert {k: first[k] for k in ("modes", "hq")} == {k: again[k] for k in ("modes", "hq")}
    assert not first["diverged"] and first["modes"] == 8 and first["hq"] > 0.95 and "samples" not in first
    kept = evaluate.coverage_run(MeanShift, toy, seed=3, steps=20, batch_size=16, n_data=256, n_samples=500,
                                 keep_samples=True)
    assert kept["samples"].shape == (500, 2)
    assert metrics.mode_coverage(kept["samples"], toy.modes, toy.std) == (first["modes"], first["hq"])
    # per mode: the high-quality samples whose nearest mode it is, counted by brute force
    distances = torch.cdist(kept["samples"].double(), toy.modes.double())
    nearest = distances.argmin(1)[distances.min(1).values <= 3 * toy.std]
    assert first["mode_counts"] == [int((nearest == k).sum()) for k in range(8)]
    assert sum(first["mode_counts"]) == round(first["hq"] * 500)
    for not_a_mixture in (data.toy("moons"), dataclasses.replace(toy, std=None), dataclasses.replace(toy, modes=None)):
        with pytest.raises(ValueError, match="not a Gaussian mixture"):  # coverage needs both modes and their std
            evaluate.coverage_run(MeanShift, not_a_mixture, seed=0, steps=1, batch_size=4)


def test_coverage_run_keeps_the_trained_model_that_drew_the_samples():
    toy = data.gaussian_mixture([[3.0, -1.0]], std=0.5)  # one mode away from MeanShift's start at 0
    row = evaluate.coverage_run(MeanShift, toy, seed=0, steps=50, batch_size=16, n_data=256, n_samples=2000,
                                keep_samples=True, keep_model=True)
    mu = row["model"].mu.detach()
    assert isinstance(row["model"], MeanShift) and row["model"].mu.device.type == "cpu"
    assert torch.allclose(mu, torch.tensor([3.0, -1.0]), atol=0.6)  # trained (it is the last batch mean), not fresh
    assert torch.allclose(row["samples"].mean(0), mu, atol=0.1)  # N(mu, 1): 4 standard errors of 2,000 draws
    assert "model" not in evaluate.coverage_run(MeanShift, toy, seed=0, steps=5, batch_size=16, n_data=256)


def test_coverage_run_tracks_the_logged_losses_of_the_same_training():
    toy = data.toy("ring8", std=1.0)
    row = evaluate.coverage_run(MeanShift, toy, seed=3, steps=20, batch_size=16, n_data=256, track=("loss",))
    # the same run by hand, seeded as coverage_run documents: its fit logs 10 windows of 2 steps
    from genlib import runtime
    from genlib.train import fit

    runtime.seed_everything(3)
    dataset = toy.sample(256, torch.Generator().manual_seed(3))
    logged = fit(MeanShift(), data.BatchSampler(dataset, 16, "cpu", seed=3), 20, log_every=2, progress=False)
    assert len(row["history"]["loss"]) == 10 and row["history"]["loss"] == logged["loss"]
    short = evaluate.coverage_run(MeanShift, toy, seed=3, steps=3, batch_size=16, n_data=64, track=("loss",))
    assert len(short["history"]["loss"]) == 3  # under 10 steps every step is its own window
    assert "history" not in evaluate.coverage_run(MeanShift, toy, seed=3, steps=2, batch_size=16, n_data=64)
    with pytest.raises(ValueError, match="cannot track gap: the run logged loss"):
        evaluate.coverage_run(MeanShift, toy, seed=3, steps=2, batch_size=16, n_data=64, track=("gap",))
    diverged = evaluate.coverage_run(Exploding, data.toy("ring8"), seed=0, steps=10, batch_size=8, n_data=64,
                                     track=("loss",))
    assert diverged["diverged"] and diverged["history"] == {"loss": []}


def test_coverage_run_calls_back_mid_training_and_the_run_is_unchanged():
    toy = data.toy("ring8", std=1.0)
    seen = []
    probed = evaluate.coverage_run(MeanShift, toy, seed=4, steps=12, batch_size=16, n_data=256, keep_samples=True,
                                   callback=lambda step, model: seen.append((step, model.mu.detach().clone())),
                                   callback_every=5)
    plain = evaluate.coverage_run(MeanShift, toy, seed=4, steps=12, batch_size=16, n_data=256, keep_samples=True)
    assert [step for step, _ in seen] == [5, 10]
    assert not torch.equal(seen[0][1], seen[1][1])  # the model seen mid-run, not a copy of the end
    assert torch.equal(probed["samples"], plain["samples"])  # a callback that draws nothing changes nothing


def test_coverage_run_reports_wall_and_process_cpu_seconds_each_from_its_own_clock(monkeypatch):
    """Wall time and CPU time part on a shared machine; the compare tables print the CPU time."""
    wall, cpu = iter([100.0, 107.0]), iter([20.0, 22.5])  # fake clocks: one reading at the start, one at the end
    monkeypatch.setattr(evaluate, "time", SimpleNamespace(perf_counter=lambda: next(wall),
                                                          process_time=lambda: next(cpu)))
    row = evaluate.coverage_run(MeanShift, data.toy("ring8"), seed=0, steps=2, batch_size=8, n_data=64, n_samples=50)
    assert row["seconds"] == 7.0 and row["cpu_seconds"] == 2.5


def test_coverage_runs_train_on_the_threads_asked_for_and_restore_the_count():
    from genlib import runtime
    from genlib.gan import GAN

    seen = []

    def make_model():
        seen.append(torch.get_num_threads())
        return GAN((2,), arch="mlp", width=8)

    runs = [(make_model, 0, "GAN 0")]
    with runtime.torch_threads(2):  # a known count to start from, on any machine
        [(_, row)] = list(evaluate.coverage_runs(runs, "ring8", 2, 16, n_data=64, n_samples=32, threads=1))
        assert seen == [1] and row["total_modes"] == 8 and torch.get_num_threads() == 2
        list(evaluate.coverage_runs(runs, "ring8", 2, 16, n_data=64, n_samples=32, threads=None))
        assert seen[-1] == 2  # None leaves the count alone


def clocked(base: type[Replay]) -> type[Replay]:
    """A Replay whose every sample() call takes exactly one second on a fake clock."""

    class Clocked(base):
        def __init__(self, rows, clock):
            super().__init__(rows)
            self.clock = clock

        def sample(self, n):
            self.clock[0] += 1.0
            return super().sample(n)

    return Clocked


@pytest.mark.parametrize("base", [Replay, ReplayOnCuda], ids=["cpu", "cuda-warm-up"])
def test_sampling_rate_is_samples_per_second_of_the_timed_batches_only(base, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(evaluate, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    model = clocked(base)(torch.cat([ROWS[:5], ROWS]) if base is ReplayOnCuda else ROWS, clock)
    samples, rate = evaluate.draw_samples(model, 23, batch_size=5)
    assert torch.equal(samples, ROWS)
    assert rate == pytest.approx(23 / 5)  # 5 timed batches of 1 s each; a CUDA warm-up batch is not timed


def test_toy_mode_coverage_counts_every_sample_not_only_the_mmd_subset(monkeypatch):
    monkeypatch.setattr(evaluate, "MMD_POINTS", 100)  # a small MMD subset keeps the test fast
    toy = data.toy("ring8")
    noise = toy.std * torch.randn(400, 2, generator=torch.Generator().manual_seed(0))
    which = torch.cat([torch.zeros(100, dtype=torch.int64), torch.arange(300) % 8])
    fake = toy.modes[which] + noise  # the first MMD_POINTS samples all sit at mode 0
    fake[-50:] += 1.0  # and some of the rest are poor samples
    out = evaluate.toy_metrics(fake, "ring8")
    distances = torch.cdist(fake.double(), toy.modes.double())
    near = distances.min(1).values <= 3 * toy.std
    assert out["modes_covered"] == len(distances.argmin(1)[near].unique()) == 8
    assert out["high_quality_fraction"] == pytest.approx(float(near.double().mean()))


def test_toy_mmd_compares_with_fresh_points_not_the_training_set():
    """The CLI trains on toy_dataset(name, n, seed): MMD^2 must use other points (drawn with seed + 1)."""
    training = data.toy_dataset("ring8", 500, seed=4)
    out = evaluate.toy_metrics(training, "ring8", seed=4)
    fresh = data.toy("ring8").sample(500, torch.Generator().manual_seed(5))
    assert out["mmd2"] == pytest.approx(metrics.mmd2(fresh, training), rel=1e-6, abs=1e-9)


class ReplayWithLikelihood(Replay):
    """A Replay with a stand-in likelihood: the 'nll' of a set is the mean of its first coordinate."""

    def evaluate(self, x):
        return {"nll": float(x[:, 0].mean())}


def test_held_out_likelihood_is_computed_on_the_held_out_set_not_the_training_set():
    real = data.toy_dataset("ring8", 300, seed=0)
    held_out = data.toy_dataset("ring8", 300, seed=1) + 10.0  # far from real: the two answers differ a lot
    out = evaluate.evaluate_model(ReplayWithLikelihood(real), "ring8", real, n_samples=300, held_out=held_out)
    assert out["held_out_nll"] == pytest.approx(float(held_out[:, 0].mean()))


def test_image_metrics_compare_with_a_seeded_subset_of_as_many_real_images_as_samples(monkeypatch):
    seen = {}

    def record(fake, real, device=None, seed=0, progress=False):
        seen.update(fake=fake, real=real, seed=seed)
        return {"fd": 0.0}

    monkeypatch.setattr(evaluate, "image_metrics", record)
    real = torch.randint(0, 256, (100, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = evaluate.evaluate_model(Replay(real[:20]), "fashion-mnist", real, n_samples=20, seed=7)
    subset = real[torch.randperm(100, generator=torch.Generator().manual_seed(7))[:20]]
    assert out["fd"] == 0.0 and seen["seed"] == 7
    assert torch.equal(seen["real"], subset) and torch.equal(seen["fake"], data.to_float(real[:20]))


def test_held_out_subset_is_the_seeded_permutation_s_first_rows():
    rows = torch.arange(100)
    for seed in (3, 4):
        expected = rows[torch.randperm(100, generator=torch.Generator().manual_seed(seed))[:10]]
        assert torch.equal(evaluate.held_out_subset(rows, 10, seed=seed), expected)
    assert not torch.equal(evaluate.held_out_subset(rows, 10, seed=3), evaluate.held_out_subset(rows, 10, seed=4))


def test_inception_weights_named_but_missing_are_an_error_not_a_silent_absence_of_fid(tmp_path, monkeypatch):
    from genlib.runtime import MissingAssetError

    monkeypatch.setenv(features.INCEPTION_ENV, str(tmp_path / "missing.pt"))
    images = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    with pytest.raises(MissingAssetError, match=f"{features.INCEPTION_ENV}=.*missing.pt' is not a file"):
        evaluate.image_metrics(images.float(), images)
    monkeypatch.setenv(features.INCEPTION_ENV, "")  # unset: no FID, no error
    features.check_inception_weights()
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"not read")
    monkeypatch.setenv(features.INCEPTION_ENV, str(weights))  # a file, but the FID also needs torchvision
    monkeypatch.setattr(features, "_torchvision_available", lambda: False)
    with pytest.raises(MissingAssetError, match="torchvision does not import here"):
        features.check_inception_weights()
    monkeypatch.setattr(features, "_torchvision_available", lambda: True)
    features.check_inception_weights()


def test_image_metrics_show_the_feature_extraction_only_with_progress(capsys):
    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    quiet = evaluate.image_metrics(images.float() / 127.5 - 1, images)
    assert capsys.readouterr().err == ""
    shown = evaluate.image_metrics(images.float() / 127.5 - 1, images, progress=True)
    err = capsys.readouterr().err
    assert "fashion-classifier features, real" in err and "fashion-classifier features, fake" in err
    assert shown == quiet
