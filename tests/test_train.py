"""The training loop: exact resume, the non-finite guard, EMA, history and the contract."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from genlib.data import BatchSampler
from genlib.train import (CHECKPOINT, GenerativeModel, NonFiniteLossError, TrainClock, first_non_finite,
                          fit)


class MomentMatcher(GenerativeModel):
    """A tiny family: an MLP generator whose fakes match the batch mean and std of the reals.

    It draws noise from the global RNG and uses Adam, so resuming must restore both."""

    def __init__(self, lr: float = 1e-2, explode_at: int | None = None):
        super().__init__()
        self.generator = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))
        self.optimizers = {"g": torch.optim.Adam(self.generator.parameters(), lr=lr)}
        self.explode_at, self.calls = explode_at, 0

    def step(self, x, index):
        self.calls += 1
        fake = self.generator(torch.randn(x.shape[0], 2))
        loss = (fake.mean(0) - x.mean(0)).pow(2).sum() + (fake.std(0) - x.std(0)).pow(2).sum()
        if self.explode_at is not None and self.calls >= self.explode_at:
            loss = loss * float("nan")
        self.optimizers["g"].zero_grad()
        loss.backward()
        self.optimizers["g"].step()
        return {"loss": loss, "fake_mean": fake.mean().detach()}

    @torch.no_grad()
    def sample(self, n):
        return self.sampling_net()(torch.randn(n, 2))

    def ema_source(self):
        return self.generator


def make_run(seed: int = 0, **kw):
    """A fresh model and sampler over a fixed 2-D dataset, both seeded."""
    torch.manual_seed(seed)
    data = torch.randn(512, 2) * torch.tensor([0.5, 2.0]) + torch.tensor([1.0, -1.0])
    model = MomentMatcher(**kw)
    return model, BatchSampler(data, 32, "cpu", seed=seed)


def parameters(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.state_dict().values()]


def test_training_reduces_the_loss():
    model, sampler = make_run(lr=2e-2)
    history = fit(model, sampler, 600, log_every=100, progress=False)
    assert history["step"] == [100, 200, 300, 400, 500, 600]
    fakes = model.sample(4000)
    torch.testing.assert_close(fakes.mean(0), torch.tensor([1.0, -1.0]), atol=0.25, rtol=0)
    torch.testing.assert_close(fakes.std(0), torch.tensor([0.5, 2.0]), atol=0.2, rtol=0)


def test_resume_reproduces_an_uninterrupted_run_bit_for_bit(tmp_path):
    model, sampler = make_run()
    full = fit(model, sampler, 60, run_dir=tmp_path / "a", checkpoint_every=20, log_every=10, progress=False)
    reference = parameters(model)

    first, sampler1 = make_run()
    fit(first, sampler1, 40, run_dir=tmp_path / "b", checkpoint_every=20, log_every=10, progress=False)
    # A new process would start from fresh objects and a different global RNG state.
    torch.manual_seed(12345)
    second, sampler2 = make_run(seed=0)
    torch.randn(100)
    resumed = fit(second, sampler2, 60, run_dir=tmp_path / "b", checkpoint_every=20, log_every=10, progress=False)

    assert resumed == full
    for a, b in zip(reference, parameters(second)):
        assert torch.equal(a, b)


def test_a_resumed_run_sums_the_training_time_of_its_processes(tmp_path, monkeypatch):
    ticks = iter(range(0, 100, 5))  # a fake clock: every reading is 5 s after the one before
    monkeypatch.setattr(TrainClock, "read", staticmethod(lambda: float(next(ticks))))
    model, sampler = make_run()
    fit(model, sampler, 20, run_dir=tmp_path, checkpoint_every=20, log_every=20, progress=False)
    first = torch.load(tmp_path / CHECKPOINT, weights_only=False)["clock"]
    model, sampler = make_run()
    fit(model, sampler, 40, run_dir=tmp_path, checkpoint_every=20, log_every=20, progress=False)
    second = torch.load(tmp_path / CHECKPOINT, weights_only=False)["clock"]
    # Each process reads the clock when it starts and when it saves its one checkpoint: 5 s each.
    assert first == {"seconds": 5.0, "processes": 1} and second == {"seconds": 10.0, "processes": 2}
    clock = TrainClock()  # a caller's clock goes on from the checkpoint's (the third process: nothing left to do)
    model, sampler = make_run()
    fit(model, sampler, 40, run_dir=tmp_path, checkpoint_every=20, log_every=20, progress=False, clock=clock)
    assert clock.processes == 3 and clock.now()["seconds"] == 10.0 + 5.0


def test_resume_with_ema_restores_the_average(tmp_path):
    model, sampler = make_run()
    fit(model, sampler, 30, run_dir=tmp_path / "a", checkpoint_every=10, log_every=10, ema_decay=0.9, progress=False)
    first, sampler1 = make_run()
    fit(first, sampler1, 20, run_dir=tmp_path / "b", checkpoint_every=10, log_every=10, ema_decay=0.9, progress=False)
    second, sampler2 = make_run()
    fit(second, sampler2, 30, run_dir=tmp_path / "b", checkpoint_every=10, log_every=10, ema_decay=0.9,
        progress=False)
    for a, b in zip(model.ema.parameters(), second.ema.parameters()):
        assert torch.equal(a, b)


def test_ema_follows_its_recursion():
    model, sampler = make_run()
    model.attach_ema(0.8)
    expected = [p.detach().clone() for p in model.generator.parameters()]
    for _ in range(5):
        model.step(*next(sampler))
        model.update_ema()
        expected = [0.8 * e + 0.2 * p.detach() for e, p in zip(expected, model.generator.parameters())]
    for e, p in zip(expected, model.ema.parameters()):
        torch.testing.assert_close(p, e, rtol=1e-6, atol=1e-7)
    assert model.sampling_net() is model.ema


def test_non_finite_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    model, sampler = make_run(explode_at=27)
    with pytest.raises(NonFiniteLossError, match=r"step 27 .*step 20\) is kept in .*checkpoint\.pt"):
        fit(model, sampler, 100, run_dir=tmp_path, checkpoint_every=10, log_every=5, progress=False)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    assert state["step"] == 20
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_non_finite_loss_without_run_dir_says_nothing_was_saved():
    model, sampler = make_run(explode_at=3)
    with pytest.raises(NonFiniteLossError, match="step 3 .*no checkpoint was written"):
        fit(model, sampler, 10, log_every=5, progress=False)


def test_checkpoints_are_written_atomically(tmp_path):
    model, sampler = make_run()
    fit(model, sampler, 20, run_dir=tmp_path, checkpoint_every=10, log_every=10, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT]


def test_finished_run_is_not_trained_again(tmp_path):
    model, sampler = make_run()
    fit(model, sampler, 20, run_dir=tmp_path, checkpoint_every=10, log_every=10, progress=False)
    again, sampler2 = make_run()
    history = fit(again, sampler2, 20, run_dir=tmp_path, checkpoint_every=10, log_every=10, progress=False)
    assert again.calls == 0 and history["step"] == [10, 20]


def test_callback_and_bad_arguments():
    model, sampler = make_run()
    seen = []
    fit(model, sampler, 12, log_every=4, progress=False, callback=lambda s, m: seen.append(s), callback_every=5)
    assert seen == [5, 10]
    with pytest.raises(ValueError):
        fit(model, sampler, 10, log_every=0)


def test_ema_requires_a_source():
    class NoSource(GenerativeModel):
        pass

    with pytest.raises(ValueError, match="ema_source"):
        NoSource().attach_ema(0.9)


def test_evaluating_switches_to_eval_and_restores_the_mode_even_on_error():
    from genlib.train import evaluating

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    with evaluating(net):
        assert not net.training and not net[1].training
    assert net.training
    net.eval()
    try:
        with evaluating(net):
            raise RuntimeError("inside")
    except RuntimeError:
        pass
    assert not net.training  # it was in eval mode before, and stays so
    net.train()
    try:
        with evaluating(net):
            raise RuntimeError("inside")
    except RuntimeError:
        pass
    assert net.training


class TwoStage(MomentMatcher):
    """MomentMatcher that reports a different loss name after ``switch`` steps (like GLANN's two stages)."""

    def __init__(self, switch: int, **kw):
        super().__init__(**kw)
        self.switch = switch

    def step(self, x, index):
        losses = super().step(x, index)
        return {"stage1": losses["loss"]} if self.calls <= self.switch else {"stage2": losses["loss"]}


def test_losses_of_a_staged_model_stay_aligned_with_the_logged_steps():
    torch.manual_seed(0)
    model = TwoStage(switch=7)
    sampler = BatchSampler(torch.randn(64, 2), 8, "cpu", seed=0)
    history = fit(model, sampler, 15, log_every=5, progress=False)  # the window of steps 6-10 holds both stages
    assert history["step"] == [5, 10, 15]
    assert [math.isnan(v) for v in history["stage1"]] == [False, False, True]
    assert [math.isnan(v) for v in history["stage2"]] == [True, False, False]


def test_first_non_finite_reads_steps_that_report_different_losses():
    pending = [{"a": torch.tensor(1.0)}, {"b": torch.tensor(2.0)}, {"b": torch.tensor(float("inf"))}]
    assert first_non_finite(pending, first_step=11) == (13, {"b": float("inf")})
    assert first_non_finite(pending[:2], first_step=11) is None
