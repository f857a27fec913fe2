"""Normalizing flows and the chapter's map: invertibility, exact log-determinants, normalisation,
the dequantisation convention, maximum-likelihood fitting, the ELBO bound and the chain rule."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import sympy as sp
import torch
from torch import nn

from genlib import flows as fl
from genlib.cli import TrainSpec
from genlib.data import BatchSampler, to_float
from genlib.train import fit




def perturbed(module: nn.Module, scale: float = 0.3, seed: int = 0) -> nn.Module:
    """``module`` with every parameter moved randomly, so zero-initialised couplings are no longer the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return module


def jacobian_logdet(fn, x: torch.Tensor) -> float:
    """``log|det d fn / dx|`` at one sample ``x [1, ...]`` from the full autograd Jacobian."""
    jac = torch.autograd.functional.jacobian(lambda v: fn(v.reshape(x.shape)).flatten(), x.flatten())
    return torch.linalg.slogdet(jac)[1].item()


def in_cube(*shape: int, dtype=torch.float32) -> torch.Tensor:
    """Points inside (-0.9, 0.9)^shape, valid inputs for every layer (the logit needs (-1, 1))."""
    return (torch.rand(*shape, generator=torch.Generator().manual_seed(1)) * 1.8 - 0.9).to(dtype)


def vector_coupling(kind, make_mask, dim=4, parity=0):
    outputs = 2 if kind is fl.AffineCoupling else 1
    return kind(make_mask(dim, parity), fl.coupling_mlp(dim, outputs, 16, 2))


def image_coupling(make_mask, shape=(2, 4, 4), parity=1):
    c = shape[0]
    return fl.AffineCoupling(make_mask(shape, parity), fl.coupling_resnet(2 * c, 2 * c, 8, 1), mask_as_input=True)


LAYERS = {
    "additive": (lambda: vector_coupling(fl.AdditiveCoupling, fl.alternating_mask), (4,)),
    "affine-alternating": (lambda: vector_coupling(fl.AffineCoupling, fl.alternating_mask, parity=1), (4,)),
    "affine-half": (lambda: vector_coupling(fl.AffineCoupling, fl.half_mask), (4,)),
    "permutation-reverse": (lambda: fl.Permutation(4, "reverse"), (4,)),
    "permutation-random": (lambda: fl.Permutation(4, "random", seed=3), (4,)),
    "logit": (lambda: fl.LogitTransform(0.05), (4,)),
    "checkerboard": (lambda: image_coupling(fl.checkerboard_mask), (2, 4, 4)),
    "channel": (lambda: image_coupling(fl.channel_mask), (2, 4, 4)),
    "squeezed": (lambda: fl.Squeezed(image_coupling(fl.channel_mask, (2, 2, 2)), level=1, active=2), (1, 4, 4)),
}
FLOWS = {
    "realnvp": (lambda: fl.RealNVP(4, n_layers=4, hidden=16), (4,)),
    "realnvp-additive-permuted": (lambda: fl.RealNVP(5, 4, 16, coupling="additive", mask="half",
                                                     permutation="random"), (5,)),
    "image-1x4x4": (lambda: fl.RealNVPImage((1, 4, 4), n_scales=2, width=8, blocks=1), (1, 4, 4)),
    "image-1x8x8": (lambda: fl.RealNVPImage((1, 8, 8), n_scales=3, width=4, blocks=1), (1, 8, 8)),
    "image-3x4x4": (lambda: fl.RealNVPImage((3, 4, 4), n_scales=2, width=4, blocks=1), (3, 4, 4)),
}
ALL = {**LAYERS, **FLOWS}


@pytest.mark.parametrize("name", list(ALL))
def test_inverse_undoes_forward(name):
    make, shape = ALL[name]
    torch.manual_seed(0)
    flow = perturbed(make(), 0.1)
    x = in_cube(8, *shape)
    with torch.no_grad():
        y, logdet = flow(x)
        assert y.shape == x.shape and logdet.shape == (8,)
        # float32 round trip; the logit transform of image flows amplifies rounding near the cube's edges
        torch.testing.assert_close(flow.inverse(y), x, atol=5e-5 if len(shape) == 3 else 1e-5, rtol=0)


@pytest.mark.parametrize("name", list(ALL))
def test_logdet_matches_autograd_jacobian_both_ways(name):
    make, shape = ALL[name]
    flow = perturbed(make(), 0.1).double()
    x = in_cube(1, *shape, dtype=torch.float64)
    y, logdet = flow(x)
    assert logdet.item() == pytest.approx(jacobian_logdet(lambda v: flow(v)[0], x), abs=1e-8)
    assert -logdet.item() == pytest.approx(jacobian_logdet(flow.inverse, y.detach()), abs=1e-8)


@pytest.mark.parametrize("dim, mask, permutation, n_layers", [
    (5, "alternating", "reverse", 6),  # reversing an odd length keeps even positions even
    (3, "alternating", "reverse", 4),
    (7, "alternating", "reverse", 8),
    (6, "alternating", "reverse", 4),
    (5, "half", "reverse", 4),
    (6, "half", "reverse", 4),
    (6, "alternating", "random", 4),  # the chapter's NICE and RealNVP checks
    (7, "alternating", "random", 4),
    (7, "alternating", "random", 6),
    (5, "half", "random", 4),
    (5, "alternating", None, 4),
])
def test_every_coordinate_of_a_vector_flow_is_transformed(dim, mask, permutation, n_layers):
    """No output of a perturbed RealNVP is an input passed through unchanged (autograd Jacobian, float64)."""
    flow = perturbed(fl.RealNVP(dim, n_layers, 16, mask=mask, permutation=permutation), 0.3).double()
    x = torch.randn(dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0][0], x)  # [output, input]
    # an output that no coupling transformed is one input, copied through masks and permutations:
    # its Jacobian row is a unit vector, one entry +-1 and zeros elsewhere
    copied = ((jac != 0).sum(1) == 1) & ((jac.abs().amax(1) - 1).abs() < 1e-12)
    assert not copied.any(), f"outputs {copied.nonzero().flatten().tolist()} copy an input unchanged"


@pytest.mark.parametrize("dim,mask,permutation,n_layers", [
    (5, "alternating", "random", 3),  # random permutations that leave input 4 out of every coupling
    (11, "half", "random", 4),
    (4, "alternating", None, 1),  # one coupling transforms half the coordinates
])
def test_a_vector_flow_that_would_copy_an_input_unchanged_is_refused(dim, mask, permutation, n_layers):
    with pytest.raises(ValueError, match="pass through all .* couplings unchanged"):
        fl.RealNVP(dim, n_layers, 16, mask=mask, permutation=permutation)


def test_permuted_vector_flow_flips_the_mask_parity_only_where_the_permutation_mixes_nothing():
    """With a permutation the mask parity stays 0 (the chapter's flows) unless the permutation maps the mask onto
    itself."""
    def parities(flow: fl.RealNVP) -> list[int]:
        masks = [layer.mask for layer in flow.layers if isinstance(layer, fl.Coupling)]
        return [int(m[0] == 0) for m in masks]  # alternating masks: parity 0 passes position 0

    assert parities(fl.RealNVP(6, 4, 8, permutation="random")) == [0, 0, 0, 0]  # the chapter's flows, as before
    assert parities(fl.RealNVP(6, 4, 8, permutation="reverse")) == [0, 0, 0, 0]  # even length: reversing swaps parities
    assert parities(fl.RealNVP(5, 4, 8, permutation="reverse")) == [0, 1, 0, 1]  # odd length: it keeps them
    assert parities(fl.RealNVP(5, 4, 8)) == [0, 1, 0, 1]


def test_coupling_jacobian_is_triangular_with_product_of_scales_symbolically():
    a, b, c, d = sp.symbols("x1:5")
    s = [sp.Function(f"s{i}")(a, b) for i in (1, 2)]
    t = [sp.Function(f"t{i}")(a, b) for i in (1, 2)]
    y = sp.Matrix([a, b, c * sp.exp(s[0]) + t[0], d * sp.exp(s[1]) + t[1]])
    jac = y.jacobian([a, b, c, d])
    assert jac[:2, 2:] == sp.zeros(2, 2)  # y_1 does not depend on x_2: block triangular
    assert jac[2:, 2:] == sp.diag(sp.exp(s[0]), sp.exp(s[1]))
    assert sp.simplify(jac.det() - sp.exp(s[0] + s[1])) == 0
    # The inverse of the source's eq. (15): x_2 = (y_2 - t(x_1)) exp(-s(x_1)), with x_1 = y_1.
    x2 = [(y[2 + i] - t[i]) * sp.exp(-s[i]) for i in (0, 1)]
    assert [sp.simplify(v) for v in x2] == [c, d]


def test_logit_transform_default_alpha_is_one_in_a_million_by_hand():
    # the default suits pixels at 0 or 255 (chapter 5): -1 and 1 map to logit(1e-6) and logit(1 - 1e-6), not +-2.94
    layer = fl.LogitTransform()
    x = torch.tensor([[-1.0, 0.0, 1.0]], dtype=torch.float64)
    y, logdet = layer(x)
    edge = math.log(1e-6) - math.log1p(-1e-6)  # -13.8155...
    torch.testing.assert_close(y, torch.tensor([[edge, 0.0, -edge]], dtype=torch.float64), rtol=0, atol=1e-9)
    # dy/dx = (1 - 2 alpha) / 2 / (w (1 - w)): about 1e6 / 2 at the edges (w = alpha), 2 at the centre (w = 1/2)
    by_hand = 2 * math.log((1 - 2e-6) / 2 / (1e-6 * (1 - 1e-6))) + math.log((1 - 2e-6) / 2 / 0.25)
    assert logdet.item() == pytest.approx(by_hand, abs=1e-9)
    torch.testing.assert_close(layer.inverse(y), x, rtol=0, atol=1e-9)
    for alpha in (0.0, 0.5, 0.7):  # at alpha >= 1/2 the squeeze 1 - 2 alpha is no longer positive
        with pytest.raises(ValueError, match=r"alpha must be in \(0, 0.5\)"):
            fl.LogitTransform(alpha)


def test_identity_initialised_flow_is_the_standard_normal():
    flow = fl.RealNVP(3, n_layers=6, hidden=16)
    x = torch.randn(50, 3)
    with torch.no_grad():
        expected = torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(1)
        torch.testing.assert_close(flow.log_prob(x), expected)
        torch.testing.assert_close(flow(x)[0], x)


def test_flow_fitted_to_a_gaussian_reaches_its_entropy():
    torch.manual_seed(0)
    cov, mean = torch.tensor([[2.0, 1.2], [1.2, 1.0]]), torch.tensor([1.0, -0.5])
    gaussian = torch.distributions.MultivariateNormal(mean, cov)
    entropy = 0.5 * torch.logdet(2 * math.pi * math.e * cov).item()
    model = fl.FlowModel(fl.RealNVP(2, n_layers=4, hidden=32), lr=5e-3, decay_steps=400)
    fit(model, BatchSampler(gaussian.sample((10_000,)), 256, seed=0), 400, progress=False)
    test = gaussian.sample((20_000,))
    with torch.no_grad():
        nll, true_nll = model.nll(test).mean().item(), -gaussian.log_prob(test).mean().item()
    assert true_nll == pytest.approx(entropy, abs=0.03)  # the test set is big enough to judge
    assert nll == pytest.approx(entropy, abs=0.05)
    assert -0.005 < nll - true_nll < 0.02  # an estimate of KL(data || model) >= 0, up to sampling noise


def test_flow_training_resumes_exactly_with_its_learning_rate_schedule(tmp_path):
    data = torch.randn(64, 2)

    def run(steps: int, run_dir=None) -> fl.FlowModel:
        torch.manual_seed(0)
        model = fl.FlowModel(fl.RealNVP(2, n_layers=2, hidden=8), lr=1e-2, decay_steps=6)
        fit(model, BatchSampler(data, 16, seed=0), steps, run_dir=run_dir, checkpoint_every=3, progress=False)
        return model

    straight = run(6)
    run(3, tmp_path)
    resumed = run(6, tmp_path)
    assert int(resumed.steps_done) == 6 and resumed.current_lr() == 0.0
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b)


def test_the_schedule_on_the_device_follows_the_python_one_and_trains_alike():
    """A replayed CUDA graph cannot have its learning rate set from Python: prepare_for_graph keeps it as a tensor
    that each step computes from steps_done. Here, on the CPU, both schedules train the same flow."""
    data = torch.randn(64, 2)

    def run(on_device: bool) -> tuple[fl.FlowModel, list[float]]:
        torch.manual_seed(0)
        model = fl.FlowModel(fl.RealNVP(2, n_layers=2, hidden=8), lr=1e-2, decay_steps=5)
        if on_device:
            model.prepare_for_graph()
        sampler, rates = BatchSampler(data, 16, seed=0), []
        for _ in range(7):
            model.step(*next(sampler))
            rates.append(float(model.optimizers["flow"].param_groups[0]["lr"]))
        return model, rates

    python, python_rates = run(False)
    device, device_rates = run(True)
    expected = [0.5 * 1e-2 * (1 + math.cos(math.pi * min(step / 5, 1.0))) for step in range(7)]
    assert python_rates == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert device_rates == pytest.approx(expected, rel=1e-6, abs=1e-9)  # a float32 tensor
    assert isinstance(device.optimizers["flow"].param_groups[0]["lr"], torch.Tensor)
    for a, b in zip(python.parameters(), device.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def grid_integral(log_prob, lim: float = 9.0, n: int = 361) -> float:
    """Riemann sum of ``exp(log_prob)`` over the square [-lim, lim]^2 with n x n points."""
    axis = torch.linspace(-lim, lim, n)
    points = torch.cartesian_prod(axis, axis)
    with torch.no_grad():
        return (log_prob(points).exp().sum() * (axis[1] - axis[0]) ** 2).item()


def test_random_flow_density_integrates_to_one():
    flow = perturbed(fl.RealNVP(2, n_layers=4, hidden=16), 0.2, seed=5)
    with torch.no_grad():
        assert not torch.allclose(flow(torch.ones(1, 2))[0], torch.ones(1, 2))  # really not the identity
    assert grid_integral(flow.log_prob) == pytest.approx(1.0, abs=0.01)


def test_bits_per_dim_of_the_identity_flow_on_a_constant_image_by_hand():
    alpha, k, u = 0.05, 127, 0.5
    flow = fl.RealNVPImage((1, 8, 8), n_scales=2, width=4, blocks=1, alpha=alpha)
    image = torch.full((1, 1, 8, 8), k / 127.5 - 1)  # what BatchSampler makes of pixel 127
    x = fl.dequantize(image, noise=torch.full_like(image, u))
    with torch.no_grad():
        got = fl.bits_per_dim(flow.log_prob(x), 64).item()
    # By hand, per pixel on the [0, 1] scale: v = (k + u) / 256, w = alpha + (1 - 2 alpha) v, y = logit(w).
    v = (k + u) / 256
    w = alpha + (1 - 2 * alpha) * v
    y = math.log(w / (1 - w))
    log_p01 = -0.5 * y * y - 0.5 * math.log(2 * math.pi) + math.log(1 - 2 * alpha) - math.log(w * (1 - w))
    assert got == pytest.approx((-log_p01 + math.log(256)) / math.log(2), abs=1e-4)


def test_bits_per_dim_conventions():
    d = 10
    assert fl.bits_per_dim(-d * math.log(2.0), d) == pytest.approx(8.0)  # uniform on [-1, 1)^D: 8 bits
    assert fl.bits_per_dim(0.0, d, width=1.0) == pytest.approx(8.0)  # uniform on [0, 1)^D
    image = torch.tensor([-1.0, 1.0])  # pixels 0 and 255 dequantise into the first and last cells
    lo, hi = fl.dequantize(image, torch.zeros(2)), fl.dequantize(image, torch.full((2,), 0.999))
    assert lo.tolist() == [-1.0, 255 / 128 - 1] and (hi < 1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dequantized_pixels_stay_in_their_own_cell_even_for_noise_just_below_one(dtype):
    k = torch.arange(256, dtype=dtype)
    image = k / 127.5 - 1  # what BatchSampler makes of pixels 0..255
    top = torch.full_like(image, 1.0).nextafter(torch.zeros_like(image))  # the largest u < 1 of this dtype
    for u in (torch.zeros_like(image), torch.full_like(image, 0.5), top):
        v = fl.dequantize(image, noise=u)
        assert v.dtype == dtype and (v >= -1).all() and (v < 1).all()
        assert torch.equal(torch.floor((v + 1) * 128), k)  # cell [k / 128 - 1, (k + 1) / 128 - 1) holds pixel k
    # values a little outside [-1, 1] (a resampled image, say) belong to the end pixels' cells
    v = fl.dequantize(torch.tensor([-1.3, 1.2], dtype=dtype), noise=torch.full((2,), 0.5, dtype=dtype))
    assert v.tolist() == [0.5 / 128 - 1, 255.5 / 128 - 1]


def test_linear_gaussian_vae_elbo_bounds_the_exact_log_likelihood():
    torch.manual_seed(0)
    w, b, sigma = torch.tensor([[1.5], [-0.7]]), torch.tensor([0.3, -0.2]), 0.5
    encoder, decoder = nn.Linear(2, 2), nn.Linear(1, 4)
    with torch.no_grad():  # decoder: mean w z + b, constant log-std log(sigma)
        decoder.weight.copy_(torch.cat([w, torch.zeros(2, 1)]))
        decoder.bias.copy_(torch.cat([b, torch.full((2,), math.log(sigma))]))
        # encoder = the exact posterior N(v w^T (x - b) / sigma^2, v), v = 1 / (1 + w^T w / sigma^2)
        v = 1 / (1 + (w.T @ w).item() / sigma**2)
        gain = v * w.T / sigma**2
        encoder.weight.copy_(torch.cat([gain, torch.zeros(1, 2)]))
        encoder.bias.copy_(torch.tensor([-(gain @ b).item(), math.log(v)]))
    vae = fl.VAE((2,), z_dim=1, likelihood="gaussian", encoder=encoder, decoder=decoder)
    x = torch.tensor([[0.5, 1.0], [-2.0, 0.4], [1.0, -1.0]])
    log_p = torch.distributions.MultivariateNormal(b, w @ w.T + sigma**2 * torch.eye(2)).log_prob(x)
    with torch.no_grad():
        tight = vae.elbo(x, samples=20_000)
        torch.testing.assert_close(tight, log_p, atol=0.02, rtol=0)  # exact posterior: ELBO = log p
        encoder.bias.add_(torch.tensor([0.5, -1.0]))  # any other q leaves a gap KL(q || posterior) > 0
        assert (vae.elbo(x, samples=20_000) < log_p - 0.1).all()


def test_autoregressive_probabilities_sum_to_one_over_all_binary_images():
    torch.manual_seed(0)
    model = fl.AutoregressiveModel((1, 2, 3), "bernoulli", hidden=32)
    perturbed(model.made, 0.5)
    images = torch.tensor(list(itertools.product([0.0, 1.0], repeat=6)))  # all 64 of them
    with torch.no_grad():
        total = model.log_prob(images).exp().sum().item()
    assert total == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("dim", [2, 5])
def test_made_is_autoregressive(dim):
    made = perturbed(fl.MADE(dim, k=3, hidden=16), 0.5)
    # a path can be switched off by dead ReLUs at one input, so take the union over a few seeded inputs
    inputs = torch.randn(20, dim, generator=torch.Generator().manual_seed(0))
    jac = torch.stack([torch.autograd.functional.jacobian(lambda v: made(v[None])[0], v) for v in inputs])  # [20,3,D,D]
    dependence = jac.abs().sum((0, 1)) > 0  # [output coordinate, input coordinate]
    assert torch.equal(dependence, torch.ones(dim, dim).tril(-1).bool())  # output i sees exactly x_<i
    assert made[0].mask.sum(1).max() == dim - 1  # no hidden unit sees x_D, which no output may depend on


def test_made_with_few_hidden_units_connects_every_output_to_most_of_its_past():
    d, hidden = 30, 8  # fewer hidden units than the D - 1 = 29 possible degrees, as MADE(784, hidden=256)
    made = fl.MADE(d, k=1, hidden=hidden)
    masks = [layer.mask for layer in made if isinstance(layer, fl.MaskedLinear)]  # [out, in] each
    reach = masks[-1]
    for mask in reversed(masks[:-1]):
        reach = reach @ mask
    reach = reach > 0  # [output i, input j]: some path of nonzero weights from x_j to output i
    # (a) autoregressive: output i never sees x_j for j >= i, by the masks and by autograd's Jacobian
    allowed = torch.ones(d, d).tril(-1).bool()
    assert not (reach & ~allowed).any()
    perturbed(made, 0.5)
    jac = torch.stack([torch.autograd.functional.jacobian(lambda v: made(v[None])[0, 0], v)
                       for v in torch.randn(20, d, generator=torch.Generator().manual_seed(0))])
    assert not ((jac.abs().sum(0) > 0) & ~allowed).any()
    # (b) the hidden degrees (a unit of degree h sees x_1..x_h) span 1..D-1, so the last output sees all its past
    degrees = masks[0].sum(1).long()
    assert degrees.min() == 1 and degrees.max() == d - 1
    assert reach[d - 1, : d - 1].all()
    # (c) output i sees x_j (j < i) iff some hidden degree h has j <= h < i; count that from the degree formula
    formula = [round(1 + k * (d - 2) / (hidden - 1)) for k in range(hidden)]
    assert sorted(set(degrees.tolist())) == sorted(set(formula))
    connected = sum(any(j <= h < i for h in formula) for i in range(1, d + 1) for j in range(1, i))
    needed = d * (d - 1) // 2
    assert int(reach.sum()) == connected
    assert connected / needed >= 0.85  # degrees 1..8 only (the old layout) would connect 204 / 435 = 47%


def test_gaussian_mixture_autoregression_integrates_to_one():
    # seeded: the random conditionals' spread grows with |x_1| (ReLU net), and for some initialisations
    # a few percent of the mass lies beyond the grid; this one keeps it inside, unlike an unseeded draw
    torch.manual_seed(0)
    model = fl.AutoregressiveModel((2,), "gmm", hidden=16, components=3)
    perturbed(model.made, 0.3)
    assert grid_integral(lambda p: model.log_prob(p), lim=12.0, n=481) == pytest.approx(1.0, abs=0.01)


def test_vector_vae_samples_are_draws_of_its_gaussian_likelihood_not_its_means():
    """The chapter's 2-D map scores the VAE's draws of q(x | z): with a decoder whose output ignores z, the
    samples must follow N(mean, std^2) exactly (the decoder's means alone would have zero spread)."""
    torch.manual_seed(0)
    mean, std = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0])
    decoder = nn.Linear(1, 4)
    with torch.no_grad():
        decoder.weight.zero_()
        decoder.bias.copy_(torch.cat([mean, std.log()]))
    vae = fl.VAE((2,), z_dim=1, likelihood="gaussian", encoder=nn.Linear(2, 2), decoder=decoder)
    n = 40_000
    samples = vae.sample(n)
    assert samples.shape == (n, 2)
    # 5 standard errors: the sample mean's is std / sqrt(n), the sample std's about std / sqrt(2 n)
    torch.testing.assert_close(samples.mean(0), mean, atol=float(5 * std.max() / n**0.5), rtol=0)
    torch.testing.assert_close(samples.std(0), std, atol=0, rtol=5 / (2 * n) ** 0.5)


def test_autoencoder_step_reports_the_summed_squared_reconstruction_error_by_hand():
    torch.manual_seed(0)
    ae = fl.Autoencoder((3,), z_dim=2, width=8)
    x = torch.randn(16, 3)
    with torch.no_grad():
        by_hand = ((ae.decode(ae.encoder(x)) - x) ** 2).sum(1).mean().item()  # before the step's update
    assert ae.step(x, torch.arange(len(x)))["recon"].item() == pytest.approx(by_hand, rel=1e-6)


def test_vector_autoencoder_samples_from_the_gaussian_fitted_to_its_codes():
    """With momentum 1 one step stores the batch's code mean and covariance (numpy, independently); with an
    identity decoder the samples then follow that Gaussian."""
    torch.manual_seed(0)
    ae = fl.Autoencoder((2,), z_dim=2, width=16, momentum=1.0)
    x = torch.randn(256, 2) @ torch.tensor([[2.0, 0.0], [1.5, 0.5]]) + torch.tensor([1.0, -1.0])
    with torch.no_grad():
        codes = ae.encoder(x).numpy().astype(np.float64)  # the codes the step sees, before its update
    ae.step(x, torch.arange(len(x)))
    np.testing.assert_allclose(ae.code_mean.numpy(), codes.mean(0), atol=1e-5)
    np.testing.assert_allclose(ae.code_cov.numpy(), np.cov(codes.T), atol=1e-5)
    ae.decoder = nn.Identity()  # decode(z) = z: the samples are the drawn codes
    samples = ae.sample(40_000).double().numpy()
    scale = float(np.sqrt(np.diag(np.cov(codes.T)).max()))
    np.testing.assert_allclose(samples.mean(0), codes.mean(0), atol=5 * scale / 200)
    np.testing.assert_allclose(np.cov(samples.T), np.cov(codes.T), atol=0.05 * scale**2)


def test_layerwise_states_run_from_data_to_latent_and_back():
    flow = perturbed(fl.RealNVPImage((1, 8, 8), n_scales=2, width=4, blocks=1), 0.1)
    x = in_cube(3, 1, 8, 8)
    states = fl.layerwise(flow, x)
    with torch.no_grad():
        z = flow(x)[0]
    assert len(states) == len(flow.layers) + 1 and all(s.shape == x.shape for s in states)
    torch.testing.assert_close(states[-1], z)
    back = fl.layerwise(flow, z, inverse=True)
    torch.testing.assert_close(back[-1], x, atol=1e-5, rtol=0)


def test_image_flow_shapes_and_scales():
    assert [fl.max_scales(s) for s in [(1, 28, 28), (3, 64, 64), (3, 32, 32), (1, 8, 8)]] == [3, 5, 4, 2]
    assert fl.max_scales((3, 128, 128)) == 5 and fl.max_scales((3, 128, 128), cap=6) == 6  # the cap holds
    assert fl.max_scales((1, 8, 64)) == fl.max_scales((1, 64, 8)) == 2  # the shorter side decides
    for shape in [(1, 28, 28), (1, 12, 16), (1, 16, 12)]:  # 4 scales squeeze 3 times: both sides must divide by 8
        with pytest.raises(ValueError, match="squeezed 3 times"):
            fl.RealNVPImage(shape, n_scales=4)
    flow = fl.RealNVPImage((1, 28, 28), n_scales=3, width=4, blocks=1)
    assert flow.sample(2).shape == (2, 1, 28, 28)
    # the docstring's layout: a logit, 3 checkerboard + 3 channel couplings per scale but the last, which has 4
    # checkerboard couplings; the active channels double at each squeeze-and-factor-out (1 -> 4 -> 2 -> 8 -> 4)
    kinds = [(type(layer).__name__, getattr(layer, "level", None), getattr(layer, "active", None))
             for layer in flow.layers]
    expected = [("LogitTransform", None, None)]
    for level, (board, channels) in enumerate([(1, 4), (2, 8), (4, None)]):
        expected += [("Squeezed", level, board)] * (3 if channels else 4)
        expected += [("Squeezed", level + 1, channels)] * 3 if channels else []
    assert kinds == expected
    boards = [layer.layer.mask for layer in flow.layers[1:4]]  # parities alternate: every pixel is transformed
    assert torch.equal(boards[0] + boards[1], torch.ones_like(boards[0])) and torch.equal(boards[0], boards[2])


def test_residual_block_adds_its_body_to_its_input():
    block = fl.ResidualBlock(3)
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(block(x), x + block.body(x))
        nn.init.zeros_(block.body[-1].weight)
        nn.init.zeros_(block.body[-1].bias)
        torch.testing.assert_close(block(x), x)  # a zeroed last conv leaves the identity: deep nets start trainable


def spec_for(data: torch.Tensor, **options: str) -> TrainSpec:
    return TrainSpec(data, tuple(data.shape[1:]), torch.device("cpu"), z_dim=4, width=8, lr=1e-3, batch_size=8,
                     options=dict(options))


IMAGES = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
POINTS = torch.randn(64, 2)
MODELS = {
    "realnvp-vector": (lambda: fl.build_realnvp(spec_for(POINTS, layers="2")), POINTS, {"nll"}),
    "realnvp-image": (lambda: fl.build_realnvp(spec_for(IMAGES, blocks="1")), IMAGES, {"nll", "bits_per_dim"}),
    "ar-image": (lambda: fl.build_autoregressive(spec_for(IMAGES, hidden="16")), IMAGES, {"nll", "bits_per_dim"}),
    "ar-gmm": (lambda: fl.build_autoregressive(spec_for(POINTS, hidden="16")), POINTS, {"nll"}),
    "ae-image": (lambda: fl.build_autoencoder(spec_for(IMAGES)), IMAGES, {"recon"}),
    "ae-vector": (lambda: fl.build_autoencoder(spec_for(POINTS)), POINTS, {"recon"}),
    "vae-bernoulli": (lambda: fl.build_vae(spec_for(IMAGES)), IMAGES, {"neg_elbo", "bits_per_dim"}),
    "vae-gaussian-image": (lambda: fl.build_vae(spec_for(IMAGES, likelihood="gaussian")), IMAGES,
                           {"neg_elbo", "bits_per_dim"}),
    "vae-vector": (lambda: fl.build_vae(spec_for(POINTS)), POINTS, {"neg_elbo"}),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_every_family_trains_through_fit_and_samples(name):
    torch.manual_seed(0)
    build, data, keys = MODELS[name]
    model = build()
    history = fit(model, BatchSampler(data, 8, seed=0), 3, log_every=3, progress=False)
    assert set(history) == keys | {"step"} and all(math.isfinite(v[-1]) for k, v in history.items())
    samples = model.sample(4)
    assert samples.shape == (4, *data.shape[1:]) and torch.isfinite(samples).all()
    if data.dtype == torch.uint8:
        assert samples.abs().max() <= 1


def test_image_flow_masks_alternate_and_conditioner_widths_stop_growing_at_four_times():
    flow = fl.RealNVPImage((1, 32, 32), n_scales=4, width=2, blocks=1)
    couplings = [layer for layer in flow.layers if isinstance(layer, fl.Squeezed)]
    for first, second in zip(couplings, couplings[1:]):
        if (first.level, first.active) == (second.level, second.active):  # the same stage: complementary masks
            assert torch.equal(first.layer.mask + second.layer.mask, torch.ones_like(first.layer.mask))
    widths = {layer.level: layer.layer.net[0].out_channels for layer in couplings}
    assert widths == {0: 2, 1: 4, 2: 8, 3: 8}  # doubling per scale, capped at 4 x width


def test_autoregressive_model_has_one_output_per_coordinate_and_parameter():
    assert fl.AutoregressiveModel((1, 2, 2), "bernoulli", hidden=4).made(torch.zeros(1, 4)).shape == (1, 1, 4)
    gmm = fl.AutoregressiveModel((3,), "gmm", hidden=4, components=2)
    assert gmm.made(torch.zeros(1, 3)).shape == (1, 3 * 2, 3)  # a logit, a mean and a log-std per component


def test_image_vaes_report_bits_per_dim_of_their_negative_elbo():
    bernoulli = fl.VAE((1, 8, 8), z_dim=1, width=4, likelihood="bernoulli").report(torch.tensor(10.0))
    torch.testing.assert_close(bernoulli["bits_per_dim"], torch.tensor(10.0 / (64 * math.log(2))))
    # dequantised pixels on [-1, 1): each of the 256 cells has width 2 / 256
    gaussian = fl.VAE((1, 8, 8), z_dim=1, width=4, likelihood="gaussian").report(torch.tensor(10.0))
    torch.testing.assert_close(gaussian["bits_per_dim"], torch.tensor((10.0 + 64 * math.log(128)) / (64 * math.log(2))))


def test_realnvp_builder_defaults_are_the_documented_ones_and_options_override_them():
    vector = fl.build_realnvp(spec_for(POINTS))
    assert sum(isinstance(layer, fl.Coupling) for layer in vector.flow.layers) == 8
    assert vector.clip == 100.0 and vector.decay_steps is None and not vector.discrete
    image = fl.build_realnvp(spec_for(IMAGES)).flow  # 8 x 8: two scales
    assert isinstance(image.layers[0], fl.LogitTransform) and image.layers[0].alpha == 1e-6
    assert {layer.level for layer in image.layers[1:]} == {0, 1}
    assert {sum(isinstance(m, fl.ResidualBlock) for m in layer.layer.net) for layer in image.layers[1:]} == {2}
    tuned = fl.build_realnvp(spec_for(IMAGES, blocks="1", clip="5", decay_steps="10"))
    assert tuned.clip == 5.0 and tuned.decay_steps == 10 and tuned.discrete


def test_smallest_autoregressive_model_is_accepted():
    model = fl.AutoregressiveModel((3,), "gmm", hidden=1, depth=1, components=1)
    assert model.sample_losses(torch.randn(4, 3)).shape == (4,)
    with pytest.raises(ValueError, match="depth"):
        fl.AutoregressiveModel((3,), "gmm", hidden=1, depth=0, components=1)


@pytest.mark.parametrize("shape", [(3,), (3, 8, 8)])
def test_autoencoder_and_gaussian_vae_handle_three_coordinates_or_channels(shape):
    torch.manual_seed(0)
    ae = fl.Autoencoder(shape, z_dim=2, width=8)
    vae = fl.VAE(shape, z_dim=2, width=8, likelihood="gaussian")
    assert ae.sample(4).shape == vae.sample(4).shape == (4, *shape)
    p_x = vae.decode(torch.randn(4, 2))
    assert p_x.mean.shape == p_x.stddev.shape == (4, *shape)
    if len(shape) == 3:  # images: the autoencoder's decoder ends in tanh, whatever the code
        assert ae.decode(1e3 * torch.randn(4, 2)).abs().max() <= 1


def test_flow_evaluate_reports_nll_and_bits_per_dim_of_a_dataset():
    """The keys only: the values are checked against a closed form in the uint8 test below."""
    model = fl.build_realnvp(spec_for(IMAGES, blocks="1"))
    assert set(model.evaluate(IMAGES, batch_size=10)) == {"nll", "bits_per_dim"}


def uniform_cell_mean_square(k: int) -> float:
    """``E[v^2]`` for v uniform on pixel k's dequantisation cell ``[k / 128 - 1, (k + 1) / 128 - 1)`` (closed form)."""
    a, b = k / 128 - 1, (k + 1) / 128 - 1
    return (a * a + a * b + b * b) / 3


PIXELS = [0, 127, 128, 255]


def test_discrete_flow_nll_is_of_the_dequantised_image_in_closed_form():
    # identity flow, so -log p(v) = |v|^2 / 2 + D log(2 pi) / 2 with v the dequantised pixel, uniform in its cell;
    # scoring the undequantised k / 127.5 - 1 instead would put pixels 0 and 255 at the cells' far ends (|v| = 1)
    torch.manual_seed(0)
    model = fl.FlowModel(fl.RealNVP(4, n_layers=2, hidden=8), discrete=True)
    x = (torch.tensor(PIXELS) / 127.5 - 1).repeat(20_000, 1)  # what BatchSampler makes of these pixels
    with torch.no_grad():
        nll = model.nll(x)
    expected = sum(0.5 * uniform_cell_mean_square(k) for k in PIXELS) + 2 * math.log(2 * math.pi)
    assert nll.mean().item() == pytest.approx(expected, abs=2e-4)  # the gap to |x|^2 / 2 is 0.008
    # every draw lies in its cells: the nll sits between the sums of the per-cell extremes (|v| < 1 strictly)
    lo = sum(0.5 * min(abs(k / 128 - 1), abs((k + 1) / 128 - 1)) ** 2 for k in PIXELS) + 2 * math.log(2 * math.pi)
    hi = sum(0.5 * max(abs(k / 128 - 1), abs((k + 1) / 128 - 1)) ** 2 for k in PIXELS) + 2 * math.log(2 * math.pi)
    assert (nll >= lo - 1e-5).all() and (nll < hi).all() and nll.std() > 1e-3


def test_flow_evaluate_on_uint8_data_gives_the_closed_form_nll_and_bits_per_dim():
    # the same identity flow through evaluate(): uint8 pixels are mapped to [-1, 1], dequantised and scored
    torch.manual_seed(0)
    model = fl.FlowModel(fl.RealNVP(4, n_layers=2, hidden=8), discrete=True)
    result = model.evaluate(torch.tensor(PIXELS, dtype=torch.uint8).repeat(20_000, 1), batch_size=5000)
    nll = sum(0.5 * uniform_cell_mean_square(k) for k in PIXELS) + 2 * math.log(2 * math.pi)
    assert result["nll"] == pytest.approx(nll, abs=2e-4)
    # by hand: a cell of [-1, 1) has width 1/128, so P(k) ~ p(v) / 128 per pixel and bits = -log2 P per pixel
    assert result["bits_per_dim"] == pytest.approx((nll / 4 + math.log(128)) / math.log(2), abs=1e-4)


def test_discrete_flow_samples_are_clamped_to_the_pixel_range():
    # identity couplings behind a logit with alpha 0.4: x = 2 (sigmoid(z) - 0.4) / 0.2 - 1 = 10 sigmoid(z) - 5
    # covers (-5, 5); x >= 1 iff z >= logit(0.6) = log 1.5, so a fraction 1 - Phi(log 1.5) of pixels clamps to 1
    # (and as many to -1)
    flow = fl.RealNVPImage((1, 4, 4), n_scales=1, width=4, blocks=1, alpha=0.4)
    tail = 0.5 * math.erfc(math.log(1.5) / math.sqrt(2))  # 0.343
    torch.manual_seed(0)
    clamped = fl.FlowModel(flow, discrete=True).sample(500)
    assert clamped.min() == -1 and clamped.max() == 1
    assert (clamped == 1).float().mean().item() == pytest.approx(tail, abs=0.03)  # 8000 pixels: 5 std errors
    assert (clamped == -1).float().mean().item() == pytest.approx(tail, abs=0.03)
    torch.manual_seed(0)
    raw = fl.FlowModel(flow, discrete=False).sample(500)  # continuous data: not clamped
    assert (raw > 1).float().mean().item() == pytest.approx(tail, abs=0.03) and raw.max() > 4


def test_sampling_temperature_scales_the_base_draw():
    flow = perturbed(fl.RealNVP(3, n_layers=4, hidden=16), 0.2)
    torch.manual_seed(0)
    got = flow.sample(50, temperature=0.4)
    torch.manual_seed(0)
    z = torch.randn(50, 3)
    with torch.no_grad():
        torch.testing.assert_close(got, flow.inverse(0.4 * z))
        # temperature 0: every sample is the image of the base mode
        cold = flow.sample(5, temperature=0.0)
        torch.testing.assert_close(cold, flow.inverse(torch.zeros(5, 3)))


def test_bernoulli_autoregressive_samples_are_pm1_images_with_the_model_frequencies():
    torch.manual_seed(0)
    model = fl.AutoregressiveModel((1, 1, 3), "bernoulli", hidden=16)
    perturbed(model.made, 0.8)
    n = 20_000
    samples = model.sample(n)
    assert set(samples.unique().tolist()) <= {-1.0, 1.0}  # the data range, like every other family's samples
    images = torch.tensor(list(itertools.product([0.0, 1.0], repeat=3)))
    with torch.no_grad():
        p = model.log_prob(images).exp()
    bits = (samples.flatten(1) > 0).float()
    freq = torch.stack([(bits == img).all(1).float().mean() for img in images])
    assert torch.all((freq - p).abs() < 5 * (p * (1 - p) / n).sqrt() + 1e-3)  # sequential sampler draws p(x)


def test_bernoulli_image_vae_samples_are_pixel_probabilities_mapped_to_pm1():
    decoder = nn.Linear(1, 4)
    with torch.no_grad():
        decoder.weight.zero_()
        decoder.bias.copy_(torch.tensor([-30.0, 30.0, 0.0, math.log(3.0)]))  # p = 0, 1, 1/2, 3/4
    vae = fl.VAE((1, 2, 2), z_dim=1, likelihood="bernoulli", encoder=nn.Linear(4, 2), decoder=decoder)
    samples = vae.sample(3)
    expected = torch.tensor([-1.0, 1.0, 0.0, 0.5]).reshape(1, 1, 2, 2).expand(3, 1, 2, 2)
    torch.testing.assert_close(samples, expected, atol=1e-6, rtol=0)


def test_binarize_sets_pixels_from_128_up_to_one():
    # the book: pixel >= 128 becomes 1; checked on every 8-bit value as the sampler maps it to [-1, 1]
    k = torch.arange(256)
    x = to_float(k.to(torch.uint8)).reshape(4, 1, 8, 8)
    expected = (k >= 128).float().reshape(4, 1, 8, 8)
    assert torch.equal(fl.binarize(x), expected)
    # both binary families model exactly those bits
    assert torch.equal(fl.AutoregressiveModel((1, 8, 8), hidden=8).prepare(x), expected.flatten(1))
    assert torch.equal(fl.VAE((1, 8, 8), z_dim=2, width=8).prepare(x), expected)


def test_gaussian_image_vae_models_dequantised_pixels():
    # like the flows: pixel k becomes uniform on [k / 128 - 1, (k + 1) / 128 - 1), so its mean is the cell's centre
    torch.manual_seed(0)
    vae = fl.VAE((1, 8, 8), z_dim=2, width=8, likelihood="gaussian")
    k = torch.arange(256).reshape(4, 1, 8, 8)
    x = to_float(k.to(torch.uint8)).repeat(200, 1, 1, 1)
    v = vae.prepare(x).reshape(200, 4, 1, 8, 8)
    assert (v >= -1).all() and (v < 1).all()
    assert torch.equal(torch.floor((v + 1) * 128), k.expand_as(v).float())  # each draw in its pixel's cell
    # 200 draws of a uniform of width 1/128: the mean's standard error is 1.6e-4
    torch.testing.assert_close(v.mean(0), (k + 0.5) / 128 - 1, atol=1e-3, rtol=0)
    assert v.std(0).min() > 1e-3  # noise, not a fixed offset
    points = torch.randn(5, 2)
    assert torch.equal(fl.VAE((2,), likelihood="gaussian").prepare(points), points)  # vectors as they are


def test_multiscale_flow_factors_out_half_the_channels_after_each_scale():
    # 1x8x8, 2 scales: logit, 3 checkerboard couplings (level 0), 3 channel couplings on the 4 squeezed channels,
    # then the leading 2 squeezed channels are final z and only the trailing 2 are transformed further
    flow = perturbed(fl.RealNVPImage((1, 8, 8), n_scales=2, width=4, blocks=1), 0.1)
    states = fl.layerwise(flow, (torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.8 - 0.9))
    after_factor = 1 + 3 + 3
    frozen = fl.squeeze(states[after_factor], 1)[:, :2]
    for s in states[after_factor + 1:]:
        torch.testing.assert_close(fl.squeeze(s, 1)[:, :2], frozen, atol=0, rtol=0)
    assert not torch.allclose(fl.squeeze(states[-1], 1)[:, 2:], fl.squeeze(states[after_factor], 1)[:, 2:])


def test_squeeze_puts_each_pixel_where_the_docstring_says_by_brute_force():
    # channel 4 c + 2 di + dj at (i, j) holds pixel (2 i + di, 2 j + dj) of channel c; twice for times=2
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    once, twice = fl.squeeze(x), fl.squeeze(x, 2)
    assert once.shape == (2, 12, 4, 4) and twice.shape == (2, 48, 2, 2)
    for c, di, dj, ei, ej in itertools.product(range(3), range(2), range(2), range(2), range(2)):
        for i, j in itertools.product(range(4), range(4)):
            assert once[1, 4 * c + 2 * di + dj, i, j] == x[1, c, 2 * i + di, 2 * j + dj]
        for i, j in itertools.product(range(2), range(2)):
            got = twice[1, 4 * (4 * c + 2 * di + dj) + 2 * ei + ej, i, j]
            assert got == x[1, c, 2 * (2 * i + ei) + di, 2 * (2 * j + ej) + dj]
    assert torch.equal(fl.unsqueeze(once), x) and torch.equal(fl.unsqueeze(twice, 2), x)
    # the promise factoring-out relies on: the last n channels at one level hold the pixels of the last 4 n at the
    # next, for every n
    for n in range(1, 13):
        assert set(once[:, -n:].flatten().tolist()) == set(twice[:, -4 * n:].flatten().tolist())


# Pixels [C, H, W] that no layer may change once a scale's factor-out is done, by hand from the squeeze layout.
# 1x8x8, 3 scales: the first factor-out keeps squeezed channels 2 and 3 (odd rows), the second keeps only level-2
# channels 12..15, i.e. level-1 channel 3 (odd rows, odd columns). 2x4x4, 2 scales: squeezed channels 4..7 go on,
# which are all of image channel 1.
ODD_ROWS = (torch.arange(8) % 2 == 1)[:, None].expand(8, 8)
ODD_BOTH = ODD_ROWS & (torch.arange(8) % 2 == 1)[None, :]
FACTORED = {
    "1x8x8-3-scales": ((1, 8, 8), 3, {7: ~ODD_ROWS[None], 13: ~ODD_BOTH[None]}),
    "2x4x4-2-scales": ((2, 4, 4), 2, {7: torch.tensor([True, False])[:, None, None].expand(2, 4, 4)}),
}


@pytest.mark.parametrize("name", list(FACTORED))
def test_factored_out_pixels_stay_fixed_at_every_later_layer(name):
    # layer index after a factor-out: logit, then 3 checkerboard + 3 channel couplings per scale
    shape, scales, frozen_after = FACTORED[name]
    flow = perturbed(fl.RealNVPImage(shape, n_scales=scales, width=4, blocks=1), 0.1)
    states = fl.layerwise(flow, in_cube(3, *shape))
    for start, frozen in frozen_after.items():
        for s in states[start + 1:]:
            torch.testing.assert_close(s[:, frozen], states[start][:, frozen], atol=0, rtol=0)
    last = max(frozen_after)
    moving = ~frozen_after[last]
    # and the pixels still active do move: the perturbed couplings change every one of them by the end
    assert (states[-1][:, moving] != states[last][:, moving]).all()


def test_flow_step_clips_the_gradient_norm():
    torch.manual_seed(0)
    flow = perturbed(fl.RealNVP(2, n_layers=2, hidden=8), 0.3)
    x = 3 * torch.randn(64, 2)
    reference = copy.deepcopy(flow)
    (-reference.log_prob(x).mean()).backward()
    raw = torch.cat([p.grad.flatten() for p in reference.parameters()])
    clip = 0.1 * float(raw.norm())
    model = fl.FlowModel(flow, lr=1e-3, clip=clip)
    model.step(x, torch.arange(64))
    clipped = torch.cat([p.grad.flatten() for p in flow.parameters()])
    torch.testing.assert_close(clipped, raw * clip / raw.norm(), rtol=1e-4, atol=1e-7)


def test_independent_pixels_log_prob_counts_each_pixel_by_hand(device):
    train = torch.tensor([[[0, 1], [2, 2]], [[0, 2], [2, 0]], [[1, 1], [2, 0]]])  # 3 images of 4 pixels, levels 0..2
    test = torch.tensor([[[0, 1], [2, 0]], [[2, 2], [0, 1]]])
    smoothing, levels = 0.5, 3
    want = []
    for image in test.flatten(1):
        log_p = 0.0
        for pixel, value in enumerate(image.tolist()):
            count = int((train.flatten(1)[:, pixel] == value).sum())
            log_p += math.log((count + smoothing) / (len(train) + levels * smoothing))
        want.append(log_p)
    have = fl.independent_pixels_log_prob(train.to(device), test.to(device), levels=levels, smoothing=smoothing)
    torch.testing.assert_close(have.cpu(), torch.tensor(want, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"integers in \[0, 3\)"):
        fl.independent_pixels_log_prob(train, test + 1, levels=3)


def test_independent_pixels_dequantised_density_gives_the_same_bits_per_dim():
    """A histogram's density on the dequantisation cells is P / (2/256)^D: both columns of the table agree."""
    train = torch.randint(0, 256, (40, 6), generator=torch.Generator().manual_seed(0))
    log_mass = fl.independent_pixels_log_prob(train, train[:5])
    log_density = log_mass - 6 * math.log(2 / 256)
    torch.testing.assert_close(fl.bits_per_dim(log_density, 6), fl.discrete_bits_per_dim(log_mass, 6))


def test_gaussian_log_density_matches_scipy(device):
    from scipy.stats import multivariate_normal

    gen = torch.Generator().manual_seed(0)
    train = torch.randn(20_000, 5, generator=gen) @ torch.randn(5, 5, generator=gen) + 3.0
    test = torch.randn(7, 1, 5, generator=gen)
    data = train.double().numpy()
    reference = multivariate_normal(data.mean(0), np.cov(data.T, bias=True) + 1e-6 * np.eye(5))
    have = fl.gaussian_log_density(train.to(device), test.to(device)).cpu()
    np.testing.assert_allclose(have.numpy(), reference.logpdf(test.flatten(1).numpy()), rtol=1e-9)


def test_masks_follow_their_definitions_element_by_element():
    for parity in (0, 1):
        board = fl.checkerboard_mask((3, 4, 5), parity)
        channels = fl.channel_mask((4, 2, 3), parity)
        assert board.shape == (3, 4, 5) and channels.shape == (4, 2, 3)
        for c, i, j in itertools.product(range(3), range(4), range(5)):
            assert board[c, i, j] == float((i + j) % 2 == parity)
        for c, i, j in itertools.product(range(4), range(2), range(3)):
            assert channels[c, i, j] == float((c < 2) == (parity == 0))
        for d in range(5):
            assert fl.alternating_mask(5, parity)[d] == float(d % 2 == parity)
        for d in range(6):
            assert fl.half_mask(6, parity)[d] == float((d < 3) == (parity == 0))
    assert fl.checkerboard_mask((1, 2, 2), 0)[0].tolist() == [[1.0, 0.0], [0.0, 1.0]]


def _step_families() -> dict:
    """name -> (model, batch, logged key, the objective on the batch computed without the model's ``step``)."""
    gen = torch.Generator().manual_seed(3)
    points = torch.randn(64, 2, generator=gen) * torch.tensor([2.0, 0.5]) + 1.0
    images = torch.rand(32, 1, 8, 8, generator=gen) * 2 - 1
    flow = perturbed(fl.RealNVP(2, n_layers=2, hidden=8), 0.1)
    gmm = fl.AutoregressiveModel((2,), "gmm", hidden=16, components=3, lr=1e-2)
    bernoulli = fl.AutoregressiveModel((1, 8, 8), "bernoulli", hidden=16, lr=1e-2)
    vae = fl.VAE((2,), z_dim=2, width=16, likelihood="gaussian", lr=1e-2)
    image_vae = fl.VAE((1, 8, 8), z_dim=2, width=8, lr=1e-2)
    return {
        "flow": (fl.FlowModel(flow, lr=1e-2), points, "nll", lambda: -flow.log_prob(points).mean()),
        "made-gmm": (gmm, points, "nll", lambda: -gmm.log_prob(points).mean()),
        "made-bernoulli": (bernoulli, images, "nll",
                           lambda: -bernoulli.log_prob(fl.binarize(images).flatten(1)).mean()),
        "vae": (vae, points, "neg_elbo", lambda: -vae.elbo(points).mean()),
        "vae-bernoulli": (image_vae, images, "neg_elbo", lambda: -image_vae.elbo(fl.binarize(images)).mean()),
    }


@pytest.mark.parametrize("name", ["flow", "made-gmm", "made-bernoulli", "vae", "vae-bernoulli"])
def test_each_likelihood_family_step_reports_and_lowers_its_negative_log_likelihood(name):
    """The logged value is the batch mean of -log p (or -ELBO) before the update, with the same noise; and steps
    descend it (a sign error in the minimised objective would climb)."""
    torch.manual_seed(0)
    model, batch, key, objective = _step_families()[name]
    index = torch.arange(len(batch))
    torch.manual_seed(1)
    with torch.no_grad():
        before = objective().item()
    torch.manual_seed(1)  # the VAE's reparameterisation noise: the same draws as the step's
    logged = model.step(batch, index)
    assert logged[key].item() == pytest.approx(before, rel=1e-5)
    if "bits_per_dim" in logged:  # binary pixels: nats per image -> bits per pixel
        assert logged["bits_per_dim"].item() == pytest.approx(before / (64 * math.log(2)), rel=1e-5)
    for _ in range(40):
        model.step(batch, index)
    torch.manual_seed(2)
    with torch.no_grad():
        after = sum(objective().item() for _ in range(20)) / 20  # the VAE's is an estimate: average a few
    assert after < before - 0.05 * abs(before)


def test_vae_builds_only_the_network_it_is_not_given():
    encoder, decoder = nn.Linear(4, 6), nn.Linear(3, 4)  # z_dim 3: the encoder gives [mu, log_var]
    with_encoder = fl.VAE((4,), z_dim=3, width=8, likelihood="bernoulli", encoder=encoder)
    with_decoder = fl.VAE((4,), z_dim=3, width=8, likelihood="bernoulli", decoder=decoder)
    assert with_encoder.encoder is encoder and with_encoder.decoder is not None
    assert with_decoder.decoder is decoder and with_decoder.encoder is not None
    x = torch.rand(5, 4)
    for vae in (with_encoder, with_decoder):
        assert vae.elbo(vae.prepare(x)).shape == (5,)


def test_vae_kl_term_sums_over_every_latent_coordinate():
    """Encoder fixed at mu = (1, 2), var = 1 and a decoder that ignores z: ELBO = log N(x; m, s^2) - (1^2 + 2^2) / 2."""
    encoder, decoder = nn.Linear(2, 4), nn.Linear(2, 4)
    mean, std = torch.tensor([0.5, -1.0]), torch.tensor([2.0, 0.25])
    with torch.no_grad():
        encoder.weight.zero_()
        encoder.bias.copy_(torch.tensor([1.0, 2.0, 0.0, 0.0]))  # [mu, log_var]
        decoder.weight.zero_()
        decoder.bias.copy_(torch.cat([mean, std.log()]))
    vae = fl.VAE((2,), z_dim=2, likelihood="gaussian", encoder=encoder, decoder=decoder)
    x = torch.tensor([[0.0, 0.0], [1.0, -2.0]])
    recon = (-0.5 * ((x - mean) / std) ** 2 - std.log() - 0.5 * math.log(2 * math.pi)).sum(1)
    with torch.no_grad():
        torch.testing.assert_close(vae.elbo(x), recon - 2.5)


def test_gaussian_image_vae_samples_are_its_means_clamped_to_the_pixel_range():
    decoder = nn.Linear(1, 8)
    with torch.no_grad():
        decoder.weight.zero_()
        decoder.bias.copy_(torch.tensor([-3.0, 0.2, 0.5, 5.0, 0.0, 0.0, 0.0, 0.0]))  # [means, log-stds]
    vae = fl.VAE((1, 2, 2), z_dim=1, likelihood="gaussian", encoder=nn.Linear(4, 2), decoder=decoder)
    expected = torch.tensor([-1.0, 0.2, 0.5, 1.0]).reshape(1, 1, 2, 2).expand(3, 1, 2, 2)
    torch.testing.assert_close(vae.sample(3), expected)


def test_gaussian_mixture_conditionals_are_the_mixture_density_by_hand():
    """Fixed MADE outputs [logits, means, log-stds] per coordinate: log p(v_i | v_<i) =
    log sum_k softmax(logits)_k N(v_i; mean_k, exp(log_std_k)^2), written out with math."""
    model = fl.AutoregressiveModel((2,), "gmm", hidden=8, components=2)
    params = torch.tensor([[[0.3, -1.0], [-0.2, 0.5],      # logits of the 2 components, per coordinate
                            [0.0, 1.0], [2.0, -1.5],      # means
                            [0.0, -0.7], [0.4, 0.2]]],    # log-stds
                          dtype=torch.float64)  # [1, 3 K, D]
    v = torch.tensor([[0.4, -0.8]], dtype=torch.float64)
    want = 0.0
    for i in range(2):
        logits, means, log_stds = params[0, 0:2, i], params[0, 2:4, i], params[0, 4:6, i]
        weights = [math.exp(w) / sum(math.exp(u) for u in logits.tolist()) for w in logits.tolist()]
        want += math.log(sum(w * math.exp(-0.5 * ((v[0, i].item() - m) / math.exp(s)) ** 2)
                             / (math.exp(s) * math.sqrt(2 * math.pi))
                             for w, m, s in zip(weights, means.tolist(), log_stds.tolist())))
    assert model._conditionals(params).log_prob(v).sum().item() == pytest.approx(want, rel=1e-12)


def test_vector_vae_samples_decode_prior_draws():
    """A decoder whose mean is z itself (log-std log 0.5): samples are z + 0.5 e with z ~ N(0, 1), std sqrt(1.25)."""
    decoder = nn.Linear(1, 4)
    with torch.no_grad():
        decoder.weight.copy_(torch.tensor([[1.0], [0.0], [0.0], [0.0]]))
        decoder.bias.copy_(torch.tensor([0.0, 0.0, math.log(0.5), math.log(0.5)]))
    vae = fl.VAE((2,), z_dim=1, likelihood="gaussian", encoder=nn.Linear(2, 2), decoder=decoder)
    torch.manual_seed(0)
    samples = vae.sample(40_000)
    n = len(samples)
    torch.testing.assert_close(samples.std(0), torch.tensor([1.25**0.5, 0.5]), atol=0, rtol=5 / (2 * n) ** 0.5)


def test_autoregressive_evaluate_scores_binarised_uint8_images_chunk_by_chunk():
    # pixel >= 128 is a 1 (binarize's mid-grey); the held-out nll is the mean of -log P over the images, computed
    # here in one pass on the images binarised by hand, against evaluate's batches of 7 of the uint8 images
    torch.manual_seed(0)
    model = fl.AutoregressiveModel((1, 2, 3), "bernoulli", hidden=32)
    perturbed(model.made, 0.5)
    images = torch.randint(0, 256, (40, 1, 2, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        nll = -model.log_prob((images >= 128).float().flatten(1)).mean().item()
    result = model.evaluate(images, batch_size=7)
    assert result["nll"] == pytest.approx(nll, rel=1e-6)
    assert result["bits_per_dim"] == pytest.approx(nll / (6 * math.log(2)), rel=1e-6)
    for parameter in model.made.parameters():  # fair coins: every image costs exactly 6 bits
        nn.init.zeros_(parameter)
    assert model.evaluate(images)["bits_per_dim"] == pytest.approx(1.0, abs=1e-6)


def test_vae_evaluate_is_the_mean_negative_elbo_in_eval_mode_and_restores_the_mode():
    torch.manual_seed(0)
    model = fl.VAE((1, 8, 8), z_dim=4, width=8, likelihood="bernoulli")
    images = IMAGES[:20]
    model.train()
    torch.manual_seed(5)
    result = model.evaluate(images, batch_size=50)  # one batch: the same draws of z as the one call below
    assert model.training  # the mode it had
    model.eval()
    torch.manual_seed(5)
    with torch.no_grad():
        neg_elbo = -model.elbo((images >= 128).float()).mean().item()
    assert result["neg_elbo"] == pytest.approx(neg_elbo, rel=1e-6)
    assert result["bits_per_dim"] == pytest.approx(neg_elbo / (64 * math.log(2)), rel=1e-6)
