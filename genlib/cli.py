"""Command line: ``python -m genlib {prepare,train,evaluate,compare,classifier,bench} ...``.

``train`` runs any registered family on any dataset at any scale through the one loop
(:func:`genlib.train.fit`) and records the run (provenance, metrics, a sample grid) so the
book can show it; ``evaluate`` scores such a run's checkpoint again with some options replaced.
Families register a builder in :data:`FAMILIES` as their chapters land.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import inspect
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from genlib.data import BatchSampler
    from genlib.train import GenerativeModel

# family name -> "module:function"; the function takes a TrainSpec and returns a GenerativeModel.
FAMILIES: dict[str, str] = {
    "imle": "genlib.imle:build_imle",
    "glo": "genlib.imle:build_glo",
    "glann": "genlib.imle:build_glann",
    "realnvp": "genlib.flows:build_realnvp",
    "autoregressive": "genlib.flows:build_autoregressive",
    "autoencoder": "genlib.flows:build_autoencoder",
    "vae": "genlib.flows:build_vae",
    "dae": "genlib.dae:build_dae",
    "dde": "genlib.dae:build_dde",
    "score": "genlib.dae:build_score",
    "energy": "genlib.energy:build_energy",
    "gan": "genlib.gan:build_gan",
}
FLAG_FIELDS = ("z_dim", "width", "lr", "batch_size")
"""TrainSpec fields that ``train``'s own flags set: an ``--opt`` of the same name is refused, not silently preferred."""
TOYS = ("ring8", "grid25", "moons", "swissroll", "checkerboard", "rings")
IMAGE_SETS = ("digits", "fashion-mnist", "mnist", "cifar10", "celeba64", "folder")
SPLIT_SETS = ("fashion-mnist", "mnist", "cifar10", "celeba64")  # the image sets with a test split
DATA_FLAGS: dict[str, tuple[tuple[str, ...], int]] = {"resolution": (("folder",), 64), "toy_points": (TOYS, 50_000)}
"""Data flags (``train`` field -> (the ``--data`` they apply to, default)): elsewhere they do nothing, so they
neither define a run there nor pass without a warning."""


@dataclass
class TrainSpec:
    """What a family builder needs: the training data, its shape, the device and the options."""

    data: torch.Tensor          # the whole training set on ``device`` (uint8 images or float toys)
    shape: tuple[int, ...]      # shape of one sample, e.g. (1, 28, 28) or (2,)
    device: torch.device
    z_dim: int = 64
    width: int = 64
    lr: float = 2e-4
    batch_size: int = 64
    options: dict[str, str] = field(default_factory=dict)
    # bookkeeping of build_family, not part of the spec: options a builder has read (the rest are typos), and the
    # fields of FLAG_FIELDS it has read
    used: set[str] = field(default_factory=set, init=False, repr=False, compare=False)
    read: set[str] = field(default_factory=set, init=False, repr=False, compare=False)

    def __getattribute__(self, name: str) -> Any:
        # a builder reads the flags' values as plain attributes: noting which it read names the flags it ignores
        if name in FLAG_FIELDS:
            object.__getattribute__(self, "read").add(name)
        return object.__getattribute__(self, name)

    def ignored_flags(self) -> dict[str, Any]:
        """``{field: value}`` of the model flags (``--z-dim``, ``--width``, ``--lr``) set away from their defaults
        that the builder never read (``--batch-size`` always counts: the sampler reads it)."""
        defaults = {spec_field.name: spec_field.default for spec_field in fields(self)}
        return {name: vars(self)[name] for name in FLAG_FIELDS
                if name != "batch_size" and name not in self.read and vars(self)[name] != defaults[name]}

    def option(self, name: str, default: Any) -> Any:
        """The ``--opt name=value`` option converted to the type of ``default``, else ``default``."""
        if name not in self.options:
            return default
        self.used.add(name)
        try:
            return option_value(self.options[name], default)
        except ValueError as error:
            kind = "number" if default is None else type(default).__name__
            raise ValueError(f"--opt {name}={self.options[name]!r} is not a valid {kind}: {error}") from None

    def construct(self, cls: type, skip: tuple[str, ...] = (), **fixed: Any) -> Any:
        """``cls(**fixed, **options)``: every ``--opt`` not in ``skip`` must be a keyword argument of ``cls``
        (or of the classes it passes ``**kw`` on to) and is converted to the type of its default. ``skip``: the
        options the builder reads itself: its own (GAN's ``variant``), or ones it keeps from ``cls`` (refused)."""
        defaults = constructor_defaults(cls)
        kwargs = dict(fixed)
        for name in self.options:
            if name in skip:
                continue
            if name not in defaults or name == "shape":
                # the flags' fields are set by the flags; a skipped name is known unless the builder keeps it from cls
                known = sorted((set(defaults) ^ set(skip)) - {"shape", *FLAG_FIELDS})
                raise ValueError(f"unknown option {name!r} for {cls.__name__}; known: {', '.join(known)}")
            if name in FLAG_FIELDS:
                raise ValueError(f"--opt {name} would override the flag --{name.replace('_', '-')}: use the flag")
            kwargs[name] = self.option(name, defaults[name])
        return cls(**kwargs)


BOOLEAN_SPELLINGS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
"""What :func:`option_value` reads as a boolean (in any case)."""


def option_value(text: str, default: Any) -> Any:
    """An ``--opt`` string converted to the type of ``default``: bools from 1/0, true/false, yes/no; tuples
    from comma-separated floats, as many as the default has (``betas=0.5,0.9``); a ``None`` default takes a float."""
    if isinstance(default, tuple):
        values = tuple(float(v) for v in text.split(","))
        if len(values) != len(default):
            raise ValueError(f"expected {len(default)} comma-separated numbers, got {text!r}")
        return values
    if isinstance(default, bool):
        if text.lower() not in BOOLEAN_SPELLINGS:
            raise ValueError(f"expected a boolean, got {text!r}")
        return BOOLEAN_SPELLINGS[text.lower()]
    return float(text) if default is None else type(default)(text)


def constructor_defaults(cls: type) -> dict[str, Any]:
    """Keyword arguments (name -> default) of ``cls.__init__`` and of the genlib base classes' ``__init__``s
    (subclasses pass ``**kw`` on to them); a subclass's default wins."""
    defaults: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if klass.__module__.startswith("genlib") and "__init__" in vars(klass):
            for name, param in inspect.signature(klass.__init__).parameters.items():
                if param.default is not inspect.Parameter.empty:
                    defaults[name] = param.default
    return defaults


def parse_options(pairs: list[str]) -> dict[str, str]:
    """``['a=1', 'b=x']`` -> ``{'a': '1', 'b': 'x'}`` with a clear error for malformed pairs."""
    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"error: --opt expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        options[key.strip()] = value.strip()
    return options


def load_training_data(name: str, root: str | None, resolution: int, n_toy: int, seed: int) -> torch.Tensor:
    """Dataset ``name`` as a tensor (uint8 images N x C x H x W, or float toy points N x 2)."""
    from genlib import data

    if name in TOYS:
        return data.toy_dataset(name, n_toy, seed)
    if name == "folder":
        return data.load_images(name, root=root, resolution=resolution).images
    return data.load_images(name, root=root).images


def load_held_out(name: str, root: str | None, n_toy: int, seed: int) -> torch.Tensor | None:
    """Data the model never trained on: the test split, fresh toy points, or None (no split exists)."""
    from genlib import data

    if name in TOYS:
        return data.toy_dataset(name, n_toy, seed + 1)
    if name in SPLIT_SETS:
        return data.load_images(name, split="test", root=root).images
    return None


def held_out_for(model: GenerativeModel, config: dict) -> torch.Tensor | None:
    """The held-out data of a run's dataset when ``model`` has a likelihood (``evaluate``); else None, unread."""
    if not hasattr(model, "evaluate"):
        return None
    return load_held_out(config["data"], config["root"], config["toy_points"], config["seed"])


def build_family(name: str, spec: TrainSpec, warn_ignored: bool = False) -> GenerativeModel:
    """Import and call the builder registered for family ``name``; an ``--opt`` it did not read is an error, and with
    ``warn_ignored`` (``train``, whose user set the flags) a flag it did not read is named in a warning."""
    module_name, function = FAMILIES[name].split(":")
    spec.read.clear()  # reads before the builder's (a repr, say) say nothing of what the family uses
    model = getattr(importlib.import_module(module_name), function)(spec)
    unread = sorted(set(spec.options) - spec.used)
    if unread:
        data = f"images {spec.shape}" if len(spec.shape) == 3 else f"vectors {spec.shape}"  # an option may be for one
        raise ValueError(f"unknown option(s) {', '.join(unread)} for family {name!r} on {data} (the options, some "
                         f"for images only or vectors only, are listed in the docstring of {module_name}.{function})")
    for flag, value in (spec.ignored_flags() if warn_ignored else {}).items():
        print(f"warning: family {name!r} does not use --{flag.replace('_', '-')} (set to {value}); it has no effect",
              file=sys.stderr, flush=True)
    return model


def build_run(config: dict, options: dict[str, str], dev: torch.device,
              warn_ignored: bool = False) -> tuple[torch.Tensor, BatchSampler, GenerativeModel]:
    """(dataset, sampler, model) of a ``train`` run from its config (``vars(args)`` or a run.json's config);
    ``warn_ignored``: see :func:`build_family`."""
    from genlib import data as gdata

    dataset = load_training_data(config["data"], config["root"], config["resolution"], config["toy_points"],
                                 config["seed"])
    sampler = gdata.BatchSampler(dataset, config["batch_size"], dev, seed=config["seed"])
    spec = TrainSpec(sampler.data, tuple(dataset.shape[1:]), dev, config["z_dim"], config["width"], config["lr"],
                     config["batch_size"], options)
    return dataset, sampler, build_family(config["family"], spec, warn_ignored).to(dev)


RUN_DEFINING = ("family", "data", "resolution", "toy_points", "batch_size", "z_dim", "width", "lr", "seed", "opt")
"""``train``'s arguments that define a run: resuming a checkpoint, or recording into a folder, made with others
is refused (``--steps`` may grow; evaluation, logging, the device and the data's ``--root`` may change)."""


def run_arguments(config: dict, keys: Sequence[str] = RUN_DEFINING) -> dict:
    """The ``keys`` arguments (default :data:`RUN_DEFINING`) of a config (``vars(args)`` or a run.json's), ``--opt``
    as a dict so that its order does not matter, its values in :func:`canonical_option` form so that their spelling
    does not."""
    return {key: canonical_argument(config, key) for key in keys}


def canonical_argument(config: dict, key: str) -> Any:
    """``config[key]`` (None if absent) as compared between runs: ``--opt`` (key=value pairs, or a checkpoint's
    dict of values in any spelling) a dict of :func:`canonical_option` values; a :data:`DATA_FLAGS` flag that
    ``config``'s data does not use, its default (its value changes nothing there); evaluate's ``source_run`` an
    absolute path (``t1``, ``t1/`` and its absolute path name one run)."""
    value = config.get(key)
    if key == "opt":  # a list of key=value pairs, or a checkpoint's meta: a dict, older ones in other spellings
        options = value if isinstance(value, dict) else parse_options(value or [])
        return {name: canonical_option(option) if isinstance(option, str) else option
                for name, option in options.items()}
    if key in DATA_FLAGS:
        datasets, default = DATA_FLAGS[key]
        return value if config.get("data") in datasets else default
    return _absolute(value) if key == "source_run" and value else value


def warn_unused_data_flags(args: argparse.Namespace) -> None:
    """A warning for each :data:`DATA_FLAGS` flag set away from its default that ``--data`` does not use."""
    for name, (datasets, default) in DATA_FLAGS.items():
        value = getattr(args, name, default)
        if value != default and args.data not in datasets:
            print(f"warning: --data {args.data} does not use --{name.replace('_', '-')} (set to {value}); "
                  "it has no effect", file=sys.stderr, flush=True)


def canonical_option(value: str) -> float | str | tuple:
    """An ``--opt`` value in a form whose equality means the same setting to every option type of
    :func:`option_value`: a finite number as a float (1e-2 == 0.01; nan stays text, since nan != nan), a boolean
    spelling as 1.0 or 0.0 (true == YES == 1), a comma list item by item (0.5,0.9 == 0.5, 0.9); other text as
    written."""
    if "," in value:
        return tuple(canonical_option(item.strip()) for item in value.split(","))
    if value.lower() in BOOLEAN_SPELLINGS:
        return float(BOOLEAN_SPELLINGS[value.lower()])
    try:
        number = float(value)
    except ValueError:
        return value
    return number if math.isfinite(number) else value


PARTIAL = "partial.pt"
"""The file in which ``compare`` keeps its finished runs until the comparison is recorded."""


def check_out(out: Path, command: str, arguments: dict | None = None) -> None:
    """Make the ``--out`` folder (:func:`genlib.runtime.make_folder`), and refuse one that holds another command's
    record, another command's work in progress (a train run's checkpoint, an unfinished comparison's
    :data:`PARTIAL`), or the record of a ``train``/``compare``/``evaluate`` run with other ``arguments`` (compared
    in :func:`run_arguments` form): writing there would overwrite or mix up a recorded run."""
    from genlib.results import read_json
    from genlib.runtime import make_folder
    from genlib.train import CHECKPOINT, differences

    make_folder(out, "--out")
    for name, owner, what in ((CHECKPOINT, "train", "a training checkpoint"), (PARTIAL, "compare",
                                                                             "an unfinished comparison")):
        if command != owner and (out / name).exists():
            raise ValueError(f"{out} holds {what} ({name}); use another --out")
    record = out / "run.json"
    if not record.is_file():
        return
    run = read_json(record)
    config = run.get("config", {})
    if config.get("command") != command:
        raise ValueError(f"{out} holds the record of another command ({run.get('command')}); use another --out")
    if arguments is not None:
        # a key the record lacks is an argument added since it was made (compare's --family): not a difference
        compared = [key for key in arguments if key != "out" and key in config]
        found = differences(run_arguments(config, compared), {key: arguments[key] for key in compared})
        if found:
            raise ValueError(f"{out} holds the record of another run ({found}); use another --out")


def check_resume(out: Path, arguments: dict, ema: float | None) -> dict:
    """The meta that :func:`genlib.train.fit` is to compare the checkpoint in ``out`` with: the checkpoint's own
    where it names this run (``arguments``) in an older spelling (a data flag its data does not use, an ``--opt``
    value as written), so that a run saved before the canonical forms still resumes; else ``arguments``. Refuses
    an explicit ``--ema`` the checkpoint was not trained with: resuming keeps the checkpoint's average (or its
    absence), so another decay would be recorded for a run that did not have it."""
    from genlib.train import CHECKPOINT, read_checkpoint, saved_ema_decay

    if not (out / CHECKPOINT).exists():
        return arguments
    # mmap: only small entries are read here; fit loads the whole checkpoint once, to resume
    state = read_checkpoint(out / CHECKPOINT, mmap=True)
    saved = saved_ema_decay(state) or 0.0
    if ema is not None and saved != ema:
        raise ValueError(f"{out / CHECKPOINT} was trained with --ema {saved:g}; resume it with --ema {saved:g} "
                         "or without --ema")
    meta = state.get("meta")
    return meta if meta is not None and run_arguments(meta) == arguments else arguments


def cmd_train(args: argparse.Namespace) -> None:
    """Train a family, checkpointing into ``--out`` and recording the run there."""
    from genlib import runtime, train, viz
    from genlib.evaluate import evaluate_model
    from genlib.features import check_inception_weights
    from genlib.results import provenance, record_run

    if args.eval_samples == 1:
        raise SystemExit("error: --eval-samples must be 0 (no metrics) or at least 2")
    if args.root:
        args.root = _absolute(args.root)
    out, arguments = Path(args.out), run_arguments(vars(args))
    check_out(out, "train", arguments)
    meta = check_resume(out, arguments, args.ema)
    warn_unused_data_flags(args)
    if args.eval_samples and args.data not in TOYS:
        check_inception_weights()  # now, not after hours of training
    dev = runtime.device(args.device)
    origin = provenance(dev)  # the commit and date this process started from, not those at its end
    runtime.use_fast_matmul(dev)
    runtime.seed_everything(args.seed)
    run_line = runtime.describe(args.seed, dev, show_scale=False)
    print(run_line, flush=True)
    dataset, sampler, model = build_run(vars(args), parse_options(args.opt), dev, warn_ignored=True)
    if args.steps <= getattr(model, "glo_steps", 0):
        print(f"warning: all {args.steps} steps are GLO steps (glo_steps={model.glo_steps}); the latent IMLE stage "
              "will not run, so this run is GLO alone", file=sys.stderr, flush=True)
    # A run resumed from a checkpoint (an earlier process killed at a lease's end, say) reports the training
    # time of every process that trained it: the clock goes on from the checkpoint's.
    clock = train.TrainClock()
    history = train.fit(model, sampler, args.steps, run_dir=out, checkpoint_every=args.checkpoint_every,
                        log_every=args.log_every, desc=f"{args.family}/{args.data}",
                        callback=sample_grid_writer(out) if len(dataset.shape) == 4 else None,
                        callback_every=args.sample_every, clock=clock, ema_decay=args.ema,
                        meta=meta)
    trained = clock.now()
    wall = trained["seconds"]
    # a resumed run: origin is this last process's; its earlier processes' devices come from the checkpoint
    origin["train_processes"], origin["train_devices"] = trained["processes"], trained["devices"]
    origin["ema_decay"] = sampling_ema_decay(model)  # what sampled, whatever the flags
    if model.graph_captured_at is not None:  # GENLIB_CUDA_GRAPH=1 (see genlib.train.StepGraph)
        origin["cuda_graph_from_step"] = model.graph_captured_at
        print(f"steps from {model.graph_captured_at} on were replayed as a CUDA graph", flush=True)
    # the last logged value of each loss (a staged model's earlier losses are NaN at the end)
    metrics = {"final_" + k: next(x for x in reversed(v) if not math.isnan(x)) for k, v in history.items()
               if k != "step" and any(not math.isnan(x) for x in v)}
    if len(dataset.shape) == 4:
        viz.save_image_grid(model.sample(64).float().cpu(), out / "samples.png")
    elif dataset.shape[1] == 2:
        viz.save_scatter(model.sample(2000).float().cpu(), dataset[:2000].cpu(), out / "samples.png")
    if args.eval_samples:
        print(f"evaluating on {args.eval_samples} samples ...", flush=True)
        metrics.update(evaluate_model(model, args.data, dataset, args.eval_samples, held_out_for(model, vars(args)),
                                      args.seed, progress=True))
    summary = "  ".join(f"{k}={_short(v)}" for k, v in metrics.items())
    print(summary)
    write_log(out / "train.log", run_line, history, summary)
    config = {k: v for k, v in vars(args).items() if k != "func"}
    record_run(out, device=dev, config=config, metrics=metrics, wall_time_s=wall, origin=origin)
    print(f"recorded run in {out} ({wall:.0f} s)")


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Score the checkpoint of a recorded ``train`` run again, with some options replaced (e.g. the sampler's)."""
    from genlib import runtime, train
    from genlib.evaluate import evaluate_model
    from genlib.features import check_inception_weights
    from genlib.results import load_run, provenance, record_run

    if args.eval_samples < 2:
        raise SystemExit("error: --eval-samples must be at least 2")
    out, run = Path(args.out), Path(args.run)
    arguments = {"source_run": str(run), "opt": args.opt, "seed": args.seed, "eval_samples": args.eval_samples}
    # refuses the run folder itself too (it holds a train record), and another evaluation's folder
    check_out(out, "evaluate", run_arguments(arguments, tuple(arguments)))
    checkpoint = run / train.CHECKPOINT
    if checkpoint.is_file() and not (run / "run.json").is_file():
        raise unfinished_run(run, f"{train.CHECKPOINT} but no run.json")
    source = load_run(run)
    if source.run["config"].get("command") != "train" or not checkpoint.is_file():
        raise FileNotFoundError(f"{args.run} is not a `genlib train` run with its {train.CHECKPOINT} "
                                "(checkpoints are not committed: rerun the run's command to make one)")
    config = source.run["config"] | ({"root": _absolute(args.root)} if args.root else {})
    if config["data"] not in TOYS:
        check_inception_weights()  # now, not after sampling
    options = parse_options(config["opt"]) | parse_options(args.opt)
    dev = runtime.device(args.device)
    origin = provenance(dev)
    runtime.use_fast_matmul(dev)
    dataset, _, model = build_run(config, options, dev)
    state = train.read_checkpoint(checkpoint, dev)
    if state["step"] != config["steps"]:  # a rerun with more --steps was stopped: the record is of fewer
        raise unfinished_run(run, f"its checkpoint is at step {state['step']}, its record at {config['steps']}")
    try:
        model.load_checkpoint_state(state)
    except (RuntimeError, ValueError) as error:  # an option changed the architecture
        changed = " ".join(f"--opt {option}" for option in args.opt) or "the code, since the run was recorded,"
        first_line = str(error).strip().splitlines()[0].rstrip(":")  # torch lists every mismatched tensor
        raise ValueError(f"{changed} changes the architecture of the recorded run: its checkpoint does not fit "
                         f"the model ({first_line})") from None
    model.eval()
    runtime.seed_everything(args.seed)
    print(f"{args.run}: step {state['step']} | {runtime.describe(args.seed, dev, show_scale=False)}", flush=True)
    began = time.perf_counter()
    (out / "samples.png").unlink(missing_ok=True)  # a grid of an earlier evaluation must not stay beside these
    metrics = evaluate_model(model, config["data"], dataset, args.eval_samples, held_out_for(model, config), args.seed,
                             grid_to=out / "samples.png", progress=True)
    wall = time.perf_counter() - began
    print("  ".join(f"{k}={_short(v)}" for k, v in metrics.items()))
    record = {"command": "evaluate", **arguments, "source_command": source.command,
              "source_commit": source.run["git_commit"], "checkpoint_step": state["step"]} | (
              {"root": config["root"]} if args.root else {})
    origin["ema_decay"] = sampling_ema_decay(model)  # where train's run.json has it
    record_run(out, device=dev, config=record, metrics=metrics, wall_time_s=wall, origin=origin)
    print(f"recorded evaluation in {out} ({wall:.0f} s)")


def unfinished_run(run: Path, why: str) -> ValueError:
    """The error for evaluating a run whose training has not finished (``why``: what shows it)."""
    return ValueError(f"{run} holds an unfinished run ({why}): rerun its train command to finish it, then evaluate it")


def sampling_ema_decay(model: GenerativeModel) -> float | None:
    """The decay of the weight average that draws ``model``'s samples, None when its own weights do."""
    return model.ema_decay if model.ema is not None else None


def _absolute(path: str) -> str:
    """A path as an absolute one (a data ``--root``, a run folder): a record read from another folder still finds
    it."""
    return str(Path(path).expanduser().resolve())


def cmd_compare(args: argparse.Namespace) -> None:
    """Train GAN variants (``--family gan``) or energy-GAN settings (``--family energy``) x seeds on
    Gaussian-mixture toys and record the mode-coverage table.

    Each finished run is saved at once in ``OUT/partial.pt`` (:data:`PARTIAL`); a rerun with the same ``--out``
    skips the runs already there, so a crash loses at most the runs in progress. ``--jobs N`` trains N runs at once
    in separate processes (one thread each); every run is seeded by itself, so the rows do not depend on N.
    run.json's ``wall_time_s`` is the runs' training time added up: with N jobs the clock ran about 1/N of it."""
    from genlib import data as gdata
    from genlib import energy, results, train, viz

    if args.setting is None:
        args.setting = "collapse" if args.family == "gan" else next(iter(energy.TOY_TABLES))
    known, batch_size, setting, toy_runs = _comparison(args)
    methods = list(known) if args.methods == "all" else split_names(args.methods, known)
    toys = {name: gdata.toy(name) for name in args.toys.split(",")}
    not_mixtures = [name for name, toy in toys.items() if toy.modes is None]
    if not_mixtures:
        raise ValueError(f"toy(s) {', '.join(not_mixtures)} have no modes to cover; use ring8 or grid25")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    out = Path(args.out)
    partial = out / PARTIAL
    arguments = {k: v for k, v in vars(args).items() if k not in ("func", "jobs")}  # jobs cannot change a row
    check_out(out, "compare", arguments)
    if (out / "run.json").is_file() and not partial.exists():  # check_out found this very comparison there
        print(f"{out} already holds this comparison, recorded: nothing to rerun (use another --out for a new one)")
        return
    state = torch.load(partial, weights_only=False) if partial.exists() else {
        "origin": results.provenance("cpu"), "arguments": arguments, "rows": [], "samples": {}}
    # the recorded command must be the one that made every run; the folder's spelling does not count
    found = train.differences(*({k: v for k, v in made.items() if k != "out"}
                                for made in (state["arguments"], arguments)))
    if found:
        raise ValueError(f"{partial} holds runs of another comparison ({found}; made by "
                         f"{state['origin']['command']}); rerun that command to finish it, or use another --out")
    order = [(toy_name, method, seed) for toy_name in toys for method in methods for seed in seeds]
    done = {(row["toy"], row["method"], row["seed"]) for row in state["rows"]}
    for toy_name in toys:
        todo = [(method, seed) for method in methods for seed in seeds if (toy_name, method, seed) not in done]
        if todo and args.jobs > 1:  # the runs' bars are off on several processes: say what is under way
            print(f"{toy_name}: training {len(todo)} runs on {min(args.jobs, len(todo))} processes (a line as each "
                  "finishes)", flush=True)
        for _, row in toy_runs(todo, toy_name):
            samples = row.pop("samples")  # None for a run that diverged
            if samples is not None:
                state["samples"][toy_name, row["method"], row["seed"]] = samples
            state["rows"].append({"toy": toy_name, **row})
            train.save_atomic(state, partial)
            print(f"[{len(state['rows'])}/{len(order)}] {toy_name} {row['method']} seed {row['seed']}: "
                  f"{row['modes']} of {row['total_modes']} modes, hq {row['hq']:.3f} ({row['seconds']:.0f} s)",
                  flush=True)
    by_run = {(row["toy"], row["method"], row["seed"]): row for row in state["rows"]}
    rows = [by_run[run] for run in order]
    columns = dict(energy.STABILITY_COLUMNS) if args.family == "energy" else {}  # the critic's stability
    summary = {toy_name: results.summarize_coverage([row for row in rows if row["toy"] == toy_name], "method",
                                                    means=("hq", "seconds", "cpu_seconds", *columns),
                                                    sums=("diverged",))
               for toy_name in toys}
    report = "\n\n".join(f"{toy_name}\n{results.coverage_table(table, timing='cpu_seconds', columns=columns)}"
                         for toy_name, table in summary.items())
    print(report)
    viz.save_scatter_panels([(*first_samples(state["samples"], toy_name, method, seeds), toys[toy_name].modes,
                              viz.view_half_width(toys[toy_name].modes)) for toy_name in toys for method in methods],
                            out / "samples.png",
                            title="each method's first seed that did not diverge: samples (blue) and the modes (red)")
    (out / "train.log").write_text(f"setting {args.setting}: batch {batch_size}, {setting}\n\n{report}\n")
    config = arguments | {"batch_size": batch_size, "overrides": setting, "jobs": args.jobs}
    results.record_run(out, device="cpu", config=config, metrics={"rows": rows, "summary": summary},
                       wall_time_s=sum(row["seconds"] for row in rows), origin=state["origin"])
    partial.unlink()
    print(f"recorded comparison in {out}")


def first_samples(samples: dict, toy_name: str, method: str, seeds: list[int]) -> tuple[str, torch.Tensor]:
    """(panel title, samples [n, 2]) of ``method``'s first seed on ``toy_name`` that did not diverge; no samples,
    and a title that says so, where every seed diverged."""
    seed = next((seed for seed in seeds if (toy_name, method, seed) in samples), None)
    if seed is None:
        return f"{toy_name}: {method} (diverged on every seed)", torch.empty(0, 2)
    return f"{toy_name}: {method} (seed {seed})", samples[toy_name, method, seed]


def split_names(spec: str, known: list[str]) -> list[str]:
    """The comma-separated names in ``spec``, read as the longest known name at each point (some of the energy
    tables' names hold a comma, e.g. 'R1 (zero-centred, reals)'); an unknown name is a clear error."""
    names, rest = [], spec
    while rest:
        name = next((name for name in sorted(known, key=len, reverse=True)
                     if rest == name or rest.startswith(name + ",")), None)
        if name is None:
            raise ValueError(f"unknown method {rest.split(',')[0]!r}; known: {', '.join(known)}")
        if name in names:
            raise ValueError(f"method {name!r} is named twice: each would count twice in the summary")
        names.append(name)
        rest = rest[len(name) + 1:]
    return names


def _comparison(args: argparse.Namespace) -> tuple[list[str], int, dict, Callable]:
    """For ``compare``'s family and setting: the method names, the batch size, the setting's overrides, and
    ``toy_runs(todo, toy_name)`` yielding ``(i, row)`` per (method, seed) of ``todo``, each row naming its method
    under ``'method'`` and keeping its samples."""
    from genlib import energy, gan

    if args.family == "gan":
        if args.setting not in gan.TOY_SETTINGS:
            raise ValueError(f"--setting {args.setting!r} is not a GAN setting; known: {', '.join(gan.TOY_SETTINGS)}")
        if args.toy_std is not None:
            raise ValueError("--toy-std is for --family energy (the GAN tables use each toy's own std)")
        batch_size, setting = gan.TOY_SETTINGS[args.setting]
        return list(gan.TOY_METHODS), batch_size, setting, lambda todo, toy_name: gan.toy_runs(
            todo, toy_name, args.steps, batch_size, progress=True, keep_samples=True, workers=args.jobs, **setting)
    if args.setting not in energy.TOY_TABLES:
        raise ValueError(f"--setting {args.setting!r} is not an energy table; known: {', '.join(energy.TOY_TABLES)}")
    table, batch_size = energy.TOY_TABLES[args.setting], energy.TOY_BATCH_SIZE

    def toy_runs(todo: list[tuple[str, int]], toy_name: str) -> Iterator[tuple[int, dict]]:
        for i, row in energy.toy_runs(todo, toy_name, args.steps, batch_size, table, toy_std=args.toy_std,
                                      progress=True, keep_samples=True, workers=args.jobs):
            yield i, {"method": row.pop("setting"), **row}

    return list(table), batch_size, dict(energy.TOY_DEFAULTS), toy_runs


def sample_grid_writer(out: Path) -> Callable[[int, GenerativeModel], None]:
    """A ``fit`` callback saving an 8x8 grid of samples as ``out/progress/step_NNNNNNN.png``.

    It samples in eval mode under a forked RNG, so watching a run does not change it."""
    from genlib import train, viz

    def write(step: int, model: GenerativeModel) -> None:
        (out / "progress").mkdir(parents=True, exist_ok=True)
        cuda = [model.device] if model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), train.evaluating(model):
            samples = model.sample(64).float().cpu()
        viz.save_image_grid(samples, out / "progress" / f"step_{step:07d}.png")

    return write


def write_log(path: Path, header: str, history: dict, summary: str) -> None:
    """A plain-text record of a run: the set-up line, the logged losses per step, the final metrics."""
    keys = [k for k in history if k != "step"]
    lines = [header, "step " + " ".join(f"{k:>12s}" for k in keys)]
    for i, step in enumerate(history.get("step", [])):
        lines.append(f"{step:>4d} " + " ".join(" " * 12 if math.isnan(history[k][i]) else f"{history[k][i]:12.4g}"
                                               for k in keys))
    lines.append(summary)
    path.write_text("\n".join(lines) + "\n")


def _short(value: float | int | str) -> str:
    """A metric value for the console: 4 significant digits for floats."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def cmd_prepare(args: argparse.Namespace) -> None:
    """Decode a dataset once into its uint8 cache and report its size."""
    from genlib import data

    warn_unused_data_flags(args)
    kwargs = {"resolution": args.resolution} if args.data == "folder" else {}
    images = data.load_images(args.data, split=args.split, root=args.root, **kwargs).images
    print(f"{args.data}: {tuple(images.shape)} uint8, {images.numel() / 2**20:.1f} MiB")


def cmd_classifier(args: argparse.Namespace) -> None:
    """Train the Fashion-MNIST feature classifier used by the metrics and save it as an asset."""
    from genlib import features
    from genlib.runtime import make_folder

    if args.out:
        make_folder(args.out, "--out")  # now, not after training
    features.main_train_classifier(out_dir=args.out, epochs=args.epochs, seed=args.seed)


def cmd_bench(args: argparse.Namespace) -> None:
    """Run the benchmarks on the chosen device and write a JSON plus a table."""
    from genlib import bench

    bench.main(device=args.device, out=args.out, quick=args.quick, nn_sizes=args.nn_size or None,
               batch_size=args.batch_size, repeats=args.repeats)


def _search_size(text: str) -> tuple[int, int, int]:
    """argparse type of ``bench --nn-size``: ``MxNxD`` -> (M, N, D)."""
    from genlib.bench import parse_nn_size

    try:
        return parse_nn_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _checked(text: str, convert: Callable[[str], Any], accept: Callable[[Any], bool], wanted: str) -> Any:
    """The argparse-type core: ``convert(text)`` where it parses and ``accept`` takes it, else an error that says
    the value must be ``wanted``."""
    try:
        value = convert(text)
    except ValueError:
        value = None
    if value is None or not accept(value):
        raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (a learning rate of 0 would train nothing, silently)."""
    return _checked(text, float, lambda value: math.isfinite(value) and value > 0, "a positive number")


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _checked(text, int, lambda value: value >= 1, "a positive integer")


def _count(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _checked(text, int, lambda value: value >= 0, "a non-negative integer")


MAX_SEED = 2**63 - 1  # torch's generators take 64 bits; a margin below keeps seed + 1 (held-out data) in range


def _seed(text: str) -> int:
    """argparse type of a seed: an integer in 0..:data:`MAX_SEED`."""
    return _checked(text, int, lambda value: 0 <= value <= MAX_SEED, "a seed from 0 to 2**63 - 1")


def _seed_list(text: str) -> str:
    """argparse type of ``compare --seeds``: comma-separated distinct seeds (:func:`_seed`; kept as the text)."""
    seeds = [_seed(seed) for seed in text.split(",")]
    if len(set(seeds)) < len(seeds):
        raise argparse.ArgumentTypeError(f"a seed is named twice in {text!r}: its run would count twice")
    return text


def _ema_decay(text: str) -> float:
    """argparse type of ``--ema``: a decay in [0, 1), 0 for no average."""
    return _checked(text, float, lambda value: 0 <= value < 1, "a decay in [0, 1) (0: no average)")


def _device(text: str) -> str:
    """argparse type of ``--device``: a name torch knows (cpu, cuda, cuda:1); whether it is present is checked
    when the command runs."""
    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu or cuda (cuda:N for one GPU of many)")
    return text


class _HelpFormatter(argparse.HelpFormatter):
    """Help that shows each option's default, unless it has none (None, False) or its help gives it already."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default in ([], argparse.SUPPRESS)
        if unset or "default" in text or not action.option_strings:
            return action.help
        return f"{text} (default: %(default)s)".lstrip()


def make_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m genlib``."""
    from genlib.energy import TOY_TABLES
    from genlib.features import DEFAULT_EPOCHS
    from genlib.gan import TOY_SETTINGS

    parser = argparse.ArgumentParser(prog="python -m genlib", description=__doc__.split("\n\n")[0].replace("``", ""))
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser = functools.partial(commands.add_parser, formatter_class=_HelpFormatter)

    train = commands.add_parser("train", help="train a model family on a dataset and record the run")
    train.add_argument("family", choices=sorted(FAMILIES), help="model family")
    train.add_argument("--data", required=True, choices=TOYS + IMAGE_SETS, help="dataset or 2-D toy")
    train.add_argument("--root", help="dataset folder (CelebA's img_align_celeba, an image folder, ...)")
    train.add_argument("--resolution", type=_positive_int, default=DATA_FLAGS["resolution"][1],
                       help="image size (--data folder only)")
    train.add_argument("--toy-points", type=_positive_int, default=DATA_FLAGS["toy_points"][1],
                       help="size of a 2-D toy training set (toys only)")
    train.add_argument("--steps", type=_positive_int, default=2000,
                       help="training steps in all (a rerun with more steps goes on from the checkpoint)")
    train.add_argument("--batch-size", type=_positive_int, default=64, help="training batch")
    train.add_argument("--z-dim", type=_positive_int, default=64, help="noise or code dimension")
    train.add_argument("--width", type=_positive_int, default=64, help="base channel width of conv nets / MLP width")
    train.add_argument("--lr", type=_positive_float, default=2e-4, help="learning rate")
    train.add_argument("--seed", type=_seed, default=0, help="seed of the data order, the nets and the noise")
    train.add_argument("--device", type=_device, help="cuda or cpu (default: cuda when available)")
    train.add_argument("--out", required=True, help="run folder: checkpoints, run.json, metrics.json, samples.png")
    train.add_argument("--checkpoint-every", type=_positive_int, default=1000,
                       help="steps between checkpoints (Ctrl-C also saves one, after the step in progress)")
    train.add_argument("--log-every", type=_positive_int, default=50, help="steps per logged loss mean")
    train.add_argument("--sample-every", type=_count, default=1000,
                       help="save a grid of samples every N steps into OUT/progress/ (images; 0: never)")
    train.add_argument("--eval-samples", type=_count, default=10_000,
                       help="samples for the run's metrics (FD/KID, MMD, mode coverage); 0 skips them")
    train.add_argument("--ema", type=_ema_decay, metavar="DECAY",
                       help="keep an exponential moving average of the sampling net's weights, which then draws the "
                            "samples and metrics (default: 0.999 on CUDA, none on the CPU; 0: none)")
    train.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                       help="family-specific option (repeatable); an unknown key is an error that lists the known "
                            "ones, or names the builder whose docstring does")
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("evaluate", help="score a recorded train run's checkpoint again, e.g. "
                                                    "with other sampler options")
    evaluate.add_argument("run", help="the folder of a `train` run: its run.json and checkpoint.pt")
    evaluate.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                          help="option replacing the run's (repeatable), e.g. steps_per_level=100")
    evaluate.add_argument("--eval-samples", type=_positive_int, default=1000, help="samples for the metrics")
    evaluate.add_argument("--seed", type=_seed, default=0, help="seed of the sampling")
    evaluate.add_argument("--device", type=_device, help="cuda or cpu (default: cuda when available)")
    evaluate.add_argument("--root", help="dataset folder, replacing the run's (data moved since it was recorded)")
    evaluate.add_argument("--out", required=True,
                          help="folder for run.json, metrics.json and (image data) samples.png; a folder holding "
                               "another evaluation is refused")
    evaluate.set_defaults(func=cmd_evaluate)

    compare = commands.add_parser("compare", help="train GAN variants (chapter 2) or energy-GAN settings (chapter 3) "
                                                  "x seeds on 2-D toys and record the mode-coverage table")
    compare.add_argument("--family", choices=("gan", "energy"), default="gan",
                         help="gan: genlib.gan.TOY_METHODS in a genlib.gan.TOY_SETTINGS setting; energy: the rows of "
                              "one of genlib.energy.TOY_TABLES, named by --setting")
    compare.add_argument("--methods", default="all",
                         help="comma-separated names of genlib.gan.TOY_METHODS (or of the energy table's rows), or all")
    compare.add_argument("--toys", default="ring8,grid25", help="comma-separated Gaussian-mixture toys")
    compare.add_argument("--seeds", type=_seed_list, default="0,1,2", help="comma-separated seeds")
    compare.add_argument("--steps", type=_positive_int, default=3000, help="training steps of each run")
    compare.add_argument("--setting", choices=list(TOY_SETTINGS) + list(TOY_TABLES),
                         help="gan: genlib.gan.TOY_SETTINGS (batch size and network/optimiser settings; default "
                              "collapse); energy: a table of genlib.energy.TOY_TABLES (default "
                              f"{next(iter(TOY_TABLES))})")
    compare.add_argument("--toy-std", type=_positive_float,
                         help="energy: the toys' component std (default: each toy's own)")
    compare.add_argument("--jobs", type=_positive_int, default=1,
                         help="runs trained at once, each in its own process on one thread (at most the cores)")
    compare.add_argument("--out", required=True, help="folder for run.json, metrics.json, samples.png, train.log")
    compare.set_defaults(func=cmd_compare)

    prepare = commands.add_parser("prepare", help="decode an image dataset once into its uint8 cache")
    prepare.add_argument("data", choices=IMAGE_SETS, help="image dataset")
    prepare.add_argument("--root", help="dataset folder (CelebA's img_align_celeba, an image folder, ...)")
    prepare.add_argument("--split", choices=("train", "valid", "test"), default="train",
                         help=f"test: only {', '.join(SPLIT_SETS)} have one; valid: celeba64 alone")
    prepare.add_argument("--resolution", type=_positive_int, default=DATA_FLAGS["resolution"][1],
                         help="image size (--data folder only)")
    prepare.set_defaults(func=cmd_prepare)

    classifier = commands.add_parser("classifier", help="train the offline Fashion-MNIST feature classifier")
    classifier.add_argument("--epochs", type=_positive_int, default=DEFAULT_EPOCHS,
                            help=f"training epochs ({DEFAULT_EPOCHS}, the default, made the committed asset)")
    classifier.add_argument("--seed", type=_seed, default=0,
                            help="seed of the weights, augmentation and data order (0, the default, made the asset)")
    classifier.add_argument("--out", help="folder for the weights (default: genlib/assets)")
    classifier.set_defaults(func=cmd_classifier)

    bench = commands.add_parser("bench", help="benchmark kernels and training steps on this device")
    bench.add_argument("--device", type=_device, help="cuda or cpu (default: cuda when available)")
    bench.add_argument("--out", default="results/bench", help="folder for bench.json and bench.md")
    bench.add_argument("--quick", action="store_true", help="small sizes (CPU smoke run)")
    bench.add_argument("--nn-size", action="append", default=[], type=_search_size, metavar="MxNxD",
                       help="nearest-neighbour search size: M queries, N keys, dimension D (repeatable; "
                            "replaces the default sizes)")
    bench.add_argument("--batch-size", type=_positive_int, help="training batch (default 512 on CUDA, 16 on the CPU)")
    bench.add_argument("--repeats", type=_positive_int,
                       help="timed calls per measurement: the median search time, the mean training step "
                            "(default 10 on CUDA, 3 on the CPU)")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m genlib`` and of the ``genlib`` script."""
    args = make_parser().parse_args(argv)
    with _terminate_as_interrupt():
        stopped = _run(args)
    if stopped is not None:  # outside the handler's scope: the death by the signal must not be caught again
        _die_by(*stopped)


def _run(args: argparse.Namespace) -> tuple[int, str] | None:
    """Run the parsed command; None when it finished, else ``(signal, message)`` of a clean stop by a signal."""
    from genlib.runtime import DeviceUnavailableError, MissingAssetError, configure_threads, max_steps
    from genlib.train import NonFiniteLossError, TrainingInterrupted

    try:
        if os.environ.get("GENLIB_THREADS"):  # unset: torch's own default (OMP_NUM_THREADS, else the cores)
            configure_threads()
        if args.func in (cmd_train, cmd_compare) and max_steps() is not None:
            raise SystemExit("error: GENLIB_MAX_STEPS is set; it cuts training short for smoke tests, and a run it "
                             "cut would be recorded as if it had run its --steps: unset it")
        args.func(args)
    except (OSError, ValueError, DeviceUnavailableError, MissingAssetError, NonFiniteLossError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from error
    except TrainingInterrupted as stopped:  # the same command resumes it: say so, without a traceback
        return stopped.signum, (f"stopped by {signal.Signals(stopped.signum).name} after step {stopped.step}, "
                                f"saved in {stopped.path}: rerun the same command to resume")
    except KeyboardInterrupt as stopped:  # outside a training loop (compare's runs, train's evaluation): what is
        signum = getattr(stopped, "signum", signal.SIGINT)  # saved stays
        return signum, (f"stopped by {signal.Signals(signum).name}: what was saved stays (a run's checkpoint, a "
                        "comparison's finished runs); rerun the same command to go on")
    return None


class Terminated(KeyboardInterrupt):
    """A SIGTERM outside :func:`genlib.train.fit`'s loop, raised like Ctrl-C's KeyboardInterrupt so that the same
    clean-up runs (:func:`genlib.runtime.parallel_map` ends its workers) and the same message is printed."""

    signum = signal.SIGTERM


def _raise_terminated(signum: int, frame: Any) -> None:
    """SIGTERM's handler while a command runs."""
    raise Terminated


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` for the duration (fit installs its own, deferring, handler inside);
    a SIGTERM ignored or handled outside Python stays as it was."""
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL or threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _die_by(signum: int, message: str) -> None:
    """Print ``message`` and end the process by signal ``signum``, as an uncaught one would: a calling shell loop
    stops too (an exit status would not)."""
    with contextlib.suppress(OSError):  # stderr may be a pipe whose reader the same Ctrl-C ended
        print(message, file=sys.stderr, flush=True)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    raise SystemExit(128 + signum) from None  # where the signal does not end the process
