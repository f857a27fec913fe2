"""Chapter 2: the GAN objective against closed forms, the losses against autograd, every family through fit."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import sympy
import torch
import torch.nn.functional as F
from scipy import integrate, stats
from torch import nn

from genlib import data, gan, metrics, runtime
from genlib.cli import TrainSpec
from genlib.data import BatchSampler
from genlib.train import fit



# ----------------------------------------------------------------------------- the objective on a grid

GRID = torch.linspace(-15.0, 16.0, 310_001, dtype=torch.float64)
DX = float(GRID[1] - GRID[0])


def normal_pdf(x: torch.Tensor, mean: float) -> torch.Tensor:
    return torch.exp(-0.5 * (x - mean) ** 2) / math.sqrt(2 * math.pi)


def test_optimal_discriminator_is_p_over_p_plus_q_and_one_half_where_both_vanish():
    p = torch.tensor([0.0, 1.0, 0.0, 2.0, 3.0])
    q = torch.tensor([0.0, 0.0, 1.0, 2.0, 1.0])
    torch.testing.assert_close(gan.optimal_discriminator(p, q), torch.tensor([0.5, 1.0, 0.0, 0.5, 0.75]))


def test_optimal_discriminator_maximises_the_value_pointwise():
    p, q = normal_pdf(GRID, 0.0), normal_pdf(GRID, 1.0)
    d_star = gan.optimal_discriminator(p, q)
    best = gan.gan_value_on_grid(p, q, d_star, DX)
    for shift in (-0.05, 0.05):
        assert gan.gan_value_on_grid(p, q, (d_star + shift).clamp(1e-6, 1 - 1e-6), DX) < best


def test_value_at_the_optimal_discriminator_is_minus_log4_plus_2_js():
    """p = N(0, 1), q = N(1, 1): V(D*, G) = -log 4 + 2 JS = -1.163451, JS = 0.111421 (quad, independently)."""
    p, q = normal_pdf(GRID, 0.0), normal_pdf(GRID, 1.0)
    js = gan.js_divergence(p, q, DX)
    value = gan.gan_value_on_grid(p, q, gan.optimal_discriminator(p, q), DX)

    def integrand(x: float) -> float:
        a, b = stats.norm.pdf(x, 0, 1), stats.norm.pdf(x, 1, 1)
        m = (a + b) / 2
        return 0.5 * a * math.log(a / m) + 0.5 * b * math.log(b / m)

    js_quad, _ = integrate.quad(integrand, -30, 31, limit=200)
    assert js.item() == pytest.approx(js_quad, abs=1e-7)
    assert js.item() == pytest.approx(0.111421, abs=1e-6)
    assert value.item() == pytest.approx(-1.163451, abs=1e-6)
    assert value.item() == pytest.approx(-math.log(4) + 2 * js.item(), abs=1e-9)


def test_js_of_identical_is_zero_and_of_disjoint_is_log2():
    x = torch.linspace(0, 4, 4001, dtype=torch.float64)
    dx = float(x[1] - x[0])
    p = ((x >= 0.5) & (x < 1.5)).double()
    q = ((x >= 2.5) & (x < 3.5)).double()
    p, q = p / (p.sum() * dx), q / (q.sum() * dx)
    assert gan.js_divergence(p, p, dx).item() == pytest.approx(0.0, abs=1e-12)
    assert gan.js_divergence(p, q, dx).item() == pytest.approx(math.log(2), abs=1e-12)
    # disjoint supports: D* is 1 on p's support and 0 on q's, and V(D*, G) = 0 = -log 4 + 2 log 2
    assert gan.gan_value_on_grid(p, q, gan.optimal_discriminator(p, q), dx).item() == pytest.approx(0.0, abs=1e-12)


def test_sympy_argmax_of_a_log_y_plus_b_log_1_minus_y():
    a, b = sympy.symbols("a b", positive=True)
    y = sympy.symbols("y", positive=True)
    objective = a * sympy.log(y) + b * sympy.log(1 - y)
    (critical,) = sympy.solve(sympy.diff(objective, y), y)
    assert sympy.simplify(critical - a / (a + b)) == 0
    assert sympy.simplify(sympy.diff(objective, y, 2).subs(y, critical)).is_negative


# ----------------------------------------------------------------------------- losses on logits


def test_discriminator_loss_is_binary_cross_entropy_and_minus_the_value():
    g = torch.Generator().manual_seed(0)
    real, fake = 3 * torch.randn(50, generator=g), 3 * torch.randn(70, generator=g)
    expected = (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
    torch.testing.assert_close(gan.discriminator_bce(real, fake), expected)
    torch.testing.assert_close(gan.gan_value(real, fake), -expected)
    # logits keep it finite where log(sigmoid(.)) would underflow
    assert torch.isfinite(gan.discriminator_bce(torch.tensor([-200.0]), torch.tensor([200.0])))


@pytest.mark.parametrize("kind", gan.GENERATOR_LOSSES)
def test_generator_loss_gradient_matches_the_closed_form(kind):
    logits = torch.linspace(-8, 8, 33, requires_grad=True)
    (gan.generator_loss(logits, kind) * len(logits)).backward()  # per-sample gradients
    torch.testing.assert_close(logits.grad, gan.generator_logit_grad(torch.sigmoid(logits.detach()), kind))


def test_minimax_gradient_vanishes_when_d_rejects_fakes_non_saturating_does_not():
    rejected = torch.tensor([-20.0], requires_grad=True)  # D(G(z)) = 2e-9
    grads = {}
    for kind in gan.GENERATOR_LOSSES:
        (grads[kind],) = torch.autograd.grad(gan.generator_loss(rejected, kind), rejected)
    assert grads["minimax"].abs().item() < 1e-8
    assert grads["non_saturating"].item() == pytest.approx(-1.0, abs=1e-6)
    with pytest.raises(ValueError, match="generator loss"):
        gan.generator_loss(rejected, "wasserstein")


def test_gradient_penalty_of_a_linear_discriminator_is_known_in_closed_form():
    torch.manual_seed(0)
    linear = nn.Linear(2, 1)
    w = linear.weight.detach()
    expected = (w.norm() - 1) ** 2
    real = torch.randn(64, 2)
    critic = lambda x: linear(x).squeeze(-1)  # noqa: E731
    torch.testing.assert_close(gan.gradient_penalty(critic, gan.dragan_points(real)), expected)
    torch.testing.assert_close(gan.gradient_penalty(critic, real, target=0.0), w.norm() ** 2)
    # and inside the family: DRAGAN with a linear discriminator reports the same penalty
    model = gan.DRAGAN(width=8)
    model.discriminator = linear
    losses = model.d_losses(real, torch.randn(64, 2))
    torch.testing.assert_close(losses["penalty"], expected)
    bce = gan.discriminator_bce(critic(real), critic(torch.randn(64, 2)))
    assert torch.isfinite(bce)


def test_gradient_penalty_trains_where_the_critic_is_flat():
    """Where grad U = 0 exactly (a ReLU critic's dead region) the one-centred penalty is 1 and its weight gradient is
    finite: the part of the batch on the slope gives the autograd value, the flat part adds nothing."""
    weight = torch.tensor([1.0, 1.0], requires_grad=True)
    critic = lambda x: torch.relu(x @ weight - 1.0)  # noqa: E731
    points = torch.tensor([[0.0, 0.0], [-3.0, 1.0], [2.0, 2.0], [1.5, 0.5]])  # two flat, two on the slope
    penalty = gan.gradient_penalty(critic, points)
    (grad,) = torch.autograd.grad(penalty, weight)
    # on the slope grad U = weight, so the penalty is mean over 4 of [0, 0, (|w| - 1)^2, (|w| - 1)^2]
    by_hand = weight.detach().clone().requires_grad_(True)
    expected = (1.0 + 1.0 + 2 * (by_hand.norm() - 1) ** 2) / 4
    (expected_grad,) = torch.autograd.grad(expected, by_hand)
    torch.testing.assert_close(penalty.detach(), expected.detach())
    torch.testing.assert_close(grad, expected_grad)


def test_dragan_points_lie_between_the_data_and_half_a_std_above():
    torch.manual_seed(0)
    real = torch.randn(500, 3)
    points = gan.dragan_points(real, 0.5)
    shift = points - real
    assert (shift >= 0).all() and (shift <= 0.5 * real.std() + 1e-6).all()


def test_pulling_away_term():
    orthogonal = torch.eye(4)
    assert gan.pulling_away_term(orthogonal).item() == pytest.approx(0.0)
    assert gan.pulling_away_term(torch.ones(5, 3)).item() == pytest.approx(1.0)


def test_pulling_away_term_matches_a_loop_over_pairs_and_needs_two_codes():
    codes = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pairs = [(i, j) for i in range(6) for j in range(6) if i != j]
    expected = sum(float(F.cosine_similarity(codes[i], codes[j], dim=0)) ** 2 for i, j in pairs) / len(pairs)
    assert gan.pulling_away_term(codes).item() == pytest.approx(expected, rel=1e-12)
    assert gan.pulling_away_term(codes[:2]).item() == pytest.approx(
        float(F.cosine_similarity(codes[0], codes[1], dim=0)) ** 2, rel=1e-12)
    with pytest.raises(ValueError, match="n >= 2"):
        gan.pulling_away_term(codes[:1])  # one code has no pair: was nan


# ----------------------------------------------------------------------------- network pieces


def test_minibatch_discrimination_shape_and_collapse_signal():
    torch.manual_seed(0)
    layer = gan.MinibatchDiscrimination(in_features=6, kernels=5, kernel_dim=3)
    diverse = 100 * torch.randn(16, 6)
    collapsed = diverse[:1].expand(16, 6)
    out_diverse, out_collapsed = layer(diverse), layer(collapsed)
    assert out_diverse.shape == (16, 6 + 5)
    torch.testing.assert_close(out_diverse[:, :6], diverse)  # features pass through
    # identical samples: every other sample is at L1 distance 0 -> closeness n - 1 per kernel
    torch.testing.assert_close(out_collapsed[:, 6:], torch.full((16, 5), 15.0))
    assert out_diverse[:, 6:].max() < 1.0


def test_madgan_discriminator_has_k_plus_1_classes_and_generators_take_turns():
    model = gan.MADGAN(k=3, width=16)
    x = torch.randn(12, 2)
    assert model.logits(x).shape == (12, 4)
    assert model.heads(7).tolist() == [0, 1, 2, 0, 1, 2, 0]
    z = torch.randn(6, model.z_dim)
    # each row goes through its own head: generator 1's output for a row does not depend on the other rows
    one = model.generator.eval()(z, torch.full((6,), 1))
    mixed = model.generator(z, torch.tensor([1, 0, 2, 1, 0, 2]))
    torch.testing.assert_close(mixed[[0, 3]], one[[0, 3]])
    assert not torch.allclose(mixed[1], one[1])


def test_pacgan_packs_consecutive_samples():
    model = gan.PacGAN(pack=4, width=16)
    assert model.logits(torch.randn(10, 2)).shape == (2,)  # 10 -> two packs of 4, the rest dropped
    assert model.logits(torch.randn(5, 2)).shape == (1,)  # one pack is enough
    with pytest.raises(ValueError, match="cannot make one pack of 4"):
        model.logits(torch.randn(3, 2))
    images = gan.PacGAN(pack=2, width=4, shape=(1, 8, 8))
    assert images.logits(torch.randn(6, 1, 8, 8)).shape == (3,)


def test_second_order_unrolling_changes_the_generator_gradient():
    torch.manual_seed(0)
    grads = []
    for second_order in (False, True):
        torch.manual_seed(1)
        model = gan.UnrolledGAN(unroll=3, second_order=second_order, width=16)
        torch.manual_seed(2)
        loss = model.g_losses(torch.randn(32, 2))["loss_g"]
        grads.append(torch.autograd.grad(loss, list(model.generator.parameters())))
    assert all(torch.isfinite(g).all() for g in grads[1])
    assert any(not torch.allclose(a, b) for a, b in zip(*grads))


# ----------------------------------------------------------------------------- every family through fit


@pytest.mark.parametrize("variant", list(gan.VARIANTS))
def test_every_family_trains_on_a_toy_and_on_images(variant):
    cls = gan.VARIANTS[variant]
    torch.manual_seed(0)
    toy = data.BatchSampler(data.toy_dataset("ring8", 256), 32, "cpu")
    model = cls(width=16, z_dim=4)
    history = fit(model, toy, 3, log_every=1, progress=False)
    assert all(math.isfinite(v) for k, vs in history.items() if k != "step" for v in vs)
    assert {"loss_d", "loss_g"} <= set(history)
    assert model.sample(5).shape == (5, 2)

    images = data.BatchSampler(torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8), 16, "cpu")
    model = cls(shape=(1, 8, 8), width=4, z_dim=8)
    assert model.conv
    history = fit(model, images, 2, log_every=1, progress=False)
    assert all(math.isfinite(v) for k, vs in history.items() if k != "step" for v in vs)
    samples = model.sample(3)
    assert samples.shape == (3, 1, 8, 8) and samples.abs().max() <= 1


def test_learning_rate_decays_linearly_and_its_position_is_checkpointed():
    model = gan.GAN(width=8, lr_d=1e-3, lr_g=2e-3, lr_decay_steps=10, lr_final=0.05)
    x = torch.randn(16, 2)
    for _ in range(5):
        model.step(x, torch.arange(16))
    assert model.optimizers["d"].param_groups[0]["lr"] == pytest.approx(1e-3 * (1 - 0.95 * 4 / 10))
    assert model.optimizers["g"].param_groups[0]["lr"] == pytest.approx(2e-3 * (1 - 0.95 * 4 / 10))
    assert int(model.checkpoint_state()["model"]["updates"]) == 5
    for _ in range(10):
        model.step(x, torch.arange(16))
    assert model.optimizers["d"].param_groups[0]["lr"] == pytest.approx(1e-3 * 0.05)


def test_mlp_on_images_and_bad_arguments():
    model = gan.GAN(shape=(1, 8, 8), arch="mlp", width=16)
    assert not model.conv and model.sample(2).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="arch"):
        gan.GAN(shape=(2,), arch="conv")
    with pytest.raises(ValueError, match="loss"):
        gan.GAN(loss="hinge")


def test_build_gan_from_a_cli_spec():
    spec = TrainSpec(torch.zeros(10, 1, 28, 28, dtype=torch.uint8), (1, 28, 28), torch.device("cpu"), z_dim=32,
                     width=8, lr=2e-4, options={"variant": "pacgan", "pack": "2", "beta1": "0.5", "g_batchnorm": "no"})
    model = gan.build_gan(spec)
    assert isinstance(model, gan.PacGAN) and model.pack == 2 and model.conv and model.z_dim == 32
    assert model.optimizers["d"].defaults["lr"] == 2e-4 and model.optimizers["g"].defaults["betas"] == (0.5, 0.999)
    with pytest.raises(ValueError, match="unknown option"):
        gan.build_gan(TrainSpec(torch.zeros(4, 2), (2,), torch.device("cpu"), options={"pack": "2"}))
    with pytest.raises(ValueError, match="variant"):
        gan.build_gan(TrainSpec(torch.zeros(4, 2), (2,), torch.device("cpu"), options={"variant": "wgan"}))


# ----------------------------------------------------------------------------- the toy comparison


def test_compare_on_toy_rows_and_summary():
    rows = gan.compare_on_toy(["GAN", "PacGAN"], "ring8", seeds=[0], steps=5, batch_size=32, n_data=256,
                              n_samples=100, width=8)
    assert [(r["method"], r["seed"], r["total_modes"]) for r in rows] == [("GAN", 0, 8), ("PacGAN", 0, 8)]
    assert all(0 <= r["modes"] <= 8 and 0 <= r["hq"] <= 1 and r["seconds"] > 0 for r in rows)
    summary = gan.summarize(rows)
    assert [s["method"] for s in summary] == ["GAN", "PacGAN"] and summary[0]["runs"] == 1
    kept = gan.compare_on_toy(["GAN", "PacGAN"], "ring8", seeds=[0], steps=5, batch_size=32, n_data=256,
                              n_samples=100, width=8, keep_models=True)
    assert [(r["modes"], r["hq"]) for r in kept] == [(r["modes"], r["hq"]) for r in rows] and "model" not in rows[0]
    assert [type(r["model"]) for r in kept] == [gan.GAN, gan.PacGAN]
    assert not any(module.training for r in kept for module in r["model"].modules())  # scored in eval mode


def test_toy_runs_apply_a_setting_over_the_decay_they_default_to():
    built = []

    class Recorded(gan.GAN):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            built.append(self)

    for name in ("tuned", "tuned-no-decay", "tuned-narrow"):
        batch_size, setting = gan.TOY_SETTINGS[name]
        list(gan.toy_runs([("recorded", 0)], "ring8", 3, batch_size, {"recorded": (Recorded, {})}, n_data=256,
                          n_samples=50, **setting))
    assert [model.lr_decay_steps for model in built] == [3, 0, 3]  # decay over the run unless switched off
    assert [(model.width, model.depth) for model in built] == [(64, 3), (64, 3), (32, 2)]
    hidden = [layer.out_features for layer in built[2].generator.modules() if isinstance(layer, torch.nn.Linear)]
    assert hidden[:-1] == [32, 32]


def test_a_quick_vanilla_gan_finds_most_ring_modes():
    """A few CPU-seconds: the vanilla GAN covers at least half the ring's modes (fixed seed)."""
    runtime.seed_everything(0)
    toy = data.toy("ring8")
    model = gan.GAN(lr_decay_steps=500)
    sampler = data.BatchSampler(data.toy_dataset("ring8", 20_000, 0), gan.TOY_BATCH_SIZE, "cpu", seed=0)
    fit(model, sampler, 500, progress=False, log_every=100)
    modes, hq = metrics.mode_coverage(model.sample(2500), toy.modes, toy.std)
    assert modes >= 4 and hq > 0.01


def test_snapshot_recorder_replays_fakes_and_discriminator_without_touching_the_run():
    def run(record: bool):
        torch.manual_seed(0)
        model = gan.GAN(width=16, depth=2)
        recorder = gan.snapshot_recorder(model, every=2, lim=2.0, resolution=9, n_fakes=20) if record else None
        fit(model, BatchSampler(torch.randn(64, 2), 16, seed=0), 4, callback=recorder,
            callback_every=2 if record else 0, progress=False)
        return model, recorder

    model, recorder = run(True)
    assert recorder.steps == [0, 2, 4] and [f.shape for f in recorder.fakes] == [(20, 2)] * 3
    # row i, column j of the grid is the point (x_j, y_i); the field is D = sigmoid(logit)
    logit = model.discriminator(torch.tensor([[1.5, -1.0]])).detach().reshape(())
    torch.testing.assert_close(recorder.fields[-1][2, 7], torch.sigmoid(logit))
    torch.testing.assert_close(recorder.fakes[-1], model.generator(recorder.z).detach())
    plain, _ = run(False)  # recording draws no random numbers: the trained weights are identical
    for a, b in zip(model.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)


def test_discriminator_probability_per_point_and_clear_errors_for_the_other_families():
    torch.manual_seed(0)
    points = torch.randn(9, 2)
    model = gan.GAN(width=16, depth=2).eval()
    logits = model.discriminator(points).detach().squeeze(-1)
    torch.testing.assert_close(gan.discriminator_probability(model, points).detach(), 1 / (1 + torch.exp(-logits)))
    alone = gan.discriminator_probability(model, points[3:4]).detach()  # a point's D(x) does not see the batch
    torch.testing.assert_close(alone, gan.discriminator_probability(model, points).detach()[3:4])
    # MAD-GAN: the probability of the 'real' class k among its k + 1 classes
    madgan = gan.MADGAN(k=3, width=16).eval()
    scores = madgan.discriminator(points).detach().double()
    expected = scores[:, 3].exp() / scores.exp().sum(1)
    torch.testing.assert_close(gan.discriminator_probability(madgan, points).detach().double(), expected)
    for cls in (gan.EBGAN, gan.PacGAN, gan.MinibatchDiscriminationGAN):
        other = cls(width=8)
        with pytest.raises(TypeError, match=f"supports GAN, .*not {cls.__name__}"):
            gan.discriminator_probability(other, points)
        with pytest.raises(TypeError, match=f"not {cls.__name__}"):
            gan.snapshot_recorder(other, resolution=3, n_fakes=4)
    # MAD-GAN's D(x) exists, but its sampling draws a generator per code: no fixed fakes to replay
    with pytest.raises(TypeError, match="not MADGAN"):
        gan.snapshot_recorder(madgan, resolution=3, n_fakes=4)
    with pytest.raises(ValueError, match="2-D"):
        gan.snapshot_recorder(gan.GAN(shape=(1, 8, 8), width=4), resolution=3, n_fakes=4)
    for cls in (gan.UnrolledGAN, gan.DRAGAN, gan.MRGAN):
        recorder = gan.snapshot_recorder(cls(width=8), resolution=3, n_fakes=4)
        assert recorder.fields[0].shape == (3, 3) and ((recorder.fields[0] > 0) & (recorder.fields[0] < 1)).all()


class HalfAndCode(nn.Module):
    """A fixed 'autoencoder' for EBGAN: reconstruction x / 2, code = x (energy = mean(x^2) / 4 per sample)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x / 2, x


def test_ebgan_losses_are_the_hinge_and_pulling_away_terms_by_hand():
    model = gan.EBGAN(margin=2.0, pt_weight=0.5, width=8)
    model.discriminator = HalfAndCode()
    real = torch.tensor([[2.0, 0.0], [0.0, 1.0]])   # energies 4/8 = 0.5 and 1/8 = 0.125
    fake = torch.tensor([[1.0, 1.0], [3.0, 1.0]])   # energies 2/8 = 0.25 and 10/8 = 1.25
    losses = model.d_losses(real, fake)
    # mean real energy 0.3125, plus the hinge mean(relu(2 - 0.25), relu(2 - 1.25)) = 1.25
    assert losses["loss_d"].item() == pytest.approx(0.3125 + 1.25)
    assert losses["energy_real"].item() == pytest.approx(0.3125)
    leaf = fake.clone().requires_grad_(True)
    model.generate = lambda n: leaf[:n]
    # the codes (1, 1) and (3, 1) have cos^2 = (4 / (sqrt(2) sqrt(10)))^2 = 0.8 for both ordered pairs
    g_losses = model.g_losses(real)
    assert g_losses["pt"].item() == pytest.approx(0.8)
    assert g_losses["loss_g"].item() == pytest.approx((0.25 + 1.25) / 2 + 0.5 * 0.8)
    # The pulling-away term must push the generator too: its gradient is autograd's of the formulas written out.
    (grad,) = torch.autograd.grad(g_losses["loss_g"], leaf)
    by_hand = fake.clone().requires_grad_(True)
    energy = (by_hand / 2 - by_hand).pow(2).mean(1).mean()
    (expected,) = torch.autograd.grad(energy + 0.5 * F.cosine_similarity(by_hand[0], by_hand[1], dim=0) ** 2, by_hand)
    torch.testing.assert_close(grad, expected)
    # chapter 2's toy table runs EBGAN on its defaults: margin 1 (fake 1.25 lies above it) and the paper's weight 0.1
    default = gan.EBGAN(width=8)
    default.discriminator, default.generate = HalfAndCode(), (lambda n: fake[:n])
    assert default.d_losses(real, fake)["loss_d"].item() == pytest.approx(0.3125 + (0.75 + 0.0) / 2)
    assert default.g_losses(real)["loss_g"].item() == pytest.approx((0.25 + 1.25) / 2 + 0.1 * 0.8)


@pytest.mark.parametrize("kind", gan.GENERATOR_LOSSES)
def test_mrgan_generator_loss_adds_reconstruction_and_mode_terms_by_hand(kind):
    """The adversarial term follows ``loss`` (minimax at logit 0: log(1 - 1/2) = -log 2); the mode term stays
    non-saturating whatever ``loss`` is."""
    model = gan.MRGAN(lambda_rec=0.2, lambda_mode=0.4, width=8, loss=kind)
    model.encoder = nn.Identity()
    model.generator = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.generator.weight.copy_(2 * torch.eye(2))            # G(E(x)) = 2x: the error is x itself
    model.logits = lambda x: x.sum(1)                          # D's logit: the sum of the coordinates
    fakes = torch.tensor([[0.0, 0.0], [1.0, -1.0]])             # logits 0 and 0
    model.generate = lambda n: fakes[:n]
    real = torch.tensor([[1.0, 0.0], [0.5, 0.5]])              # reconstructions (2, 0), (1, 1): logits 2 and 2
    losses = model.g_losses(real)
    rec = (1.0 + 0.5) / 2                                      # squared errors summed per sample: 1 and 0.5
    mode = math.log1p(math.exp(-2.0))                          # -log sigmoid(2), the non-saturating form
    assert losses["recon"].item() == pytest.approx(rec)
    adversarial = math.log(2) if kind == "non_saturating" else -math.log(2)
    assert losses["loss_g"].item() == pytest.approx(adversarial + 0.2 * rec + 0.4 * mode)


def product_of_uniforms_cdf(t: np.ndarray) -> np.ndarray:
    """CDF of alpha * u with alpha, u ~ U[0, 1) independent: t - t log t on [0, 1]."""
    t = np.clip(t, 1e-300, 1.0)
    return t - t * np.log(t)


@pytest.mark.parametrize("noise", ["uniform", "gaussian"])
@pytest.mark.parametrize("spread", [(0.3, 0.3), (3.0, 0.3)])
def test_dragan_noise_scales_with_the_std_of_the_whole_batch(noise, spread):
    """x_hat - x = sigma * r with sigma = scale * std over all elements (numpy here). Uniform (reference code): r =
    alpha * u, alpha, u ~ U[0, 1), a product of two uniforms (dropping alpha would make r uniform). Gaussian (the
    paper): r ~ N(0, 1) with no segment fraction (alpha would shrink its variance to 1/3). Data of std far from 1 tell
    sigma from scale or scale * var; columns of std 3 and 0.3 tell it from a per-column std (each column is tested on
    its own: the uniform noise shares alpha across a row). scale = 0.7 is not the default 0.5."""
    gen = torch.Generator().manual_seed(1)
    real = torch.randn(4000, 2, dtype=torch.float64, generator=gen) * torch.tensor(spread, dtype=torch.float64) + 1.0
    sigma = 0.7 * np.std(real.numpy(), ddof=1)
    torch.manual_seed(0)
    ratio = ((gan.dragan_points(real, 0.7, noise=noise) - real) / sigma).numpy()
    for column in ratio.T:
        if noise == "uniform":  # E[alpha u] = 1/4
            assert column.min() >= 0 and column.max() <= 1
            assert stats.kstest(column, product_of_uniforms_cdf).pvalue > 1e-3
            assert column.mean() == pytest.approx(0.25, abs=0.02)
        else:
            assert stats.kstest(column, stats.norm.cdf).pvalue > 1e-3
            assert column.var() == pytest.approx(1.0, abs=0.08)
            assert (column < 0).mean() == pytest.approx(0.5, abs=0.03)  # symmetric: the uniform noise has none
    # One alpha per sample moves its coordinates together: corr(alpha u_1, alpha u_2) = (E[a^2] E[u]^2 - E[a]^2 E[u]^2)
    # / (E[a^2] E[u^2] - E[a]^2 E[u]^2) = (1/12 - 1/16) / (1/9 - 1/16) = 3/7; an alpha per element would give 0.
    correlation = np.corrcoef(ratio.T)[0, 1]
    assert correlation == pytest.approx(3 / 7 if noise == "uniform" else 0.0, abs=0.06)
    with pytest.raises(ValueError, match="noise must be"):
        gan.DRAGAN(noise="laplace")


def test_vanilla_discriminator_loss_labels_the_first_batch_real_by_hand():
    """loss_d = mean softplus(-D(real)) + mean softplus(D(fake)): swapped batches give another number (unequal sizes
    and a D that tells them apart)."""
    model = gan.GAN(width=8)
    model.discriminator = linear = nn.Linear(2, 1)
    gen = torch.Generator().manual_seed(0)
    real, fake = torch.randn(40, 2, generator=gen) + 1.0, torch.randn(24, 2, generator=gen) - 1.0
    with torch.no_grad():
        r, f = linear(real).squeeze(-1).double(), linear(fake).squeeze(-1).double()
        by_hand = (torch.nn.functional.softplus(-r).mean() + torch.nn.functional.softplus(f).mean()).item()
        swapped = (torch.nn.functional.softplus(-f).mean() + torch.nn.functional.softplus(r).mean()).item()
    assert abs(by_hand - swapped) > 0.1
    assert model.d_losses(real, fake)["loss_d"].item() == pytest.approx(by_hand, rel=1e-5)


def test_dragan_loss_is_bce_plus_lambda_times_the_closed_form_penalty():
    """A linear D has ||grad D|| = ||w|| everywhere, so loss_d = BCE + lambda (||w|| - 1)^2 whatever the points."""
    torch.manual_seed(0)
    model = gan.DRAGAN(penalty=3.0, width=8)
    linear = nn.Linear(2, 1)
    model.discriminator = linear
    real, fake = torch.randn(64, 2), torch.randn(64, 2)
    w = linear.weight.detach()
    with torch.no_grad():
        r, f = linear(real).squeeze(-1).double(), linear(fake).squeeze(-1).double()
    bce = (torch.nn.functional.softplus(-r).mean() + torch.nn.functional.softplus(f).mean()).item()
    losses = model.d_losses(real, fake)
    assert losses["penalty"].item() == pytest.approx(((w.norm() - 1) ** 2).item(), rel=1e-5)
    assert losses["loss_d"].item() == pytest.approx(bce + 3.0 * ((w.norm() - 1) ** 2).item(), rel=1e-5)


def _log_softmax_np(scores: np.ndarray) -> np.ndarray:
    top = scores.max(1, keepdims=True)
    return scores - top - np.log(np.exp(scores - top).sum(1, keepdims=True))


def test_madgan_losses_by_hand():
    """D: reals -> class k, row r of the fakes -> class r mod k; G: every fake -> class k (numpy log-softmax)."""
    k = 3
    model = gan.MADGAN(k=k, width=8)
    gen = torch.Generator().manual_seed(0)
    real_scores, fake_scores = torch.randn(5, k + 1, generator=gen), torch.randn(7, k + 1, generator=gen)
    real, fake = torch.zeros(5, 2), torch.ones(7, 2)
    model.logits = lambda x: real_scores[: len(x)] if bool((x == 0).all()) else fake_scores[: len(x)]
    model.generate = lambda n: fake[:n]
    lr, lf = _log_softmax_np(real_scores.double().numpy()), _log_softmax_np(fake_scores.double().numpy())
    expected_d = -lr[:, k].mean() - lf[np.arange(7), np.arange(7) % k].mean()
    assert model.d_losses(real, fake)["loss_d"].item() == pytest.approx(expected_d, rel=1e-5)
    expected_g = -lf[:5, k].mean()  # g_losses generates len(real) = 5 fakes
    assert model.g_losses(real)["loss_g"].item() == pytest.approx(expected_g, rel=1e-5)


def test_minibatch_discrimination_matches_a_loop_over_pairs_with_l1_distances():
    torch.manual_seed(0)
    layer = gan.MinibatchDiscrimination(in_features=4, kernels=3, kernel_dim=2, init_std=0.5)
    f = torch.randn(6, 4, dtype=torch.float64)
    layer.T.data = layer.T.data.double()
    m = (f @ layer.T.detach()).reshape(6, 3, 2).numpy()
    expected = np.array([[sum(math.exp(-np.abs(m[i, b] - m[j, b]).sum()) for j in range(6) if j != i)
                          for b in range(3)] for i in range(6)])
    out = layer(f).detach().numpy()
    np.testing.assert_allclose(out[:, :4], f.numpy())
    np.testing.assert_allclose(out[:, 4:], expected, rtol=1e-10)


@pytest.mark.parametrize("fresh_reals", [True, False])
def test_each_step_takes_d_steps_discriminator_updates_and_one_generator_update(fresh_reals):
    torch.manual_seed(0)
    model = gan.GAN(width=8, d_steps=3, fresh_reals=fresh_reals)
    assert model.batches_per_step == (3 if fresh_reals else 1)
    x = torch.randn(16 * model.batches_per_step, 2)  # what fit hands over: batches_per_step batches of 16, joined
    seen, d_losses, g_losses = [], model.d_losses, model.g_losses
    model.d_losses = lambda real, fake: (seen.append((real, len(fake))), d_losses(real, fake))[1]
    model.g_losses = lambda real: (seen.append((real, None)), g_losses(real))[1]
    model.step(x, torch.arange(len(x)))
    d_steps = {float(s["step"]) for s in model.optimizers["d"].state.values()}
    g_steps = {float(s["step"]) for s in model.optimizers["g"].state.values()}
    assert d_steps == {3.0} and g_steps == {1.0}
    # each D update on its own batch of 16 reals (or the one batch again), against 16 fakes; G with the last batch
    expected = list(x.split(16)) if fresh_reals else [x] * 3
    assert [n_fakes for _, n_fakes in seen[:3]] == [16] * 3
    assert all(torch.equal(real, want) for (real, _), want in zip(seen, [*expected, expected[-1]]))
    with pytest.raises(ValueError, match="equal batches"):
        gan.GAN(width=8, d_steps=3).step(torch.randn(16, 2), torch.arange(16))  # 16 reals are no 3 batches


@pytest.mark.parametrize("variant", list(gan.VARIANTS))
def test_each_players_optimiser_holds_exactly_its_own_networks(variant):
    """D's optimiser trains the discriminator, G's the generator and, for MRGAN, the encoder E beside it: an encoder
    left out of every optimiser would keep its random weights, and the reconstruction term would train G alone."""
    model = gan.VARIANTS[variant](width=8)

    def held(player):
        return [id(p) for group in model.optimizers[player].param_groups for p in group["params"]]

    def ids(*modules):
        return {id(p) for module in modules for p in module.parameters()}

    own_g = ids(model.generator, model.encoder) if variant == "mrgan" else ids(model.generator)
    assert sorted(held("d")) == sorted(ids(model.discriminator))
    assert sorted(held("g")) == sorted(own_g)
    assert not ids(model.discriminator) & own_g


# ----------------------------------------------------------------------------- each family uses its own ingredient


@pytest.mark.parametrize("family", ["gan", "dragan", "unrolled"])
@pytest.mark.parametrize("kind", gan.GENERATOR_LOSSES)
def test_the_generator_step_uses_the_chosen_loss(kind, family):
    """g_losses on fixed fakes is log(1 - sigmoid(l)) for 'minimax' and -log sigmoid(l) otherwise (by hand), and the
    two differ: a family that ignored ``loss`` would make every "GAN (minimax)" run a non-saturating one. The unrolled
    GAN's logits l come from D after its look-ahead: ``unroll`` steps of torch's Adam on a copy, on the same batch."""
    torch.manual_seed(0)
    model = gan.VARIANTS[family](width=8, loss=kind)
    fakes = 3 * torch.randn(32, 2)
    model.generate = lambda n: fakes[:n]
    judge = model.discriminator
    if family == "unrolled":
        judge = copy.deepcopy(model.discriminator)
        opt = torch.optim.Adam(judge.parameters(), **{k: v for k, v in model.optimizers["d"].defaults.items()
                                                       if k in ("lr", "betas", "eps")})
        for _ in range(model.unroll):
            opt.zero_grad()
            gan.discriminator_bce(judge(torch.zeros(32, 2)).squeeze(-1), judge(fakes).squeeze(-1)).backward()
            opt.step()
    with torch.no_grad():
        logits = judge(fakes).squeeze(-1).double()
    by_hand = {"minimax": torch.log(1 - torch.sigmoid(logits)).mean().item(),
               "non_saturating": -torch.log(torch.sigmoid(logits)).mean().item()}
    assert abs(by_hand["minimax"] - by_hand["non_saturating"]) > 0.1  # the check can tell the two apart
    assert model.g_losses(torch.zeros(32, 2))["loss_g"].item() == pytest.approx(by_hand[kind], rel=1e-5)


class RecordingSquareCritic(nn.Module):
    """A nonlinear critic that records its inputs: logit |x|^2 / 2, so grad = x and ||grad|| depends on the point."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))  # a parameter, so the model has a device
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return (self.scale * x.pow(2).sum(1, keepdim=True)) / 2


@pytest.mark.parametrize("noise", ["uniform", "gaussian"])
def test_dragan_penalises_points_drawn_with_its_own_noise(noise):
    """DRAGAN's penalty points (the critic's third input) move off the data one-sidedly for 'uniform' and
    symmetrically for 'gaussian', and the reported penalty is mean(||x_hat|| - 1)^2 at exactly those points (the
    square critic's gradient is x_hat): a family that dropped ``noise`` would run the paper's variant as uniform.
    On its defaults (the paper's: lambda 10, sigma = 0.5 std) loss_d = BCE + 10 penalty, and the points lie within
    0.5 std of the data (uniform: alpha u reaches nearly 1) or spread 0.5 std around it (gaussian)."""
    torch.manual_seed(0)
    model = gan.DRAGAN(noise=noise, width=8)
    critic = RecordingSquareCritic()
    model.discriminator = critic
    real, fake = torch.randn(2000, 2, dtype=torch.float64), torch.randn(2000, 2, dtype=torch.float64)
    critic.double()
    losses = model.d_losses(real, fake)
    (points,) = [x for x in critic.inputs if not torch.equal(x, real) and not torch.equal(x, fake)]
    below = ((points - real) < 0).double().mean().item()
    if noise == "uniform":
        assert below == 0.0
    else:
        assert below == pytest.approx(0.5, abs=0.03)
    penalty = ((points.norm(dim=1) - 1) ** 2).mean().item()
    assert losses["penalty"].item() == pytest.approx(penalty, rel=1e-10)
    bce = (F.softplus(-real.pow(2).sum(1) / 2).mean() + F.softplus(fake.pow(2).sum(1) / 2).mean()).item()
    assert losses["loss_d"].item() == pytest.approx(bce + 10 * penalty, rel=1e-10)
    ratio = (points - real) / (0.5 * real.std())
    if noise == "uniform":
        assert 0.9 < ratio.max().item() <= 1.0
    else:
        assert ratio.std().item() == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("shape,pack", [((2,), 4), ((1, 8, 8), 3)])
def test_pacgan_scores_packs_of_consecutive_distinct_samples(shape, pack):
    """Each logit is D on ``pack`` consecutive samples concatenated by hand (features, or channels for images); a
    pack of copies of one sample scores differently, so a family that packed duplicates would be a vanilla GAN."""
    torch.manual_seed(0)
    model = gan.PacGAN(pack=pack, width=4, shape=shape).eval()  # eval: a conv D normalises with fixed statistics
    x = torch.randn(2 * pack + 1, *shape)  # two packs, one sample left over
    by_hand = torch.stack([torch.cat([x[g * pack + j] for j in range(pack)]) for g in range(2)])
    with torch.no_grad():
        expected = model.discriminator(by_hand).squeeze(-1)
        duplicates = model.discriminator(torch.stack([torch.cat([x[g * pack]] * pack) for g in range(2)])).squeeze(-1)
        logits = model.logits(x)
    torch.testing.assert_close(logits, expected)
    assert (logits - duplicates).abs().min() > 1e-4


def test_minibatch_gan_logit_sees_how_many_copies_share_the_batch():
    """A batch of n copies of x has closeness n - 1 in every kernel (1 copy: 0), so its logit moves by (n - 1) times
    the sum of the final layer's closeness weights; a diverse batch gives x another logit. A family whose
    minibatch layer did nothing would give x the same logit in every batch."""
    torch.manual_seed(0)
    model = gan.MinibatchDiscriminationGAN(kernels=5, kernel_dim=3, features=6, width=8)
    model.eval()  # no batch statistics: only the minibatch layer may look at the rest of the batch
    x = torch.randn(1, 2)
    last = model.discriminator[-1]
    closeness_weight = last.weight[0, model.features:].sum().item()
    with torch.no_grad():
        alone = model.logits(x).item()
        copies = model.logits(x.expand(8, 2))
        diverse = model.logits(torch.cat([x, 5 * torch.randn(7, 2)]))
    torch.testing.assert_close(copies, torch.full((8,), copies[0].item()))
    assert copies[0].item() == pytest.approx(alone + 7 * closeness_weight, rel=1e-4, abs=1e-5)
    assert abs(closeness_weight) > 1e-3 and abs(diverse[0].item() - copies[0].item()) > 1e-3


class ConstantHead(nn.Module):
    """A MAD-GAN head that ignores its input and outputs the point (i, 0), so a sample names its generator."""

    def __init__(self, i: int):
        super().__init__()
        self.i = i

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.new_tensor([float(self.i), 0.0]).expand(len(h), 2)


def test_madgan_samples_pick_every_generator_uniformly():
    """Sampling draws a generator per sample uniformly: with heads that output their own index, the counts of 4000
    samples over k = 4 heads pass a chi-square test against 1000 each (sampling one head would give 4000, 0, 0, 0)."""
    torch.manual_seed(0)
    model = gan.MADGAN(k=4, width=8)
    model.generator = gan.MultiHeadGenerator(nn.Linear(model.z_dim, 3), [ConstantHead(i) for i in range(4)])
    samples = model.sample(4000)
    counts = np.bincount(samples[:, 0].round().long().numpy(), minlength=4)
    assert len(counts) == 4 and counts.sum() == 4000
    assert stats.chisquare(counts).pvalue > 1e-3
    # explicit heads still route each row to its own head
    routed = model.generator(torch.randn(6, model.z_dim), torch.tensor([3, 1, 0, 2, 2, 1]))
    assert routed[:, 0].tolist() == [3.0, 1.0, 0.0, 2.0, 2.0, 1.0]


@pytest.mark.parametrize("unroll, second_order", [(1, False), (4, False), (4, True)])
def test_unrolling_k_steps_matches_k_torch_adam_steps(unroll, second_order):
    """unroll = k equals k torch.optim.Adam steps on a copy of D (same real and fake batch each step, Adam state
    carried over from real steps, so the state is used), whether or not the generator's gradient flows through. The
    look-ahead steps at the rate D has decayed to (the toy tables decay it over the run), not the initial one."""
    torch.manual_seed(0)
    model = gan.UnrolledGAN(unroll=unroll, second_order=second_order, width=16, lr_d=1e-2, lr_decay_steps=2)
    real = torch.randn(32, 2)
    for _ in range(2):  # gives D's Adam a non-trivial state, and its rate decays to 1e-2 * (1 - 0.95 / 2)
        model.step(real, torch.arange(32))
    lr = model.optimizers["d"].param_groups[0]["lr"]
    assert lr == pytest.approx(1e-2 * (1 - 0.95 / 2))
    fake = model.generate(32).detach()
    unrolled = model.unrolled_parameters(real, fake)
    disc = copy.deepcopy(model.discriminator)
    opt = torch.optim.Adam(disc.parameters(), **{k: v for k, v in model.optimizers["d"].defaults.items()
                                                  if k in ("lr", "betas", "eps")})
    opt.load_state_dict(model.optimizers["d"].state_dict())  # the state and the decayed rate
    before = {name: p.detach().clone() for name, p in disc.named_parameters()}
    for _ in range(unroll):
        opt.zero_grad()
        gan.discriminator_bce(disc(real).squeeze(-1), disc(fake).squeeze(-1)).backward()
        opt.step()
    # atol: the unrolled step divides by sqrt(v + eps^2), Adam by sqrt(v) + eps (differs where |grad| ~ eps)
    for name, p in disc.named_parameters():
        torch.testing.assert_close(unrolled[name].detach(), p.detach(), atol=2e-5, rtol=1e-5)
    # steps of lr 5e-3 move D well beyond that tolerance, so fewer steps (or steps at 1e-2) would not match
    assert opt.param_groups[0]["lr"] == lr
    assert max((p.detach() - before[name]).abs().max().item() for name, p in disc.named_parameters()) > lr * 0.5


# ---- construction checks and flags, one by one (found by mutation testing) ------------------------------------------


@pytest.mark.parametrize("options, error", [({"lr_decay_steps": -1}, "lr_decay_steps"), ({"lr_final": 1.5}, "lr_final"),
                                            ({"lr_final": -0.1}, "lr_final"), ({"depth": 0}, "depth"),
                                            ({"d_steps": 0}, "d_steps")])
def test_gan_rejects_each_bad_setting_on_its_own(options, error):
    with pytest.raises(ValueError, match=error):
        gan.GAN(width=4, **options)


def test_gan_accepts_the_edges_of_its_settings():
    for options in ({"lr_final": 0.0}, {"lr_final": 1.0}, {"depth": 1}, {"d_steps": 1}):
        assert gan.GAN(width=4, **options).eval().sample(3).shape == (3, 2)
    # two generators are enough (in eval mode, as after fit: a head may draw a single row, too few for batch norm)
    assert gan.MADGAN(k=2, width=4).eval().sample(3).shape == (3, 2)
    assert gan.PacGAN(pack=1, width=4).logits(torch.randn(3, 2)).shape == (3,)  # a pack of one is a plain GAN
    with pytest.raises(ValueError, match="k >= 2"):
        gan.MADGAN(k=1, width=4)
    with pytest.raises(ValueError, match="pack must be >= 1"):
        gan.PacGAN(pack=0, width=4)


def test_a_one_step_decay_reaches_its_final_rate_after_one_update():
    model = gan.GAN(width=4, lr_d=1e-3, lr_g=2e-3, lr_decay_steps=1, lr_final=0.1)
    for _ in range(2):
        model.step(torch.randn(8, 2), torch.arange(8))
    assert model.optimizers["d"].param_groups[0]["lr"] == pytest.approx(1e-4)
    assert model.optimizers["g"].param_groups[0]["lr"] == pytest.approx(2e-4)


def test_only_families_with_a_fixed_step_may_be_replayed_as_a_cuda_graph():
    # a graph replays recorded kernels: a learning rate set from Python, or a host read, would be frozen or fail
    assert gan.GAN(width=4).graph_safe
    assert not gan.GAN(width=4, lr_decay_steps=10).graph_safe and not gan.GAN(width=4, lr_decay_steps=1).graph_safe
    assert not gan.UnrolledGAN(width=4).graph_safe  # reads D's step count on the host
    assert not gan.MADGAN(width=4).graph_safe  # routes rows with nonzero: a data-dependent shape


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_a_multihead_generator_path_is_as_deep_as_a_single_generator(depth):
    def linear_layers(module):
        return [layer for layer in module.modules() if isinstance(layer, nn.Linear)]

    multi = gan.make_multihead_generator(3, 4, (2,), 8, depth, conv=False)
    single = gan.make_generator(4, (2,), 8, depth, False)
    assert all(len(linear_layers(head)) == 2 for head in multi.heads)  # two-layer heads on a shared trunk
    assert len(linear_layers(multi.trunk)) + 2 == len(linear_layers(single)) == depth + 1


def test_minibatch_discrimination_starts_its_projection_at_the_asked_scale():
    torch.manual_seed(0)
    layer = gan.MinibatchDiscrimination(64, kernels=16, kernel_dim=8, init_std=0.3)
    assert layer.T.shape == (64, 128) and layer.T.std().item() == pytest.approx(0.3, rel=0.05)  # 8,192 draws
