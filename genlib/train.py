"""The one training loop, and the one contract every model family implements.

A family is a :class:`GenerativeModel`: it builds its networks and its optimisers (``self.optimizers``, a dict)
in ``__init__``, takes one full training step on a batch in :meth:`GenerativeModel.step` (forward, backward, every
optimiser step it needs, e.g. the critic's and then the generator's; :meth:`GenerativeModel.update` is one player's
step, touching no other player's gradients) and returns its losses, and draws samples with
:meth:`GenerativeModel.sample`. :func:`fit` never special-cases a family; it adds what
every run needs: a progress bar, a loss history, atomic periodic checkpoints with exact
resume, a guard against non-finite losses, bf16 autocast and an EMA of the generator on CUDA, and (for a
family whose step is ``graph_safe``, when asked) the step replayed as one CUDA graph (:class:`StepGraph`).
"""

from __future__ import annotations

import copy
import math
import os
import pickle
import random
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from genlib import runtime

if TYPE_CHECKING:
    import tqdm

    from genlib.data import BatchSampler

Batch = tuple[torch.Tensor, torch.Tensor]
History = dict[str, list[float]]
CHECKPOINT = "checkpoint.pt"
CUDA_GRAPH_ENV = "GENLIB_CUDA_GRAPH"
"""Set to 1 to have :func:`fit` replay a ``graph_safe`` family's step as a CUDA graph by default."""
GRAPH_WARMUP_STEPS = 3
"""Eager steps on a side stream before a step is captured (lazy optimiser state and library handles settle)."""


class NonFiniteLossError(RuntimeError):
    """Raised when a loss becomes NaN or infinite; the message names the step and the last good checkpoint."""


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by :func:`fit` after a Ctrl-C (SIGINT) or SIGTERM, once the step in progress has finished and a
    checkpoint of it is saved: rerunning the same call resumes there. ``step``, ``path`` and ``signum`` say where
    and why."""

    def __init__(self, step: int, path: Path, signum: int):
        super().__init__(f"interrupted ({signal.Signals(signum).name}) after step {step}; its checkpoint is "
                         f"{path}: run the same training again to resume from it")
        self.step, self.path, self.signum = step, path, signum

    def __reduce__(self) -> tuple[type[TrainingInterrupted], tuple[int, Path, int]]:
        # pickles (e.g. back from a worker process) with its three arguments
        return type(self), (self.step, self.path, self.signum)


class GenerativeModel(nn.Module):
    """Base class of every model family (see the module docstring for the contract)."""

    graph_safe: bool = False
    """True when :meth:`step` can be captured once as a CUDA graph and replayed (:class:`StepGraph`): it reads
    no device value on the host (``.item()``, ``nonzero``), makes no tensor whose shape depends on data, and
    changes no Python state or hyperparameter between steps (a step counter kept in Python, a learning-rate
    schedule). A family that claims it is checked by tests/test_train.py."""

    batches_per_step: int = 1
    """How many batches :func:`fit` draws for one :meth:`step`, concatenated along dim 0: a family whose critic takes
    several updates per step sets it so that each update sees fresh reals (:func:`update_batches` hands them out)."""

    def __init__(self) -> None:
        super().__init__()
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.ema: nn.Module | None = None
        self.ema_decay: float | None = None  # the EMA's decay; 0.0: none, as asked (fit's ema_decay=0), kept on resume
        self.graph_captured_at: int | None = None  # the step from which fit replayed a CUDA graph, if it did

    def step(self, x: torch.Tensor, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """One training step on reals ``x`` [B, ...] with dataset indices ``index`` [B]; returns scalar losses."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """Draw ``n`` samples [n, ...] on the model's device."""
        raise NotImplementedError

    def backward(self, player: str, loss: torch.Tensor, retain_graph: bool = False,
                 leaves: Sequence[torch.Tensor] = ()) -> None:
        """Fresh gradients of scalar ``loss`` for the parameters of ``self.optimizers[player]`` and the tensors
        ``leaves``, and for nothing else: another player's ``.grad`` is left alone and not even computed."""
        optimizer = self.optimizers[player]
        optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=[*(p for group in optimizer.param_groups for p in group["params"]), *leaves],
                      retain_graph=retain_graph)

    def update(self, player: str, loss: torch.Tensor, leaves: Sequence[torch.Tensor] = ()) -> None:
        """One step of ``self.optimizers[player]`` on scalar ``loss`` (gradients as in :meth:`backward`)."""
        self.backward(player, loss, leaves=leaves)
        self.optimizers[player].step()

    def ema_source(self) -> nn.Module | None:
        """The sub-network whose weights an EMA averages (usually the generator); None for no EMA."""
        return None

    def prepare_for_graph(self) -> None:
        """Called by :class:`StepGraph` before its warm-up steps: move onto the device whatever a step would
        otherwise set from Python (a learning-rate schedule, say). Nothing by default."""

    def sampling_net(self) -> nn.Module:
        """The network to sample with: the EMA copy when one is kept, else the live ``ema_source()``."""
        source = self.ema_source()
        if source is None:
            raise NotImplementedError(f"{type(self).__name__} has no ema_source() to sample with")
        return self.ema if self.ema is not None else source

    @property
    def device(self) -> torch.device:
        """Device of the model's first parameter."""
        return next(self.parameters()).device

    def attach_ema(self, decay: float) -> None:
        """Start keeping an exponential moving average of ``ema_source()``: ``decay`` per step once warmed up
        (see :meth:`update_ema`)."""
        source = self.ema_source()
        if source is None:
            raise ValueError(f"{type(self).__name__} defines no ema_source(); cannot keep an EMA")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.ema = copy.deepcopy(source).requires_grad_(False).eval()
        self.ema_decay = decay
        self.ema_updates = torch.zeros((), device=next(source.parameters()).device)

    @torch.no_grad()
    def update_ema(self) -> None:
        """Move the EMA weights towards the live ones with decay ``min(decay, (1 + t) / (10 + t))`` at the t-th
        update (t = 0, 1, ...); buffers (BatchNorm statistics) are copied.

        The warm-up matters for short runs: a flat 0.999 would keep 0.999^400 = 67 % of the random initialisation
        after 400 steps. The decay is computed on the device, so a CUDA graph can replay the update."""
        if self.ema is None:
            return
        source = self.ema_source()
        ema_params = list(self.ema.parameters())
        self.ema_updates = self.ema_updates.to(ema_params[0].device)  # a no-op once placed
        decay = ((1.0 + self.ema_updates) / (10.0 + self.ema_updates)).clamp(max=self.ema_decay)
        steps = torch._foreach_sub([p.detach() for p in source.parameters()], ema_params)
        torch._foreach_mul_(steps, 1.0 - decay)  # not _foreach_lerp_: a tensor weight needs a newer torch
        torch._foreach_add_(ema_params, steps)
        self.ema_updates += 1
        for ema_buffer, buffer in zip(self.ema.buffers(), source.buffers()):
            ema_buffer.copy_(buffer)

    def checkpoint_state(self) -> dict:
        """Everything needed to resume: weights (with EMA) and optimiser states."""
        return {"model": self.state_dict(), "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "ema_decay": self.ema_decay,  # None or 0.0 (declined) without an EMA: see __init__
                "ema_updates": int(self.ema_updates) if self.ema is not None else None}

    def load_checkpoint_state(self, state: dict) -> None:
        """Inverse of :meth:`checkpoint_state`. Whether an optimiser is ``capturable``, and whether its learning
        rate is a Python number or a device tensor, belong to this process (a run captured on a GPU may resume
        eagerly, or on a CPU), so they are kept; only the rate's value is loaded. An EMA is kept if either side
        has one (:func:`fit` keeps one by default on CUDA only): a checkpoint's EMA is attached, with its decay,
        where the model has none, and a model's EMA that the checkpoint lacks starts again from the loaded
        weights."""
        weights = state["model"]
        saved_ema = any(key.startswith("ema.") for key in weights)
        if saved_ema and self.ema is None:
            self.attach_ema(saved_ema_decay(state))
        if not saved_ema and self.ema is None and state.get("ema_decay") == 0.0:
            self.ema_decay = 0.0  # a run told to keep no average still keeps none
        if self.ema is not None and not saved_ema:
            decay, self.ema = self.ema_decay, None
            self.load_state_dict(weights)
            self.attach_ema(decay)  # a fresh copy of the loaded weights
        else:
            self.load_state_dict(weights)
            if self.ema is not None:  # older checkpoints did not count updates: count them as warmed up
                updates = state.get("ema_updates")
                self.ema_updates.fill_(10**6 if updates is None else updates)
        for name, optimizer in self.optimizers.items():
            modes = [(group.get("capturable"), group["lr"]) for group in optimizer.param_groups]
            optimizer.load_state_dict(state["optimizers"][name])
            for group, (capturable, lr) in zip(optimizer.param_groups, modes):
                if capturable is not None:
                    group["capturable"] = capturable
                if isinstance(lr, torch.Tensor):
                    group["lr"] = lr.fill_(group["lr"])
                elif isinstance(group["lr"], torch.Tensor):
                    group["lr"] = group["lr"].item()
            place_step_counts(optimizer)


def saved_ema_decay(state: dict) -> float | None:
    """The decay a checkpoint's state resumes its average with: the stored one, or 0.999 where weights of an
    average were saved without it (older checkpoints); None or 0.0 (declined) for a run without one."""
    decay = state.get("ema_decay")
    if decay is None and any(key.startswith("ema.") for key in state["model"]):
        return 0.999
    return decay


def mirror_step_count(module: nn.Module, buffer: str, attribute: str) -> None:
    """Keep ``module.<attribute>``, a Python int, equal to the step-count buffer ``module.<buffer>`` whenever a state
    dict is loaded into the module or any module holding it. The buffer goes into checkpoints; the int lets a
    schedule read the count every step without a device sync (:func:`count_step` advances both)."""
    setattr(module, attribute, int(getattr(module, buffer)))
    module.register_load_state_dict_post_hook(lambda loaded, _keys: setattr(loaded, attribute,
                                                                           int(getattr(loaded, buffer))))


def count_step(module: nn.Module, buffer: str, attribute: str) -> int:
    """One more step on a count kept by :func:`mirror_step_count`: the buffer and its mirror; returns the new count."""
    getattr(module, buffer).add_(1)
    setattr(module, attribute, getattr(module, attribute) + 1)
    return getattr(module, attribute)


def place_step_counts(optimizer: torch.optim.Optimizer) -> None:
    """Put each parameter's step count where its group's mode keeps it: on the parameter's device for a
    ``capturable`` or ``fused`` group (a captured step increments it there), on the CPU otherwise. Optimisers
    without the mode (genlib's own, say) keep theirs where they are."""
    for group in optimizer.param_groups:
        if "capturable" not in group:
            continue
        on_device = group["capturable"] or group.get("fused")
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].to(param.device if on_device else "cpu")


def make_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Switch an optimiser to ``capturable`` where it has the mode (a captured step needs it: step counts on the
    device, no host reads; torch checks every group, fused ones too) and move its step counts there."""
    for group in optimizer.param_groups:
        if "capturable" in group:
            group["capturable"] = True
    # torch warns once when a capturable optimiser steps outside a capture; the warm-up steps do so by design.
    optimizer._warned_capturable_if_run_uncaptured = True
    place_step_counts(optimizer)


def rng_state(device: torch.device | str = "cpu") -> dict:
    """The state of every random number generator a training step on ``device`` may touch (on CUDA, that
    device's generator only: a checkpoint then resumes on a machine with any number of GPUs)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    device = torch.device(device)
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | str = "cpu") -> None:
    """Restore the generators saved by :func:`rng_state`, the CUDA one into ``device``'s generator (the byte
    tensors may come back on the GPU when a checkpoint is loaded with ``map_location="cuda"``; the setters take CPU
    tensors). Older checkpoints saved every GPU's state in a list: the entry of ``device``'s index is used."""
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    device = torch.device(device)
    cuda_state = state.get("cuda")
    if device.type != "cuda" or cuda_state is None:
        return
    if isinstance(cuda_state, (list, tuple)):
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= len(cuda_state):
            return
        cuda_state = cuda_state[index]
    torch.cuda.set_rng_state(cuda_state.cpu(), device)


def save_atomic(obj: object, path: Path) -> None:
    """``torch.save`` through :func:`genlib.runtime.write_atomically`: a crash never leaves a half-written file."""
    runtime.write_atomically(path, lambda file: torch.save(obj, file))


def save_checkpoint(path: Path, model: GenerativeModel, sampler: BatchSampler, step: int, history: History,
                    clock: TrainClock | None = None, meta: dict | None = None,
                    pending: list[dict[str, torch.Tensor]] | None = None) -> None:
    """Write model, optimisers, sampler position, RNG states, history and training time after ``step`` steps,
    ``meta`` (what made the run, e.g. the CLI's arguments; :func:`load_checkpoint` checks it) and ``pending``, the
    losses of the steps since the last logged window (a save between log steps, after an interrupt)."""
    state = model.checkpoint_state()
    state.update(step=step, history=history, sampler=sampler.state_dict(), rng=rng_state(model.device),
                 batches_per_step=model.batches_per_step,
                 clock=(clock or TrainClock()).now(), meta=meta, pending=pending or [])
    save_atomic(state, path)


class CheckpointPastEndError(ValueError):
    """A checkpoint is already past the steps a run asks for (:func:`load_checkpoint`'s ``max_step``)."""


def read_checkpoint(path: Path, device: torch.device | str = "cpu", mmap: bool = False) -> dict[str, Any]:
    """The state :func:`save_checkpoint` wrote to ``path``, tensors on ``device`` (``mmap``: read lazily, for
    a look at a few entries); a torn or foreign file is a ValueError that says what to do."""
    try:
        return torch.load(path, map_location=device, weights_only=False, mmap=mmap)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise ValueError(f"{path} cannot be read ({error}); move it aside to train from the start") from error


def load_checkpoint(path: Path, model: GenerativeModel, sampler: BatchSampler, clock: TrainClock | None = None,
                    meta: dict | None = None, max_step: int | None = None,
                    ) -> tuple[int, History, list[dict[str, torch.Tensor]]]:
    """Restore what :func:`save_checkpoint` wrote (``clock`` goes on from the saved one); return (step, history,
    the pending losses of the window in progress).

    Each of these is a ValueError before anything is loaded: with ``meta``, a checkpoint saved with other ``meta``
    (another run's in the same folder; the message names the differences); one whose run drew another number of
    batches per step than ``model.batches_per_step`` (its sampler position would mean other batches); with
    ``max_step``, one already past that step."""
    state = read_checkpoint(path, model.device)
    if max_step is not None and state["step"] > max_step:
        raise CheckpointPastEndError(f"{path} is at step {state['step']}, past the {max_step} steps asked for: ask "
                                     f"for at least {state['step']}, or train into another folder")
    saved = state.get("meta")
    if meta is not None and saved is not None and saved != meta:
        raise ValueError(f"{path} is the checkpoint of another run ({differences(saved, meta)}); resume it with "
                         "its own settings, or train into another folder")
    drawn = state.get("batches_per_step", 1)  # checkpoints from before the key drew one batch per step
    if drawn != model.batches_per_step:
        raise ValueError(f"{path} was saved by a run that drew {drawn} real batch(es) per step, and this model "
                         f"draws {model.batches_per_step}: resume it with a model that draws as many (checkpoints made "
                         "before fresh reals per critic update drew one, as fresh_reals=False does), or train into "
                         "another folder")
    model.load_checkpoint_state(state)
    sampler.load_state_dict(state["sampler"])
    set_rng_state(state["rng"], model.device)
    if clock is not None:
        clock.resume(state.get("clock"))
    return state["step"], state["history"], state.get("pending", [])


def differences(there: dict, here: dict) -> str:
    """'key: value there, value here' for every key whose values differ (a missing key counts as None)."""
    return ", ".join(f"{key}: {there.get(key)!r} there, {here.get(key)!r} here"
                     for key in sorted(set(there) | set(here)) if there.get(key) != here.get(key))


@dataclass
class TrainClock:
    """Training seconds summed over every process that trained a run (a run resumed on another machine, say),
    the number of those processes and the device each trained on; ``now()`` is what a checkpoint stores, and what
    :func:`fit`'s caller reads after training."""

    seconds_before: float = 0.0
    began: float = field(default_factory=lambda: TrainClock.read())
    devices_before: list[str] = field(default_factory=list)  # the earlier processes' devices, oldest first
    device: str = "unrecorded"  # this process's (fit sets it)

    @property
    def processes(self) -> int:
        """How many processes trained the run, this one included."""
        return len(self.devices_before) + 1

    @staticmethod
    def read() -> float:
        """Seconds on a monotonic clock (one place, so tests can replace it)."""
        return time.perf_counter()

    def resume(self, saved: dict | None) -> None:
        """Go on from ``saved``, a checkpoint's ``now()`` (None for a checkpoint older than clocks: unknown time;
        one without devices names each earlier process's device 'unrecorded')."""
        saved = saved or {"seconds": float("nan"), "processes": 1}
        self.seconds_before = saved["seconds"]
        self.devices_before = list(saved.get("devices", ["unrecorded"] * saved["processes"]))

    def now(self) -> dict:
        """What a checkpoint stores: {'seconds': training seconds so far, 'processes': how many trained it,
        'devices': the device of each, oldest first}."""
        return {"seconds": self.seconds_before + TrainClock.read() - self.began, "processes": self.processes,
                "devices": [*self.devices_before, self.device]}


def first_non_finite(pending: list[dict[str, torch.Tensor]], first_step: int) -> tuple[int, dict[str, float]] | None:
    """(step, losses) of the first step in ``pending`` with a NaN/inf loss, else None; one device sync.
    Steps may report different losses (a model with stages)."""
    finite = torch.stack([torch.isfinite(torch.stack(list(losses.values()))).all() for losses in pending]).cpu()
    bad_rows = (~finite).nonzero()
    if len(bad_rows) == 0:
        return None
    row = int(bad_rows[0])
    return first_step + row, {k: float(v) for k, v in pending[row].items()}


def log_means(history: History, step: int, pending: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Append the mean of each loss over ``pending`` at ``step``; return the means. A loss no step of the
    window reported (another stage's) is NaN there, so every list stays aligned with ``history['step']``."""
    names = dict.fromkeys(name for losses in pending for name in losses)
    means = {k: torch.stack([losses[k] for losses in pending if k in losses]).mean().item() for k in names}
    logged = len(history["step"])
    history["step"].append(step)
    for name in [name for name in dict.fromkeys([*history, *means]) if name != "step"]:
        history.setdefault(name, [math.nan] * logged).append(means.get(name, math.nan))
    return means


def unlog_last(history: History) -> None:
    """Remove the last logged window from ``history`` (and a loss that only it reported)."""
    history["step"].pop()
    for name in [name for name in history if name != "step"]:
        history[name].pop()
        if all(math.isnan(value) for value in history[name]):
            del history[name]


def non_finite_error(step: int, losses: dict[str, float], path: Path | None,
                     last_saved: int | None) -> NonFiniteLossError:
    """The error raised for a non-finite loss, naming the step and the checkpoint that is kept."""
    where = (f"the last good checkpoint (step {last_saved}) is kept in {path}"
             if path is not None and last_saved is not None else "no checkpoint was written")
    shown = ", ".join(f"{k}={v:.4g}" for k, v in losses.items())
    return NonFiniteLossError(f"non-finite loss at step {step} ({shown}); training stopped and {where}. "
                              "Lower the learning rate, or check the data and the model.")


def autocast_context(device: torch.device, enabled: bool) -> AbstractContextManager[None]:
    """bf16 autocast on a CUDA or CPU ``device`` when enabled; a no-op otherwise.

    Autocast's cache of bf16 weight copies is off: it lives until the outermost region exits, and an optimiser
    step inside the region does not clear it, so within one training step every forward after the first
    optimiser step (the generator's pass through a just-updated discriminator, a critic's second step) would
    see the weights from before it. A CUDA graph could not hold the cache across replays either."""
    if enabled and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return nullcontext()


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Floats narrower than fp32 (bf16 from autocast) in fp32; fp32 and float64 unchanged (for float tensors)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def draw_batches(sampler: Iterator[Batch], count: int) -> Batch:
    """The next ``count`` batches ``(x, index)`` of ``sampler``, each part concatenated along dim 0."""
    if count == 1:
        return next(sampler)
    xs, indices = zip(*(next(sampler) for _ in range(count)))
    return torch.cat(xs), torch.cat(indices)


def split_batches(x: torch.Tensor, count: int) -> tuple[torch.Tensor, ...]:
    """Reals ``x`` [count * B, ...] as the ``count`` batches [B, ...] that :func:`draw_batches` joined."""
    if count < 1 or len(x) % count:
        raise ValueError(f"{len(x)} reals do not split into {count} equal batches (a step of this model takes "
                         f"batches_per_step = {count} batches, joined along dim 0, as fit draws them)")
    return x.split(len(x) // count)


def update_batches(x: torch.Tensor, batches: int, updates: int) -> list[torch.Tensor]:
    """The real batch of each of a step's ``updates`` critic updates: the ``batches`` batches that ``x`` joins, in
    turn (one each when a family draws a batch per update; the one batch again when ``batches`` is 1)."""
    parts = split_batches(x, batches)
    return [parts[update % len(parts)] for update in range(updates)]


def train_step(model: GenerativeModel, x: torch.Tensor, index: torch.Tensor, amp: bool) -> dict[str, torch.Tensor]:
    """One training step as :func:`fit` takes it: ``model.step`` under :func:`autocast_context`, then the EMA
    update; returns the step's losses."""
    with autocast_context(model.device, amp):
        losses = model.step(x, index)
    model.update_ema()
    return losses


def use_cuda_graph(model: GenerativeModel, device: torch.device, requested: bool | None) -> bool:
    """Whether :func:`fit` replays ``model``'s step as a CUDA graph. ``requested=None`` follows the environment
    (``GENLIB_CUDA_GRAPH=1``) where it can be honoured: on CUDA, for a ``graph_safe`` family. An explicit True
    that cannot be honoured is an error."""
    if requested is None:
        return os.environ.get(CUDA_GRAPH_ENV) == "1" and device.type == "cuda" and model.graph_safe
    if requested and not model.graph_safe:
        raise ValueError(f"{type(model).__name__}.step is not graph_safe (see GenerativeModel.graph_safe)")
    if requested and device.type != "cuda":
        raise ValueError(f"a CUDA graph needs a CUDA device; the model is on {device}")
    return requested


class StepGraph:
    """A training step (``model.step`` under autocast, then the EMA update) captured once as a CUDA graph and
    replayed: one launch instead of the hundreds of small kernels (and their Python dispatch) of a step on small
    batches, which is what bounds such steps on a GPU.

    Called like a step, ``graph(x, index) -> losses``. The first ``warmup`` calls train eagerly on a side stream,
    as capture requires (lazy optimiser state, library handles and the allocator settle); the next one captures
    the step on its batch and replays it; every later call copies its batch into the captured input buffers and
    replays. Each call trains exactly one step, on batches of the captured one's shape. Optimisers are made
    ``capturable`` (:func:`make_capturable`) and stay so after :func:`fit` (their step counts on the GPU): to train
    the model on the CPU afterwards, save a checkpoint and load it there, which sets the mode of the process.
    A step that cannot be captured raises a clear error. Autocast runs without its weight cache,
    which a graph cannot hold across replays. ``captured_at`` counts the calls before the first replay.
    """

    def __init__(self, model: GenerativeModel, amp: bool, warmup: int = GRAPH_WARMUP_STEPS):
        self.model, self.amp, self.warmup = model, amp, warmup
        self.on_cuda = model.device.type == "cuda"
        self.stream = torch.cuda.Stream(model.device) if self.on_cuda else None
        if self.on_cuda:
            for optimizer in model.optimizers.values():
                make_capturable(optimizer)
            model.prepare_for_graph()
        self.calls, self.captured_at = 0, None
        self.replay: Callable[[], torch.Tensor] | None = None
        self.names: list[str] = []

    def __call__(self, x: torch.Tensor, index: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.calls <= self.warmup:
            return self._on_side_stream(x, index)
        if self.replay is None:
            self._capture_first(x, index)
        if x.shape != self.static_x.shape or index.shape != self.static_index.shape:
            # copy_ would broadcast a batch of 1, or fail without saying why
            raise ValueError(f"a captured step replays batches of shape {tuple(self.static_x.shape)}, got "
                             f"{tuple(x.shape)}: use a sampler of fixed batches "
                             "(BatchSampler drops the last short one)")
        self.static_x.copy_(x)
        self.static_index.copy_(index)
        losses = self.replay().clone()  # the captured output is overwritten by the next replay
        return dict(zip(self.names, losses.unbind()))

    def eager_step(self, x: torch.Tensor, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The step as the graph records it, run eagerly."""
        return train_step(self.model, x, index, self.amp)

    def _packed_step(self) -> torch.Tensor:
        """The step on the static buffers, its losses stacked into one fp32 tensor [n_losses] (names kept)."""
        losses = self.eager_step(self.static_x, self.static_index)
        self.names = list(losses)
        return torch.stack([value.detach().float() for value in losses.values()])

    def _on_side_stream(self, x: torch.Tensor, index: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.stream is None:
            return self.eager_step(x, index)
        current = torch.cuda.current_stream(self.model.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            losses = self.eager_step(x, index)
        current.wait_stream(self.stream)
        return losses

    def _capture_first(self, x: torch.Tensor, index: torch.Tensor) -> None:
        """Capture the step on buffers that hold batch ``x``'s shape. A step that cannot be captured (it syncs, or
        makes a data-dependent shape) is an error, not a silent eager fallback: a failed capture may leave the
        CUDA generator in capture mode, and every later random draw would repeat itself."""
        self.static_x, self.static_index = x.clone(), index.clone()
        # Every .grad is then allocated inside the capture, in the graph's own memory (PyTorch's recipe): a grad
        # left from the warm-up and freed during the step would be memory that replays write into.
        self.model.zero_grad(set_to_none=True)
        try:
            self.replay = self.capture(self._packed_step)
        except RuntimeError as error:
            raise RuntimeError(f"CUDA graph capture of {type(self.model).__name__}.step failed: its step is not "
                               f"graph_safe after all ({error}). Train without {CUDA_GRAPH_ENV}=1.") from error
        self.captured_at = self.calls - 1

    def capture(self, packed_step: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """Record ``packed_step`` without running it; return a function that runs the recording and returns its
        output (the same tensor each time)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            output = packed_step()

        def replay() -> torch.Tensor:
            graph.replay()
            return output

        return replay


def fit(
    model: GenerativeModel,
    sampler: Iterator[Batch],
    steps: int,
    *,
    run_dir: str | Path | None = None,
    checkpoint_every: int = 1000,
    log_every: int = 50,
    resume: bool = True,
    amp: bool | None = None,
    ema_decay: float | None = None,
    progress: bool = True,
    desc: str | None = None,
    callback: Callable[[int, GenerativeModel], None] | None = None,
    callback_every: int = 0,
    clock: TrainClock | None = None,
    cuda_graph: bool | None = None,
    meta: dict | None = None,
) -> History:
    """Train ``model`` for ``steps`` steps on batches from ``sampler``; return the loss history.

    ``history['step']`` lists the logged steps and ``history[name]`` the mean of each loss over
    the preceding ``log_every`` steps (NaN where no step of that window reported it, as in a model's other
    stage). With ``run_dir`` (which needs a sampler that saves its place, a :class:`genlib.data.BatchSampler`)
    a checkpoint is written atomically every
    ``checkpoint_every`` steps and at the end, and a later call with the same
    ``run_dir`` resumes exactly where the last checkpoint left it: a crashed run loses at most
    ``checkpoint_every`` steps, and one stopped by Ctrl-C (SIGINT) or SIGTERM none, since it finishes the step in
    progress, saves it and raises :class:`TrainingInterrupted` (a second Ctrl-C stops at once). ``meta``, saved with
    every checkpoint, must match a resumed checkpoint's (see :func:`load_checkpoint`); resuming a checkpoint
    already past ``steps`` is a :class:`CheckpointPastEndError` (a ValueError), raised before anything is loaded.
    ``amp`` (bf16 autocast) defaults to on where bf16 is native (:func:`genlib.runtime.native_bf16`: CUDA GPUs
    from Ampere on) and off on the CPU and older GPUs; an EMA defaults to on on CUDA and off on the CPU
    (:func:`default_ema_decay`), except that a resumed run left to the default keeps its checkpoint's average, or
    none if it was trained with ``ema_decay=0``; a decay given wins over the checkpoint's and over an average the
    model already keeps, and ``ema_decay=0`` drops any.
    ``callback(step, model)`` runs every
    ``callback_every`` steps (e.g. to record snapshots for a figure). ``clock`` (a :class:`TrainClock`),
    if given, times the training, going on from a resumed checkpoint's: read it after the call. ``cuda_graph``
    replays the step as a CUDA graph (:class:`StepGraph`, for ``graph_safe`` families on CUDA; default: the
    ``GENLIB_CUDA_GRAPH`` environment variable, see :func:`use_cuda_graph`); ``model.graph_captured_at`` then
    names the first replayed step. ``GENLIB_MAX_STEPS`` (:func:`genlib.runtime.max_steps`) cuts ``steps``, with a
    warning.
    """
    if steps < 0 or log_every < 1 or checkpoint_every < 1:
        raise ValueError("steps must be >= 0 and log_every, checkpoint_every >= 1")
    steps, cap = capped_steps(steps)
    device = model.device
    amp = runtime.native_bf16(device) if amp is None else amp
    path = checkpoint_path(run_dir, sampler)
    start, history, last_saved = 0, {"step": []}, None
    pending: list[dict[str, torch.Tensor]] = []
    clock = TrainClock() if clock is None else clock
    clock.device = runtime.device_name(device)
    if path is not None and resume and path.exists():
        try:
            start, history, pending = load_checkpoint(path, model, sampler, clock, meta, max_step=steps)
        except CheckpointPastEndError as error:
            if cap is not None:
                raise CheckpointPastEndError(f"{error} (GENLIB_MAX_STEPS={cap} cut the steps asked for)") from None
            raise
        last_saved = start
        if steps > start and pending and history["step"] and history["step"][-1] == start:
            unlog_last(history)  # a shorter run's last window, cut by its end: it goes on to its log step
    settle_ema(model, ema_decay)
    graph = StepGraph(model, amp) if use_cuda_graph(model, device, cuda_graph) else None
    model.graph_captured_at = None
    bar = _progress_bar(start, steps, desc or type(model).__name__, progress)
    began = time.perf_counter()
    stop = _DeferredStop(enabled=path is not None)
    try:
        for step in range(start + 1, steps + 1):
            x, index = draw_batches(sampler, model.batches_per_step)
            model.train()
            losses = train_step(model, x, index, amp) if graph is None else graph(x, index)
            pending.append({k: v.detach().float() for k, v in losses.items()})
            if callback is not None and callback_every and step % callback_every == 0:
                callback(step, model)
            log_now = step % log_every == 0 or step == steps
            # a checkpoint between log steps saves the window in progress: the logged history is the same
            save_now = path is not None and (step % checkpoint_every == 0 or step == steps)
            if log_now or save_now or stop.signum is not None:
                bad = first_non_finite(pending, step - len(pending) + 1)
                if bad is not None:
                    raise non_finite_error(*bad, path, last_saved)
            window = pending
            if log_now:
                means = log_means(history, step, pending)
                pending = []
                # one batch per step, as the bench and run records count, however many the step drew
                rate = x.shape[0] // model.batches_per_step * (step - start) / max(time.perf_counter() - began, 1e-9)
                bar.set_postfix({**{k: f"{v:.3g}" for k, v in means.items()}, "samples/s": f"{rate:.3g}"},
                                refresh=False)
            if save_now:
                # the last window of a run that ends between log steps is kept raw too: a longer run reopens it
                ends_mid_window = log_now and step % log_every != 0
                save_checkpoint(path, model, sampler, step, history, clock, meta,
                                window if ends_mid_window else pending)
                last_saved = step
            if stop.signum is not None:  # before the bar writes again: a Ctrl-C may have closed its pipe
                if last_saved != step:  # the window in progress is saved as it is: the history stays the same
                    save_checkpoint(path, model, sampler, step, history, clock, meta, pending)
                raise TrainingInterrupted(step, path, stop.signum)
            bar.update(1)
        if stop.signum is not None:  # it came after the last step's check: that step is saved already
            raise TrainingInterrupted(steps, path, stop.signum)
    finally:
        stop.restore()
        with suppress(OSError):  # a closed pipe (`| tail`, a dead terminal) must not hide the interrupt
            bar.close()
        if graph is not None and graph.captured_at is not None:
            model.graph_captured_at = start + graph.captured_at + 1
    model.eval()
    return history


def capped_steps(steps: int) -> tuple[int, int | None]:
    """``steps`` cut to ``GENLIB_MAX_STEPS`` (:func:`genlib.runtime.max_steps`), with a warning, and the cap where
    it cut them (else None)."""
    cap = runtime.max_steps()
    if cap is None or steps <= cap:
        return steps, None
    warnings.warn(f"GENLIB_MAX_STEPS={cap} cuts this run from {steps} steps to {cap}", stacklevel=3)
    return cap, cap


def checkpoint_path(run_dir: str | Path | None, sampler: Iterator[Batch]) -> Path | None:
    """Where :func:`fit` keeps its checkpoint (None without ``run_dir``), ``run_dir`` made. A TypeError now, not
    at the first checkpoint after hours of training, for a sampler that cannot save its place."""
    if run_dir is None:
        return None
    if not all(hasattr(sampler, name) for name in ("state_dict", "load_state_dict")):
        raise TypeError(f"checkpoints need a sampler with state_dict() and load_state_dict() (a "
                        f"genlib.data.BatchSampler), so that a resumed run draws the batches it would have drawn; "
                        f"got a {type(sampler).__name__}: use one, or train without run_dir")
    return runtime.make_folder(Path(run_dir), "run_dir") / CHECKPOINT


def settle_ema(model: GenerativeModel, ema_decay: float | None) -> None:
    """The average :func:`fit` trains ``model`` with: ``ema_decay`` 0 drops any (from a checkpoint or an earlier
    call); a decay given wins over the checkpoint's or an earlier call's; None keeps a resumed checkpoint's
    average, or its refusal of one, and otherwise attaches the device's default (:func:`default_ema_decay`)."""
    if ema_decay == 0.0:
        model.ema, model.ema_decay = None, 0.0  # saved as 0.0: a resume with the default keeps none either
    elif ema_decay and model.ema is None:
        model.attach_ema(ema_decay)
    elif ema_decay:
        model.ema_decay = ema_decay
    elif model.ema is None and model.ema_decay != 0.0 and model.ema_source() is not None:
        default = default_ema_decay(model.device)
        if default:
            model.attach_ema(default)


def default_ema_decay(device: torch.device) -> float | None:
    """The EMA decay :func:`fit` keeps when not told: 0.999 on CUDA, where runs are long, none on the CPU."""
    return 0.999 if device.type == "cuda" else None


class _DeferredStop:
    """While enabled (and on the main thread), a first SIGINT or SIGTERM is only noted in ``signum``, so that
    :func:`fit` can finish its step and save it; a second SIGINT raises KeyboardInterrupt at once.
    :meth:`restore` puts the previous handlers back."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool):
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}
        if enabled and threading.current_thread() is threading.main_thread():
            # an ignored signal (a shell's `cmd &` ignores SIGINT) stays ignored
            self.previous = {signum: signal.signal(signum, self.note) for signum in self.SIGNALS
                             if signal.getsignal(signum) is not signal.SIG_IGN}

    def note(self, signum: int, frame: Any) -> None:
        """The handler: remember the first signal, give up waiting on a second Ctrl-C."""
        if self.signum is not None and signum == signal.SIGINT:
            self.restore()
            raise KeyboardInterrupt
        self.signum = self.signum or signum
        with suppress(OSError):
            print(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
                  "(Ctrl-C again stops at once, unsaved)", file=sys.stderr, flush=True)

    def restore(self) -> None:
        """Put back the handlers that were there before."""
        for signum, handler in self.previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        self.previous = {}


def _progress_bar(start: int, steps: int, desc: str, enabled: bool) -> tqdm.tqdm:
    """A tqdm bar (notebook-aware) positioned at ``start`` of ``steps``."""
    from tqdm.auto import tqdm

    return tqdm(total=steps, initial=start, desc=desc, disable=not enabled, dynamic_ncols=True, mininterval=0.5)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration (batch-norm statistics untouched), then the mode the model had:
    for callbacks that look at a model in the middle of :func:`fit`."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@dataclass
class SnapshotRecorder:
    """A :func:`fit` callback for 2-D models: every call stores the samples of fixed codes ``z`` and a
    scalar field (a critic's energy, a discriminator's output) on a fixed grid, for replay widgets.

    Pass ``callback=recorder, callback_every=recorder.every`` to :func:`fit`. Lists ``steps`` [T],
    ``fakes`` (each [n, 2], the model's ``sampling_net()`` applied to ``z``) and ``fields`` (each
    [resolution, resolution], rows along y as in ``genlib.viz.grid_points``) grow together. Fixed codes
    let the reader follow each fake. Recording runs in eval mode and draws no random numbers, so it does
    not change the run.
    """

    every: int
    z: torch.Tensor
    points: torch.Tensor
    lim: float
    resolution: int
    field_fn: Callable[[GenerativeModel, torch.Tensor], torch.Tensor] = field(repr=False)
    steps: list[int] = field(default_factory=list)
    fakes: list[torch.Tensor] = field(default_factory=list)
    fields: list[torch.Tensor] = field(default_factory=list)

    @torch.no_grad()
    def __call__(self, step: int, model: GenerativeModel) -> None:
        dev = model.device
        with evaluating(model):  # as sample() after fit sees it
            self.steps.append(step)
            self.fakes.append(model.sampling_net()(self.z.to(dev)).float().cpu())
            values = self.field_fn(model, self.points.to(dev)).float().cpu()
            self.fields.append(values.reshape(self.resolution, self.resolution))


def snapshot_recorder(model: GenerativeModel, field_fn: Callable[[GenerativeModel, torch.Tensor], torch.Tensor],
                      every: int = 50, lim: float = 3.0, resolution: int = 64, n_fakes: int = 512,
                      seed: int = 0) -> SnapshotRecorder:
    """A :class:`SnapshotRecorder` for ``model`` (codes of size ``model.z_dim``, drawn with ``seed``) and
    ``field_fn(model, points [m, 2]) -> [m]`` on a ``resolution`` x ``resolution`` grid over [-lim, lim]^2;
    step 0 is recorded at once."""
    z = torch.randn(n_fakes, model.z_dim, generator=torch.Generator().manual_seed(seed))
    axis = torch.linspace(-lim, lim, resolution)
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    recorder = SnapshotRecorder(every, z, torch.stack([xs.ravel(), ys.ravel()], 1), lim, resolution, field_fn)
    recorder(0, model)
    return recorder
