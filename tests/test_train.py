"""The training loop: exact resume, the non-finite guard, EMA, history, the contract and replayed CUDA graphs."""

from __future__ import annotations

import math
import os
import pickle
import signal
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import CUDA
from genlib import runtime
from genlib.cli import FAMILIES
from genlib.data import BatchSampler, to_float
from genlib.gan import VARIANTS
from genlib.train import (CHECKPOINT, GRAPH_WARMUP_STEPS, GenerativeModel, NonFiniteLossError, StepGraph,
                          TrainClock, TrainingInterrupted, at_least_fp32, default_ema_decay, draw_batches,
                          first_non_finite, fit, make_capturable, place_step_counts, split_batches, train_step,
                          update_batches)


def moment_loss(fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Squared gaps between the batch means and stds of fakes and reals [B, 2]."""
    return (fake.mean(0) - real.mean(0)).pow(2).sum() + (fake.std(0) - real.std(0)).pow(2).sum()


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
        loss = moment_loss(fake, x)
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


class Recorder(MomentMatcher):
    """MomentMatcher that asks for ``batches_per_step`` batches per step and keeps what each step received."""

    batches_per_step = 3

    def __init__(self):
        super().__init__()
        self.received = []

    def step(self, x, index):
        self.received.append((x.clone(), index.clone()))
        return super().step(x, index)


def test_fit_hands_a_step_its_batches_per_step_batches_joined_and_resumes_exactly(tmp_path):
    model, (_, sampler) = Recorder(), make_run()
    fit(model, sampler, 2, run_dir=tmp_path, checkpoint_every=1, log_every=1, progress=False)
    _, reference = make_run()
    batches = [next(reference) for _ in range(9)]  # 3 steps' worth, drawn one batch at a time
    for step, (x, index) in enumerate(model.received):
        torch.testing.assert_close(x, torch.cat([b[0] for b in batches[3 * step:3 * step + 3]]), rtol=0, atol=0)
        torch.testing.assert_close(index, torch.cat([b[1] for b in batches[3 * step:3 * step + 3]]), rtol=0, atol=0)
    resumed, (_, sampler) = Recorder(), make_run()
    fit(resumed, sampler, 3, run_dir=tmp_path, checkpoint_every=1, log_every=1, progress=False)
    assert len(resumed.received) == 1  # only the third step ran, on the sampler's next three batches
    torch.testing.assert_close(resumed.received[0][0], torch.cat([b[0] for b in batches[6:]]), rtol=0, atol=0)
    for count in (1, 2):  # the one-batch shortcut, and the smallest join
        x, index = draw_batches(iter(batches), count)
        assert torch.equal(x, torch.cat([b[0] for b in batches[:count]]))
        assert torch.equal(index, torch.cat([b[1] for b in batches[:count]]))
    with pytest.raises(ValueError, match="equal batches"):
        split_batches(torch.zeros(10, 2), 3)
    assert [len(part) for part in split_batches(torch.zeros(12, 2), 3)] == [4, 4, 4]
    # five critic updates on three joined batches take them in turn; on one batch, that batch each time
    joined = torch.arange(12.0)[:, None]
    assert [part[0, 0].item() for part in update_batches(joined, 3, 5)] == [0.0, 4.0, 8.0, 0.0, 4.0]
    assert all(torch.equal(part, joined) for part in update_batches(joined, 1, 3))


def test_a_checkpoint_drawing_another_number_of_batches_per_step_is_refused(tmp_path):
    fit(MomentMatcher(), make_run()[1], 2, run_dir=tmp_path, checkpoint_every=1, progress=False)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    assert state["batches_per_step"] == 1
    del state["batches_per_step"]  # as a checkpoint saved before the key: it drew one batch per step
    torch.save(state, tmp_path / CHECKPOINT)
    recorder, sampler = Recorder(), make_run()[1]
    with pytest.raises(ValueError, match="drew 1 real batch.*this model draws 3.*fresh_reals=False"):
        fit(recorder, sampler, 4, run_dir=tmp_path, progress=False)
    assert recorder.received == []
    resumed = MomentMatcher()
    fit(resumed, make_run()[1], 3, run_dir=tmp_path, progress=False)
    assert resumed.calls == 1  # one batch per step on both sides: resumed at step 2


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
    here = runtime.device_name(torch.device("cpu"))
    assert first == {"seconds": 5.0, "processes": 1, "devices": [here]}
    assert second == {"seconds": 10.0, "processes": 2, "devices": [here, here]}
    clock = TrainClock()  # a caller's clock goes on from the checkpoint's (the third process: nothing left to do)
    model, sampler = make_run()
    fit(model, sampler, 40, run_dir=tmp_path, checkpoint_every=20, log_every=20, progress=False, clock=clock)
    assert clock.processes == 3 and clock.now()["seconds"] == 10.0 + 5.0
    older = TrainClock()  # a checkpoint from before clocks: its time is unknown, not zero
    older.resume(None)
    assert math.isnan(older.now()["seconds"]) and older.processes == 2
    assert older.now()["devices"] == ["unrecorded", "unrecorded"]  # neither process's device is known
    two_before = TrainClock()  # a checkpoint of two processes from before devices were recorded
    two_before.resume({"seconds": 3.0, "processes": 2})
    two_before.device = "NVIDIA H200"
    assert two_before.now()["devices"] == ["unrecorded", "unrecorded", "NVIDIA H200"]


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


def test_a_run_resumes_where_the_ema_default_differs_as_between_a_gpu_and_a_cpu(tmp_path):
    """fit keeps an EMA by default on CUDA only, so a GPU checkpoint resumed on a CPU has an EMA the fresh model
    lacks, and the other way round."""
    straight, sampler = make_run()
    fit(straight, sampler, 30, log_every=10, ema_decay=0.9, progress=False)
    with_ema, sampler = make_run()
    fit(with_ema, sampler, 20, run_dir=tmp_path / "a", log_every=10, ema_decay=0.9, progress=False)
    resumed, sampler = make_run()  # no EMA asked for: the checkpoint's is attached, with its decay
    fit(resumed, sampler, 30, run_dir=tmp_path / "a", log_every=10, progress=False)
    assert resumed.ema_decay == 0.9
    for want, have in zip(straight.ema.parameters(), resumed.ema.parameters()):
        torch.testing.assert_close(have, want, rtol=0, atol=0)
    without_ema, sampler = make_run()
    fit(without_ema, sampler, 20, run_dir=tmp_path / "b", log_every=10, progress=False)
    resumed, sampler = make_run()  # an EMA asked for that the checkpoint lacks: it starts from the loaded weights
    fit(resumed, sampler, 20, run_dir=tmp_path / "b", log_every=10, ema_decay=0.9, progress=False)
    for want, have in zip(without_ema.generator.parameters(), resumed.ema.parameters()):
        torch.testing.assert_close(have, want, rtol=0, atol=0)


def test_a_resume_left_to_a_gpu_s_ema_default_keeps_the_checkpoint_s_decay_or_its_absence(tmp_path, monkeypatch):
    """With the device's default decay 0.999 (as on CUDA), a run trained with 0.5 resumes with 0.5, one trained
    with ema_decay=0 resumes with none, and one trained where the default was none starts one."""
    import genlib.train as train_module

    for name, trained_with, default_there in (("decay", 0.5, None), ("none", 0.0, None), ("cpu", None, None)):
        monkeypatch.setattr(train_module, "default_ema_decay", lambda device, default=default_there: default)
        model, sampler = make_run()
        fit(model, sampler, 20, run_dir=tmp_path / name, log_every=10, ema_decay=trained_with, progress=False)
    monkeypatch.setattr(train_module, "default_ema_decay", lambda device: 0.999)
    resumed = {}
    for name in ("decay", "none", "cpu"):
        resumed[name], sampler = make_run()
        fit(resumed[name], sampler, 30, run_dir=tmp_path / name, log_every=10, progress=False)
    assert resumed["decay"].ema_decay == 0.5
    assert resumed["none"].ema is None
    assert resumed["cpu"].ema is not None and resumed["cpu"].ema_decay == 0.999
    fresh, sampler = make_run()
    fit(fresh, sampler, 10, log_every=10, progress=False)
    assert fresh.ema_decay == 0.999


def test_a_decay_given_wins_over_a_checkpoint_s_and_an_earlier_call_s_and_zero_drops_any(tmp_path):
    model, sampler = make_run()
    fit(model, sampler, 10, run_dir=tmp_path, log_every=10, ema_decay=0.9, progress=False)
    declined, sampler = make_run()  # the checkpoint keeps an average; ema_decay=0 drops it
    fit(declined, sampler, 20, run_dir=tmp_path, log_every=10, ema_decay=0.0, progress=False)
    assert declined.ema is None and declined.ema_decay == 0.0
    assert declined.sampling_net() is declined.generator  # samples from the live weights
    again, sampler = make_run()
    fit(again, sampler, 5, ema_decay=0.5, progress=False)
    fit(again, sampler, 10, ema_decay=0.9, progress=False)  # a second call with another decay: it wins
    assert again.ema_decay == 0.9
    fit(again, sampler, 15, ema_decay=0.0, progress=False)
    assert again.ema is None


def test_ema_follows_its_recursion_with_the_warm_up():
    model, sampler = make_run()
    model.attach_ema(0.8)
    expected = [p.detach().clone() for p in model.generator.parameters()]
    for t in range(40):  # the decay (1 + t) / (10 + t) reaches 0.8 at t = 35
        model.step(*next(sampler))
        model.update_ema()
        decay = min(0.8, (1 + t) / (10 + t))
        expected = [decay * e + (1 - decay) * p.detach() for e, p in zip(expected, model.generator.parameters())]
    for e, p in zip(expected, model.ema.parameters()):
        torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-6)
    assert model.sampling_net() is model.ema and int(model.ema_updates) == 40
    assert not any(p.requires_grad for p in model.ema.parameters())  # a loss through it must not reach it


def test_a_short_run_samples_from_its_trained_weights_not_its_initialisation():
    """With a flat decay of 0.999, 50 updates would leave 95 % of the random initialisation in the EMA."""
    model, sampler = make_run()
    initial = [p.detach().clone() for p in model.generator.parameters()]
    fit(model, sampler, 50, log_every=10, ema_decay=0.999, progress=False)
    live = list(model.generator.parameters())
    trained = sum((p - q).norm() ** 2 for p, q in zip(live, initial)).sqrt()
    lag = sum((p - e).norm() ** 2 for p, e in zip(live, model.ema.parameters())).sqrt()
    assert lag < 0.5 * trained


@pytest.mark.parametrize("log_every", [5, 50])  # 50: the checkpoint at step 30 is not a log step
def test_non_finite_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, log_every):
    model, sampler = make_run(explode_at=27)
    with pytest.raises(NonFiniteLossError, match=r"step 27 .*step 20\) is kept in .*checkpoint\.pt"):
        fit(model, sampler, 100, run_dir=tmp_path, checkpoint_every=10, log_every=log_every, progress=False)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    assert state["step"] == 20
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_non_finite_loss_without_run_dir_says_nothing_was_saved():
    model, sampler = make_run(explode_at=3)
    with pytest.raises(NonFiniteLossError, match="step 3 .*no checkpoint was written"):
        fit(model, sampler, 10, log_every=5, progress=False)


@pytest.fixture
def python_sigint():
    """Python's own Ctrl-C handler for the test, whatever the suite inherited: a shell starting it with `cmd &` leaves
    SIGINT ignored, and Python then installs no handler (an ignored signal stays ignored, which a test checks)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)  # None: set outside Python


@pytest.mark.usefixtures("python_sigint")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_finishes_the_step_saves_it_and_the_rerun_resumes_bit_for_bit(tmp_path, signum):
    """The signal arrives in the middle of step 7 (from its callback, between the step's update and its end): the
    step completes, is saved although 7 is no checkpoint step, and resuming gives the uninterrupted weights."""
    model, sampler = make_run()
    full = fit(model, sampler, 20, run_dir=tmp_path / "a", checkpoint_every=10, log_every=5, progress=False)
    reference = parameters(model)

    first, sampler1 = make_run()
    handler = signal.getsignal(signum)
    with pytest.raises(TrainingInterrupted, match=f"{signum.name}.* after step 7") as stopped:
        fit(first, sampler1, 20, run_dir=tmp_path / "b", checkpoint_every=10, log_every=5, progress=False,
            callback=lambda step, _: os.kill(os.getpid(), signum), callback_every=7)
    assert isinstance(stopped.value, KeyboardInterrupt) and stopped.value.step == first.calls == 7
    assert signal.getsignal(signum) is handler  # the caller's handler is back
    saved = torch.load(tmp_path / "b" / CHECKPOINT, weights_only=False)
    assert saved["step"] == 7 and saved["history"]["step"] == [5] and len(saved["pending"]) == 2  # steps 6, 7
    assert pickle.loads(pickle.dumps(stopped.value)).step == 7

    second, sampler2 = make_run()
    history = fit(second, sampler2, 20, run_dir=tmp_path / "b", checkpoint_every=10, log_every=5, progress=False)
    assert second.calls == 13 and history == full  # the same logged means: the window was saved as it stood
    for a, b in zip(reference, parameters(second)):
        assert torch.equal(a, b)


def test_an_ignored_signal_stays_ignored(tmp_path):
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell's `cmd &` leaves it
    try:
        model, sampler = make_run()
        fit(model, sampler, 10, run_dir=tmp_path, progress=False,
            callback=lambda step, _: os.kill(os.getpid(), signal.SIGINT), callback_every=3)
        assert model.calls == 10 and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("python_sigint")
def test_a_second_ctrl_c_stops_at_once():
    from genlib.train import _DeferredStop

    handler = signal.getsignal(signal.SIGINT)
    stop = _DeferredStop(enabled=True)
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.signum == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is handler


@pytest.mark.usefixtures("python_sigint")
def test_without_a_run_dir_an_interrupt_is_python_s_own():
    model, sampler = make_run()
    with pytest.raises(KeyboardInterrupt) as stopped:
        fit(model, sampler, 20, progress=False, callback=lambda step, _: os.kill(os.getpid(), signal.SIGINT),
            callback_every=3)
    assert not isinstance(stopped.value, TrainingInterrupted) and model.calls == 3


def test_a_checkpoint_of_another_run_or_past_the_steps_asked_for_is_refused(tmp_path):
    model, sampler = make_run()
    fit(model, sampler, 20, run_dir=tmp_path, checkpoint_every=10, progress=False, meta={"data": "ring8", "lr": 0.1})
    other, sampler2 = make_run()
    with pytest.raises(ValueError, match="another run .*data: 'ring8' there, 'grid25' here"):
        fit(other, sampler2, 30, run_dir=tmp_path, progress=False, meta={"data": "grid25", "lr": 0.1})
    before, sampler_before = parameters(other), sampler2.state_dict()
    with pytest.raises(ValueError, match="at step 20, past the 10 steps"):
        fit(other, sampler2, 10, run_dir=tmp_path, progress=False, meta={"data": "ring8", "lr": 0.1})
    assert other.calls == 0  # refused before loading: the model and the sampler are as they were
    assert all(torch.equal(a, b) for a, b in zip(before, parameters(other)))
    assert str(sampler2.state_dict()) == str(sampler_before)
    fit(other, sampler2, 30, run_dir=tmp_path, checkpoint_every=10, progress=False, meta={"data": "ring8", "lr": 0.1})
    assert other.calls == 10


def test_a_checkpoint_past_steps_cut_by_genlib_max_steps_names_the_cut(tmp_path, monkeypatch):
    model, sampler = make_run()
    fit(model, sampler, 20, run_dir=tmp_path, progress=False)
    monkeypatch.setenv("GENLIB_MAX_STEPS", "7")
    other, sampler = make_run()
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"past the 7 steps .*GENLIB_MAX_STEPS=7 cut"):
        fit(other, sampler, 30, run_dir=tmp_path, progress=False)


def test_a_run_dir_that_is_a_file_is_refused_before_any_step(tmp_path):
    model, sampler = make_run()
    (tmp_path / "taken").write_text("not a folder")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        fit(model, sampler, 5, run_dir=tmp_path / "taken", checkpoint_every=2, progress=False)
    assert model.calls == 0


def test_checkpointing_from_a_sampler_without_state_is_refused_before_any_step(tmp_path):
    model, sampler = make_run()
    batches = iter([next(sampler)] * 5)  # a plain iterator: a resumed run could not draw the same batches
    with pytest.raises(TypeError, match="checkpoints need a sampler with state_dict.*got a list_iterator"):
        fit(model, batches, 5, run_dir=tmp_path, progress=False)
    assert model.calls == 0 and not (tmp_path / "checkpoint.pt").exists()
    fit(model, batches, 5, progress=False)  # without run_dir, any iterator of batches will do
    assert model.calls == 5


def test_a_run_leaves_only_its_checkpoint_in_its_folder(tmp_path):
    model, sampler = make_run()
    fit(model, sampler, 20, run_dir=tmp_path, checkpoint_every=10, log_every=10, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT]


def test_finished_run_is_not_trained_again(tmp_path):
    model, sampler = make_run()
    fit(model, sampler, 20, run_dir=tmp_path, checkpoint_every=10, log_every=10, progress=False)
    again, sampler2 = make_run()
    history = fit(again, sampler2, 20, run_dir=tmp_path, checkpoint_every=10, log_every=10, progress=False)
    assert again.calls == 0 and history["step"] == [10, 20]
    # a run that ended between log steps keeps its short last window when called again for as many steps
    short = fit(make_run()[0], make_run()[1], 15, run_dir=tmp_path / "short", log_every=10, progress=False)
    again, sampler2 = make_run()
    assert fit(again, sampler2, 15, run_dir=tmp_path / "short", log_every=10, progress=False) == short
    assert again.calls == 0 and short["step"] == [10, 15]


def test_resume_false_trains_from_the_start_and_overwrites_the_checkpoint(tmp_path):
    model, sampler = make_run()
    fit(model, sampler, 20, run_dir=tmp_path, checkpoint_every=10, log_every=10, progress=False)
    restarted, sampler = make_run(seed=1)
    history = fit(restarted, sampler, 30, run_dir=tmp_path, log_every=10, resume=False, progress=False)
    assert restarted.calls == 30 and history["step"] == [10, 20, 30]
    assert torch.load(tmp_path / CHECKPOINT, weights_only=False)["step"] == 30
    reference, sampler = make_run(seed=1)  # the same run without a folder: nothing of the old checkpoint in it
    assert fit(reference, sampler, 30, log_every=10, progress=False) == history
    assert all(torch.equal(a, b) for a, b in zip(parameters(reference), parameters(restarted)))


def test_callback_and_bad_arguments():
    model, sampler = make_run()
    seen = []
    fit(model, sampler, 12, log_every=4, progress=False, callback=lambda s, m: seen.append(s), callback_every=5)
    assert seen == [5, 10]
    for bad in ({"log_every": 0}, {"checkpoint_every": 0}, {"steps": -1}):
        with pytest.raises(ValueError, match="steps must be >= 0"):
            fit(model, sampler, **{"steps": 10, **bad})
    before = parameters(model)
    history = fit(model, sampler, 0, progress=False)  # nothing to do is not an error
    assert history["step"] == [] and all(map(torch.equal, parameters(model), before))


def test_the_default_ema_decay_is_0_999_on_cuda_and_none_on_the_cpu():
    # named devices only: no GPU is needed to ask what a CUDA run would keep
    assert default_ema_decay(torch.device("cuda")) == 0.999 and default_ema_decay(torch.device("cpu")) is None


def test_fit_shows_a_progress_bar_only_when_asked(capsys):
    model, sampler = make_run()
    fit(model, sampler, 3, progress=False)
    assert capsys.readouterr().err == ""
    fit(model, sampler, 3, progress=True, desc="moments")
    bar = capsys.readouterr().err
    assert "moments" in bar and "3/3" in bar


def test_max_steps_cuts_a_run_short_with_a_warning_and_leaves_shorter_runs_alone(monkeypatch):
    monkeypatch.setenv("GENLIB_MAX_STEPS", "7")
    model, sampler = make_run()
    with pytest.warns(UserWarning, match="cuts this run from 30 steps to 7"):
        history = fit(model, sampler, 30, log_every=5, progress=False)
    assert model.calls == 7 and history["step"] == [5, 7]
    model, sampler = make_run()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(model, sampler, 6, log_every=5, progress=False)
        fit(model, sampler, 7, log_every=5, progress=False)  # exactly the cap: nothing is cut
    assert model.calls == 6 + 7


class UpdateThenLook(GenerativeModel):
    """A step that updates a layer and then runs it again, as a GAN's generator pass runs the D just updated."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 1)
        nn.init.zeros_(self.layer.weight), nn.init.zeros_(self.layer.bias)
        self.optimizers = {"d": torch.optim.SGD(self.layer.parameters(), lr=1.0)}

    def step(self, x, index):
        before = self.layer(x)
        self.optimizers["d"].zero_grad()
        before.float().sum().backward()
        self.optimizers["d"].step()
        after = self.layer(x)
        return {"before": before.float().sum(), "after": after.float().sum(), "bf16": torch.tensor(
            float(after.dtype == torch.bfloat16))}


def test_under_autocast_a_forward_after_an_optimizer_step_sees_the_new_weights(device):
    torch.manual_seed(0)
    model, x = UpdateThenLook().to(device), torch.randn(8, 4, device=device)
    losses = train_step(model, x, torch.arange(8, device=device), amp=True)
    assert losses["bf16"] == 1.0 and losses["before"] == 0.0  # autocast was on; the weights started at zero
    expected = model.layer(x).sum()  # fp32, outside autocast, with the updated weights
    # autocast's weight cache would return the zero-weight output (0.0) here
    torch.testing.assert_close(losses["after"], expected.detach(), rtol=2e-2, atol=0.0)


class AutocastProbe(GenerativeModel):
    """Reports, as a loss, whether its linear layer ran in bf16 (as it does under autocast)."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def step(self, x, index):
        return {"bf16": torch.tensor(float(self.layer(x).dtype == torch.bfloat16), device=x.device)}


def test_fit_autocasts_to_bf16_by_default_on_ampere_gpus_only_and_on_the_cpu_when_asked(device):
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0)).to(device)
    batch = (x, torch.arange(8, device=device))
    native = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
    for amp, expected in ((None, native), (True, True), (False, False)):
        history = fit(AutocastProbe().to(device), iter([batch]), 1, amp=amp, progress=False)
        assert history["bf16"] == [float(expected)], amp


def test_fit_takes_its_autocast_default_from_native_bf16(monkeypatch):
    batch = (torch.randn(8, 4), torch.arange(8))
    for native in (True, False):
        monkeypatch.setattr(runtime, "native_bf16", lambda dev, native=native: native)
        assert fit(AutocastProbe(), iter([batch]), 1, progress=False)["bf16"] == [float(native)]


def test_at_least_fp32_lifts_narrow_floats_and_leaves_wider_ones():
    value = torch.tensor([1.0 / 3.0], dtype=torch.float64)
    assert at_least_fp32(value.bfloat16()).dtype == torch.float32
    assert at_least_fp32(value.half()).dtype == torch.float32
    assert at_least_fp32(value) is value and at_least_fp32(value.float()).dtype == torch.float32


def test_ema_requires_a_source():
    class NoSource(GenerativeModel):
        pass

    with pytest.raises(ValueError, match="ema_source"):
        NoSource().attach_ema(0.9)


def test_an_ema_decay_outside_the_open_unit_interval_is_refused():
    """A decay of 1 would freeze the average at the random initialisation once warmed up; 0 means no average."""
    model, _ = make_run()
    for decay in (1.0, 0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"EMA decay must be in \(0, 1\)"):
            model.attach_ema(decay)
        assert model.ema is None
    model.attach_ema(0.9999)
    assert model.ema_decay == 0.9999


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


class ModeRecorder(MomentMatcher):
    """MomentMatcher that notes, at every step, whether it and its generator were in training mode."""

    def __init__(self):
        super().__init__()
        self.modes: list[bool] = []

    def step(self, x, index):
        self.modes.append(self.training and self.generator.training)
        return super().step(x, index)


def test_fit_trains_in_training_mode_and_hands_the_model_back_in_eval_mode():
    """Every step trains in training mode, even after a callback (or an earlier fit) left the model in eval mode;
    fit ends in eval mode, as sampling wants it (batch-norm statistics fixed)."""
    torch.manual_seed(0)
    model, (_, sampler) = ModeRecorder(), make_run()
    model.eval()  # as a previous fit leaves it
    fit(model, sampler, 4, progress=False, callback=lambda step, m: m.eval(), callback_every=3)  # after step 3
    assert model.modes == [True] * 4
    assert not any(module.training for module in model.modules())


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


# ----------------------------------------------------------------------------------------------
# CUDA graphs: the graph_safe contract (checked on the CPU) and the replayed step (on a GPU)
# ----------------------------------------------------------------------------------------------

HOST_READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2", "aten::unique_dim",
              "aten::unique_consecutive", "aten::equal", "aten::is_nonzero", "aten::allclose",
              "aten::repeat_interleave",
              "aten::lift_fresh", "aten::lift_fresh_copy"}  # a tensor from Python data: a copy from the host
MASK_INDEXING = {"aten::index", "aten::index_put", "aten::index_put_"}


class HostReads(TorchDispatchMode):
    """Records the ops that read a device value on the host, copy Python data to the device, or make a shape from
    data (a CUDA graph can hold none of them), outside optimiser steps (``paused``: capturable optimisers have
    none)."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if not self.paused and (name in HOST_READS or (name in MASK_INDEXING and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]))):
            self.found.append(name)
        return func(*args, **(kwargs or {}))


def python_state(model: GenerativeModel) -> dict:
    """Every plain Python value a replayed graph would freeze: module attributes and optimiser hyperparameters (a
    tensor hyperparameter by identity: a graph may update it in place, not replace it)."""
    state = {f"{name}.{key}": value for name, module in model.named_modules() for key, value in vars(module).items()
             if isinstance(value, (bool, int, float, str, tuple))}
    for player, optimizer in model.optimizers.items():
        for i, group in enumerate(optimizer.param_groups):
            state |= {f"{player}[{i}].{key}": ("tensor", id(value)) if isinstance(value, torch.Tensor) else value
                      for key, value in group.items() if key != "params"}
    return state


def graph_obstacles(model: GenerativeModel, x: torch.Tensor) -> tuple[list[str], dict]:
    """(host reads, changed Python state) of one step of ``model`` on x after two warm-up steps, prepared as
    :class:`StepGraph` prepares it."""
    model.prepare_for_graph()
    index = torch.arange(len(x))
    for _ in range(2):
        model.step(x, index)
    mode, before = HostReads(), python_state(model)
    for optimizer in model.optimizers.values():
        def paused_step(*args, _step=optimizer.step, **kwargs):
            mode.paused = True
            try:
                return _step(*args, **kwargs)
            finally:
                mode.paused = False
        optimizer.step = paused_step
    with mode:
        model.step(x, index)
    after = python_state(model)
    return sorted(set(mode.found)), {k: (before.get(k), after.get(k)) for k in before | after
                                     if before.get(k) != after.get(k)}


def tiny_family(family: str, shape: tuple[int, ...], *options: str) -> tuple[GenerativeModel, torch.Tensor]:
    """A family as the CLI builds it, at width 8 on random data of ``shape``, and what fit would hand one step of
    it: ``batches_per_step`` batches of 16, joined."""
    from genlib.cli import TrainSpec, build_family, parse_options

    torch.manual_seed(0)
    data = torch.randn(128, *shape) if len(shape) == 1 else torch.randint(0, 256, (128, *shape), dtype=torch.uint8)
    spec = TrainSpec(data, shape, torch.device("cpu"), z_dim=8, width=8, lr=1e-3, batch_size=16,
                     options=parse_options(list(options)))
    model = build_family(family, spec)
    x = data[:16 * model.batches_per_step]
    return model, (x if len(shape) == 1 else to_float(x))


GRAPH_CASES = [("gan", f"variant={variant}") for variant in ("gan", "dragan", "ebgan", "mrgan", "minibatch", "pacgan")]
GRAPH_CASES += [("energy",), ("score",), ("dae",), ("realnvp",), ("realnvp", "decay_steps=100"), ("glo",)]


@pytest.mark.parametrize("case", [("gan", f"variant={variant}") for variant in VARIANTS]
                         + [(family,) for family in sorted(FAMILIES) if family not in ("gan", "autoregressive")],
                         ids=lambda case: case[-1].removeprefix("variant="))
def test_every_family_reports_fp32_losses_under_bf16_autocast(case):
    """On CUDA a step runs under bf16 autocast; a loss left in bf16 keeps 3 significant digits (an energy gap,
    a difference of two means of about 100, would move in steps of 0.5). The CPU's autocast casts alike."""
    model, x = tiny_family(case[0], (1, 28, 28), *case[1:])
    losses = train_step(model, x, torch.arange(len(x)), amp=True)
    assert {name: loss.dtype for name, loss in losses.items()} == dict.fromkeys(losses, torch.float32)


@pytest.mark.parametrize("shape", [(2,), (1, 28, 28)], ids=["toy", "image"])
@pytest.mark.parametrize("case", GRAPH_CASES, ids=lambda case: " ".join(case))
def test_families_that_claim_graph_safe_steps_have_no_host_reads_and_no_python_state(case, shape):
    model, x = tiny_family(case[0], shape, *case[1:])
    assert model.graph_safe
    assert graph_obstacles(model, x) == ([], {})


@pytest.mark.parametrize("case, obstacle", [
    (("dde",), "._iteration"),                                  # a step counter in Python drives its schedule
    (("gan", "lr_decay_steps=100"), "d[0].lr"),                 # learning rates set from Python each step
    (("gan", "variant=unrolled"), "aten::_local_scalar_dense"),  # reads Adam's step count
    (("gan", "variant=madgan"), "aten::nonzero"),               # routes rows to generators
    (("imle",), "aten::nonzero"),                               # the exact search
])
def test_the_graph_check_finds_what_a_graph_cannot_replay_and_those_families_do_not_claim_it(case, obstacle):
    model, x = tiny_family(case[0], (2,), *case[1:])
    host_reads, changed = graph_obstacles(model, x)
    assert obstacle in host_reads or obstacle in changed
    assert not model.graph_safe


def test_the_full_scale_runs_that_graphs_would_speed_up_are_graph_safe():
    """tools/record_full.sh's small-batch runs of these families, with their options, are the ones a replayed graph
    speeds up."""
    for family, options in [("gan", ["variant=pacgan", "pack=2"]), ("energy", []), ("score", ["n_sigmas=10"]),
                            ("realnvp", ["scales=3", "blocks=4", "decay_steps=30000"]),
                            ("glo", ["loss=lap1", "code_lr=1e-2"])]:
        model, x = tiny_family(family, (1, 28, 28), *options)
        assert model.graph_safe and graph_obstacles(model, x) == ([], {}), family


def test_use_cuda_graph_follows_the_environment_only_where_it_can(monkeypatch):
    from genlib.train import CUDA_GRAPH_ENV, use_cuda_graph

    safe, _ = tiny_family("score", (2,))
    unsafe, _ = tiny_family("dde", (2,))
    monkeypatch.setenv(CUDA_GRAPH_ENV, "1")
    assert not use_cuda_graph(safe, torch.device("cpu"), None)
    assert not use_cuda_graph(unsafe, torch.device("cuda"), None)
    assert use_cuda_graph(safe, torch.device("cuda"), None)
    monkeypatch.setenv(CUDA_GRAPH_ENV, "0")
    assert not use_cuda_graph(safe, torch.device("cuda"), None)
    assert not use_cuda_graph(unsafe, torch.device("cpu"), False)
    with pytest.raises(ValueError, match="CUDA device"):
        use_cuda_graph(safe, torch.device("cpu"), True)
    with pytest.raises(ValueError, match="not graph_safe"):
        use_cuda_graph(unsafe, torch.device("cuda"), True)


class ReplayByCalling(StepGraph):
    """A CPU stand-in for the graph: 'capture' records nothing and each 'replay' runs the step, which is what a
    graph does for a graph-safe step. It checks the bookkeeping: warm-up, capture, one step per call."""

    def capture(self, packed_step):
        return packed_step


class CaptureFails(StepGraph):
    def capture(self, packed_step):
        raise RuntimeError("operation not permitted when stream is capturing")


def train_steps(step, seed: int, steps: int = 8) -> tuple[list[torch.Tensor], list[dict], GenerativeModel]:
    """Parameters, per-step losses and the model after ``steps`` calls of ``step(model)(x, index)`` on one run."""
    model, sampler = make_run(seed=seed)
    run = step(model)
    losses = [run(*next(sampler)) for _ in range(steps)]
    return parameters(model), losses, model


def test_a_step_graph_trains_one_step_per_call_like_the_eager_step():
    def eager(model):
        return lambda x, index: {k: v.detach() for k, v in train_step(model, x, index, amp=False).items()}

    expected, expected_losses, _ = train_steps(eager, seed=3)
    got, losses, model = train_steps(lambda model: ReplayByCalling(model, amp=False), seed=3)
    assert model.calls == 8
    for want, have in zip(expected, got):
        torch.testing.assert_close(have, want, rtol=0, atol=0)
    for want, have in zip(expected_losses, losses):
        assert list(have) == list(want)
        torch.testing.assert_close(torch.stack(list(have.values())), torch.stack(list(want.values())).float())
    assert len({id(step["loss"]) for step in losses}) == 8  # no step's losses alias another's


def test_a_captured_step_refuses_a_batch_of_another_shape():
    model, sampler = make_run()
    graph = ReplayByCalling(model, amp=False)
    for _ in range(GRAPH_WARMUP_STEPS + 1):
        x, index = next(sampler)
        graph(x, index)
    with pytest.raises(ValueError, match=rf"replays batches of shape \({len(x)}, .*got \(1, "):
        graph(x[:1], index[:1])
    assert model.calls == GRAPH_WARMUP_STEPS + 1


def test_a_step_that_cannot_be_captured_is_a_clear_error_after_the_warm_up():
    model, sampler = make_run()
    graph = CaptureFails(model, amp=False)
    for _ in range(GRAPH_WARMUP_STEPS):
        graph(*next(sampler))
    with pytest.raises(RuntimeError, match="not graph_safe after all.*stream is capturing"):
        graph(*next(sampler))
    assert model.calls == GRAPH_WARMUP_STEPS


def test_a_checkpoint_keeps_this_process_s_optimizer_mode(tmp_path):
    """A run captured on a GPU saves capturable optimisers, perhaps with a tensor learning rate; resumed eagerly
    they must step as eager optimisers (a capturable Adam refuses CPU parameters; a tensor rate is read on the host
    for every parameter), and the other way round a tensor rate stays the tensor that a graph reads."""
    model, sampler = make_run()
    fit(model, sampler, 2, progress=False)
    state = model.checkpoint_state()
    for group in state["optimizers"]["g"]["param_groups"]:
        group["capturable"], group["lr"] = True, torch.tensor(0.25)
    fresh, sampler = make_run()
    fresh.load_checkpoint_state(state)
    [group] = fresh.optimizers["g"].param_groups
    assert group["capturable"] is False and type(group["lr"]) is float and group["lr"] == 0.25
    fit(fresh, sampler, 2, progress=False)
    graphed, _ = make_run()
    rate = graphed.optimizers["g"].param_groups[0]["lr"] = torch.tensor(1.0)
    state["optimizers"]["g"]["param_groups"][0]["lr"] = 0.5
    graphed.load_checkpoint_state(state)
    assert graphed.optimizers["g"].param_groups[0]["lr"] is rate and float(rate) == 0.5


def test_a_checkpoint_written_on_a_gpu_resumes_on_a_cpu_only_machine(tmp_path, monkeypatch):
    """Every tensor of a GPU run's checkpoint is tagged cuda:0, and it holds the CUDA generator's state; a CPU-only
    machine reads it (map_location), ignores that state and resumes. The tags are faked at save time."""
    import torch.serialization

    model, sampler = make_run()
    fit(model, sampler, 4, run_dir=tmp_path, checkpoint_every=4, log_every=4, progress=False)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    state["rng"]["cuda"] = torch.zeros(16, dtype=torch.uint8)
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(state, tmp_path / CHECKPOINT)
    if not torch.cuda.is_available():  # the emulation is real: a plain load asks for the GPU
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / CHECKPOINT, weights_only=False)
    resumed, sampler = make_run()
    history = fit(resumed, sampler, 8, run_dir=tmp_path, checkpoint_every=4, log_every=4, progress=False)
    assert history["step"] == [4, 8] and resumed.device.type == "cpu"
    assert all(value.device.type == "cpu" for value in resumed.state_dict().values())


class DeviceMatcher(GenerativeModel):
    """:class:`MomentMatcher` with its noise on the model's device and a graph-safe step."""

    graph_safe = True

    def __init__(self):
        super().__init__()
        self.generator = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))
        self.optimizers = {"g": torch.optim.Adam(self.generator.parameters(), lr=1e-2)}

    def step(self, x, index):
        loss = moment_loss(self.generator(torch.randn(x.shape[0], 2, device=x.device)), x)
        self.optimizers["g"].zero_grad(set_to_none=True)
        loss.backward()
        self.optimizers["g"].step()
        return {"loss": loss.detach()}

    def ema_source(self):
        return self.generator


def cuda_run(family_case: tuple[str, ...], graphed: bool, amp: bool,
             steps: int = 8) -> tuple[list[torch.Tensor], list[float]]:
    """Parameters and losses after ``steps`` steps of a tiny 28x28 family on CUDA, replayed as a graph or, for the
    reference, through a :class:`StepGraph` that never captures: both runs then have capturable optimisers (whose
    rounding differs from the default Adam's by an ulp, which Adam turns into a move of about lr on a parameter whose
    gradient is near zero) and deterministic cuDNN kernels."""
    model, _ = tiny_family(family_case[0], (1, 28, 28), *family_case[1:])
    model = model.cuda()
    torch.manual_seed(1)
    sampler = BatchSampler(torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8), 16, "cuda", seed=1)
    graph = StepGraph(model, amp=amp, warmup=GRAPH_WARMUP_STEPS if graphed else steps)
    losses = []
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        for _ in range(steps):
            step_losses = graph(*draw_batches(sampler, model.batches_per_step))
            losses.append(float(next(iter(step_losses.values()))))
    assert graph.captured_at == (GRAPH_WARMUP_STEPS if graphed else None)
    return parameters(model), losses


@CUDA
@pytest.mark.parametrize("case", [("gan", "variant=pacgan", "pack=2"), ("energy",), ("score",),
                                  ("realnvp", "scales=2", "blocks=1", "decay_steps=20"), ("glo", "loss=lap1")],
                         ids=lambda case: case[0])
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
def test_cuda_graph_replays_train_as_the_eager_steps_do(case, amp):
    expected, expected_losses = cuda_run(case, graphed=False, amp=amp)
    got, losses = cuda_run(case, graphed=True, amp=amp)
    rtol, atol = (2e-2, 1e-3) if amp else (1e-3, 1e-4)  # the same kernels; the margin is for atomics' order
    assert losses == pytest.approx(expected_losses, rel=rtol, abs=atol)
    for want, have in zip(expected, got):
        torch.testing.assert_close(have, want, rtol=rtol, atol=atol)


@CUDA
def test_cuda_graph_fit_resumes_and_records_where_it_replayed(tmp_path):
    def run(steps: int):
        torch.manual_seed(0)
        model = DeviceMatcher().cuda()
        sampler = BatchSampler(torch.randn(512, 2), 32, "cuda", seed=0)
        history = fit(model, sampler, steps, run_dir=tmp_path, checkpoint_every=6, log_every=3, progress=False,
                      cuda_graph=True, ema_decay=0.9)
        return model, history

    model, history = run(12)
    assert model.graph_captured_at == GRAPH_WARMUP_STEPS + 1
    assert len(set(history["loss"])) == len(history["loss"]) == 4 and all(map(math.isfinite, history["loss"]))
    resumed, history = run(18)
    assert resumed.graph_captured_at == 12 + GRAPH_WARMUP_STEPS + 1 and len(history["loss"]) == 6


def optimizer_with_step_counts(kind: type[torch.optim.Optimizer], **options) -> torch.optim.Optimizer:
    """An optimiser over one parameter on the 'meta' device whose step count starts on the CPU: a second device,
    so that where counts go is visible without a GPU."""
    param = nn.Parameter(torch.empty(3, device="meta"))
    optimizer = kind([param], lr=0.1, **options)
    optimizer.state[param]["step"] = torch.tensor(4.0)
    return optimizer


def step_count_device(optimizer: torch.optim.Optimizer) -> str:
    """Device type of the one parameter's step count."""
    return next(iter(optimizer.state.values()))["step"].device.type


@pytest.mark.parametrize("capturable, fused, where", [(True, None, "meta"), (False, True, "meta"),
                                                      (False, None, "cpu"), (False, False, "cpu")])
def test_step_counts_go_to_the_parameter_s_device_only_in_capturable_or_fused_groups(capturable, fused, where):
    optimizer = optimizer_with_step_counts(torch.optim.Adam, capturable=capturable)
    optimizer.param_groups[0]["fused"] = fused  # set after construction: fused Adam refuses meta parameters
    place_step_counts(optimizer)
    assert step_count_device(optimizer) == where


def test_make_capturable_switches_only_optimisers_that_have_the_mode():
    adam = optimizer_with_step_counts(torch.optim.Adam)
    make_capturable(adam)
    assert adam.param_groups[0]["capturable"] is True and step_count_device(adam) == "meta"
    plain = optimizer_with_step_counts(torch.optim.SGD)  # no capturable mode: its counts stay where they are
    make_capturable(plain)
    assert "capturable" not in plain.param_groups[0] and step_count_device(plain) == "cpu"


def test_a_mirrored_step_count_follows_its_buffer_when_a_parent_loads_a_state_dict_and_steps_with_it():
    import copy

    from genlib.train import count_step, mirror_step_count

    counted = nn.Module()
    counted.register_buffer("steps", torch.tensor(3))
    mirror_step_count(counted, "steps", "_steps")
    assert counted._steps == 3
    holder = nn.Sequential(nn.Linear(1, 1), counted)
    state = holder.state_dict()
    state["1.steps"] = torch.tensor(7)
    holder.load_state_dict(state)
    assert counted._steps == 7
    twin = copy.deepcopy(holder)  # an EMA copy, say: its hook sets the twin's own count
    twin.load_state_dict({**state, "1.steps": torch.tensor(11)})
    assert twin[1]._steps == 11 and counted._steps == 7
    assert count_step(counted, "steps", "_steps") == 8 == int(counted.steps) and twin[1]._steps == 11


class TwoPlayers(GenerativeModel):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 1), nn.Linear(3, 1)
        self.optimizers = {"a": torch.optim.SGD(self.a.parameters(), lr=0.1),
                           "b": torch.optim.SGD(self.b.parameters(), lr=0.1)}


def test_a_players_update_steps_its_own_parameters_on_fresh_gradients_and_leaves_the_others_alone():
    torch.manual_seed(0)
    model, x = TwoPlayers(), torch.randn(5, 3)
    leaf = torch.randn(5, 1, requires_grad=True)  # a GLO code batch, say
    loss = lambda: (model.a(x) * model.b(x) * leaf).sum()
    expected_a = torch.autograd.grad(loss(), [model.a.weight, leaf])
    before_a, before_b = model.a.weight.detach().clone(), model.b.weight.detach().clone()
    model.a.weight.grad = torch.ones_like(model.a.weight)  # a stale gradient: replaced, not added to
    model.b.weight.grad = marker = torch.full_like(model.b.weight, 7.0)
    model.update("a", loss(), leaves=[leaf])
    assert torch.allclose(model.a.weight.grad, expected_a[0]) and torch.allclose(leaf.grad, expected_a[1])
    assert torch.allclose(model.a.weight, before_a - 0.1 * expected_a[0])
    assert model.b.weight.grad is marker and torch.equal(marker, torch.full_like(marker, 7.0))
    assert torch.equal(model.b.weight, before_b)
    shared = loss()  # retain_graph: a second player's backward through the same graph
    model.backward("b", shared, retain_graph=True)
    model.backward("a", shared)
    expected_b = torch.autograd.grad(loss(), model.b.weight)[0]
    assert torch.allclose(model.b.weight.grad, expected_b) and torch.equal(model.b.weight, before_b)  # no step


SYNCING_STEP = """
import torch
from torch import nn
from genlib.data import BatchSampler
from genlib.train import GRAPH_WARMUP_STEPS, GenerativeModel, StepGraph

class Syncing(GenerativeModel):
    graph_safe = True  # a false claim: the step reads its loss on the host

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(2, 2)
        self.optimizers = {"net": torch.optim.Adam(self.net.parameters())}

    def step(self, x, index):
        loss = self.net(x).square().mean()
        if loss.item() < 0:
            raise AssertionError("a mean square is not negative")
        self.optimizers["net"].zero_grad(set_to_none=True)
        loss.backward()
        self.optimizers["net"].step()
        return {"loss": loss.detach()}

graph = StepGraph(Syncing().cuda(), amp=False)
sampler = BatchSampler(torch.randn(64, 2), 8, "cuda")
for _ in range(GRAPH_WARMUP_STEPS):
    graph(*next(sampler))
try:
    graph(*next(sampler))
except RuntimeError as error:
    print("raised:", error)
"""


@CUDA
def test_a_step_that_syncs_is_a_clear_error_on_cuda():
    """In a process of its own: a failed capture may leave the CUDA generator in capture mode."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", SYNCING_STEP], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "raised: CUDA graph capture of Syncing.step failed" in result.stdout
    assert "not graph_safe after all" in result.stdout


def test_checkpoint_rng_state_holds_the_models_cuda_generator_only(monkeypatch):
    """A CPU run saves no CUDA state; a CUDA run saves its own device's, and restores it into that device, so a
    checkpoint resumes on a machine with any number of GPUs (older checkpoints held a list, one state per GPU)."""
    from genlib import train

    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state",
                        lambda device: calls.append(("get", device)) or torch.full((4,), 7, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device: calls.append(("set", device, int(state.sum()))))
    assert "cuda" not in train.rng_state("cpu") and calls == []
    state = train.rng_state(torch.device("cuda", 1))
    train.set_rng_state(state, torch.device("cuda", 1))
    assert calls == [("get", torch.device("cuda", 1)), ("set", torch.device("cuda", 1), 28)]
    calls.clear()
    legacy = dict(state, cuda=[torch.zeros(4, dtype=torch.uint8), torch.ones(4, dtype=torch.uint8)])
    train.set_rng_state(legacy, "cuda:1")
    train.set_rng_state(legacy, "cuda:2")  # no saved state for a third GPU: its generator is left alone
    train.set_rng_state(legacy, "cpu")
    assert calls == [("set", torch.device("cuda", 1), 4)]
    calls.clear()
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # 'cuda' without an index: the current GPU's entry
    train.set_rng_state(legacy, "cuda")
    assert calls == [("set", torch.device("cuda"), 4)]


def test_a_saved_rng_state_brings_back_the_python_numpy_and_torch_draws():
    """A resumed step that draws from any of the three generators draws what the uninterrupted run drew."""
    import random

    import numpy as np

    from genlib import train

    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    state = train.rng_state("cpu")
    expected = (random.random(), np.random.rand(3), torch.rand(3))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)  # another process's generators
    train.set_rng_state(state, "cpu")
    assert random.random() == expected[0]
    assert np.array_equal(np.random.rand(3), expected[1]) and torch.equal(torch.rand(3), expected[2])


class Recording(MomentMatcher):
    """MomentMatcher that keeps every step's losses as Python floats (an independent record)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen: list[dict[str, float]] = []

    def step(self, x, index):
        losses = super().step(x, index)
        self.seen.append({k: float(v.detach()) for k, v in losses.items()})
        return losses


def test_logged_values_are_the_means_of_each_window_of_steps():
    torch.manual_seed(0)
    data = torch.randn(256, 2) * torch.tensor([0.5, 2.0]) + torch.tensor([1.0, -1.0])
    model = Recording()
    history = fit(model, BatchSampler(data, 16, "cpu", seed=0), 11, log_every=4, progress=False)
    assert history["step"] == [4, 8, 11]
    windows = [model.seen[0:4], model.seen[4:8], model.seen[8:11]]  # the last window is the short one
    for name in ("loss", "fake_mean"):
        expected = [sum(step[name] for step in window) / len(window) for window in windows]
        assert history[name] == pytest.approx(expected, rel=1e-6, abs=1e-7)


class Bf16Losses(GenerativeModel):
    """Reports the bf16 losses 256 and 258 in turn (bf16 has no 257: its steps are 2 apart there)."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device
        self.calls = 0

    def step(self, x, index):
        self.calls += 1
        return {"loss": torch.tensor(256.0 if self.calls % 2 else 258.0, dtype=torch.bfloat16)}


def test_window_means_of_bf16_losses_are_taken_in_fp32():
    history = fit(Bf16Losses(), iter([(torch.zeros(4, 2), torch.arange(4))] * 4), 4, log_every=2, progress=False)
    assert history["loss"] == [257.0, 257.0]  # a mean taken in bf16 would round to 256


def test_a_crash_while_saving_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    model, sampler = make_run()
    fit(model, sampler, 10, run_dir=tmp_path, checkpoint_every=10, log_every=10, progress=False)
    real_save = torch.save

    def crash_half_way(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 half a checkpoint")  # a few bytes land in the file, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_half_way)
    model, sampler = make_run()
    with pytest.raises(OSError, match="disk full"):
        fit(model, sampler, 20, run_dir=tmp_path, checkpoint_every=10, log_every=10, progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(tmp_path / CHECKPOINT, weights_only=False)["step"] == 10
    assert sorted(path.name for path in tmp_path.iterdir()) == [CHECKPOINT]  # the temporary file is gone too
    (tmp_path / CHECKPOINT).write_bytes(b"PK\x03\x04 half a checkpoint")  # torn by something else
    with pytest.raises(ValueError, match="cannot be read.*move it aside"):
        fit(make_run()[0], make_run()[1], 20, run_dir=tmp_path, progress=False)


def test_a_crash_loses_at_most_checkpoint_every_steps_whatever_log_every(tmp_path):
    """Checkpoint steps that are not log steps still save, with the window in progress unlogged."""
    def crash(step, _model):
        raise RuntimeError("crash")

    model, sampler = make_run()
    with pytest.raises(RuntimeError, match="crash"):
        fit(model, sampler, 100, run_dir=tmp_path, checkpoint_every=10, log_every=50, progress=False,
            callback=crash, callback_every=25)
    saved = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    assert saved["step"] == 20 and saved["history"]["step"] == [] and len(saved["pending"]) == 20


def test_the_logged_history_does_not_depend_on_checkpoints_or_resumes(tmp_path):
    """Windows of log_every steps, with or without run_dir, whatever checkpoint_every, resumed or not."""
    plain = fit(make_run()[0], make_run()[1], 100, log_every=50, progress=False)
    checkpointed = fit(make_run()[0], make_run()[1], 100, run_dir=tmp_path / "a", checkpoint_every=30, log_every=50,
                       progress=False)
    fit(make_run()[0], make_run()[1], 60, run_dir=tmp_path / "b", checkpoint_every=30, log_every=50, progress=False)
    extended = fit(make_run()[0], make_run()[1], 100, run_dir=tmp_path / "b", checkpoint_every=30, log_every=50,
                   progress=False)
    assert plain["step"] == [50, 100]
    assert checkpointed == plain and extended == plain


@pytest.mark.usefixtures("python_sigint")
def test_an_interrupt_never_saves_a_non_finite_step(tmp_path):
    """The non-finite guard runs before the interrupt's save: a NaN step is an error, and nothing is written."""
    model, sampler = make_run(explode_at=7)
    try:
        with pytest.raises(NonFiniteLossError, match="step 7 .*no checkpoint was written"):
            fit(model, sampler, 20, run_dir=tmp_path, checkpoint_every=10, log_every=5, progress=False,
                callback=lambda step, _: os.kill(os.getpid(), signal.SIGINT), callback_every=7)
    except TrainingInterrupted as stopped:  # a KeyboardInterrupt: it would stop the whole test session
        pytest.fail(f"the non-finite step was saved as an interrupt: {stopped}")
    assert not (tmp_path / CHECKPOINT).exists()


class BatchNormMatcher(MomentMatcher):
    """MomentMatcher whose generator has a BatchNorm layer (running statistics are buffers)."""

    def __init__(self):
        super().__init__()
        self.generator = nn.Sequential(nn.Linear(2, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 2))
        self.optimizers = {"g": torch.optim.Adam(self.generator.parameters(), lr=1e-2)}


def test_the_ema_copies_the_live_buffers():
    torch.manual_seed(0)
    model = BatchNormMatcher()
    fit(model, BatchSampler(torch.randn(128, 2) + 3.0, 16, "cpu", seed=0), 5, ema_decay=0.9, progress=False)
    live, ema = dict(model.generator.named_buffers()), dict(model.ema.named_buffers())
    assert set(live) == set(ema) and int(live["1.num_batches_tracked"]) == 5
    for name in live:
        assert torch.equal(ema[name], live[name]), name


def test_a_checkpoint_without_an_ema_update_count_resumes_warmed_up_and_one_with_it_resumes_its_count():
    model, sampler = make_run()
    model.attach_ema(0.9)
    fresh, _ = make_run()
    fresh.load_checkpoint_state(model.checkpoint_state())  # saved before any update: the warm-up is all ahead
    assert int(fresh.ema_updates) == 0
    for _ in range(3):
        model.step(*next(sampler))
        model.update_ema()
    state = model.checkpoint_state()
    assert state["ema_updates"] == 3
    resumed, _ = make_run()
    resumed.load_checkpoint_state(state)
    assert int(resumed.ema_updates) == 3
    del state["ema_updates"]  # as written before the warm-up existed
    older, _ = make_run()
    older.load_checkpoint_state(state)
    assert int(older.ema_updates) == 10**6


def test_saved_ema_decay_reads_the_stored_decay_and_gives_older_averaged_checkpoints_0_999():
    from genlib.train import saved_ema_decay

    averaged, plain = {"ema.0.weight": torch.zeros(1), "generator.0.weight": torch.zeros(1)}, {"g.w": torch.zeros(1)}
    assert saved_ema_decay({"model": averaged, "ema_decay": 0.9}) == 0.9
    assert saved_ema_decay({"model": averaged}) == 0.999  # saved before checkpoints stored the decay
    assert saved_ema_decay({"model": plain, "ema_decay": 0.0}) == 0.0 and saved_ema_decay({"model": plain}) is None
