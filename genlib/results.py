"""Recorded runs with provenance.

A recorded run is a folder under ``results/`` holding small files only:
``run.json`` (command, config, git commit, device, torch version, threads, the machine's load, wall time, date),
``metrics.json`` and optionally ``samples.png`` and ``train.log``. Chapters display them
beside the command that made them, so the book never shows a number nobody measured.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


RECORDS = "results"
"""The folder of recorded runs under the repository root: data, not code, so no change there makes a run's commit
"-dirty" (a rerun replaces its own older record there, and a batch of reruns the records made before it)."""


def git_commit(root: Path = REPO_ROOT) -> str:
    """The current git commit (with ``-dirty`` if tracked files outside :data:`RECORDS` changed), or ``'unknown'``
    outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                f":(exclude){RECORDS}"], cwd=root, capture_output=True, text=True, timeout=10)
        return commit + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def short_commit(commit: str) -> str:
    """A commit as 12 hex digits, keeping its ``-dirty`` mark (a run from uncommitted changes must say so)."""
    return commit[:12] + ("-dirty" if commit.endswith("-dirty") else "")


def load_average() -> list[float] | None:
    """The machine's 1-, 5- and 15-minute load averages, rounded (None where the OS keeps none): a busy machine slows
    a run, so its record says whether other jobs were running."""
    try:
        return [round(load, 2) for load in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def provenance(device: torch.device | str, command: list[str] | str | None = None) -> dict:
    """Who, what and where of a run: command line, git commit (:func:`git_commit`), device, the host's CPU (its
    :func:`genlib.runtime.cpu_fingerprint`: CPU numbers are reproducible only on a like CPU), versions, threads,
    load, host, date."""
    from genlib import __version__
    from genlib.runtime import cpu_fingerprint, device_name, scale

    device = torch.device(device)
    if command is None:
        command = [*_program(sys.argv[0]), *sys.argv[1:]]
    if not isinstance(command, str):
        command = shlex.join(command)
    return {
        "command": command,
        "git_commit": git_commit(),
        "genlib_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": device.type,
        "device_name": device_name(device),
        "cpu": cpu_fingerprint(),
        "scale": scale(),
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
        "host": platform.node(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


CLI = "python -m genlib"


def _program(argv0: str) -> list[str]:
    """The words that started this process, as a reader can type them: ``python -m genlib`` for genlib's
    ``__main__.py`` and for the ``genlib`` script (the same program, wherever it is installed), else ``argv0``."""
    path = Path(argv0)
    if (path.name == "__main__.py" and path.parent.name == "genlib") or path.name == "genlib":
        return CLI.split()
    return [argv0]


def runnable(command: str) -> str:
    """A recorded command as one can paste it: records made before :func:`_program` wrote ``python -m genlib``
    as ``__main__.py``."""
    program, _, arguments = command.partition(" ")
    return f"{CLI} {arguments}".rstrip() if program == "__main__.py" else command


def write_json(path: Path, obj: dict) -> None:
    """Write ``obj`` as indented JSON atomically (:func:`genlib.runtime.write_atomically`)."""
    from genlib.runtime import write_atomically

    text = json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n"
    write_atomically(path, lambda file: file.write(text.encode()))


def _jsonable(value: object) -> object:
    """Convert tensors, paths and numpy scalars for JSON."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a run record")


@dataclass
class RecordedRun:
    """A recorded run as read back from disk: its folder, provenance, config and metrics."""

    path: Path
    run: dict
    metrics: dict = field(default_factory=dict)

    @property
    def command(self) -> str:
        """The command that made the run, as one can paste it (:func:`runnable`)."""
        return runnable(self.run["command"])

    @property
    def samples_png(self) -> Path | None:
        png = self.path / "samples.png"
        return png if png.exists() else None

    def header(self) -> str:
        """Three lines: the command, where it ran (device, torch, commit; on a CPU the CPU's fingerprint, where the
        record has it, since CPU numbers repeat only on a like CPU; torch's threads and the 1-minute load
        average at the start and end where the record has them; a resumed run's: its last process's, with every
        process's device named when they differ), and its wall time and date (and the
        ``GENLIB_SCALE`` it ran under, unless a ``python -m genlib`` command, whose flags set every size, made it)."""
        run = self.run
        processes, devices = run.get("train_processes", 1), run.get("train_devices", [])
        mixed = f" on {', '.join(devices)}" if len(set(devices)) > 1 else ""  # e.g. started on a GPU, ended on a CPU
        when = (f"wall time {run.get('wall_time_s', float('nan')):.0f} s"
                + (f" (over {processes} resumed processes{mixed})" if processes > 1 else "") + f" | {run['date']}")
        made_by_cli = "command" in run.get("config", {})  # the CLI keeps its subcommand in the config
        # the fingerprint ends with torch's version; older records and GPU runs name torch alone
        machine = run["cpu"] if run.get("device") == "cpu" and run.get("cpu") else f"torch {run['torch_version']}"
        return "\n".join([f"command : {self.command}",
                          f"device  : {run['device_name']} | {machine} | "
                          f"commit {short_commit(run['git_commit'])}{_machine_load(run)}",
                          f"run     : {when}" if made_by_cli else f"scale   : {run['scale']} | {when}"])

    def pace(self, dataset_size: int | None = None) -> str:
        """One line on a ``python -m genlib train`` run's training speed, from its recorded steps, batch size and
        training clock (which also counts its checkpoints and progress grids); with ``dataset_size``, its epochs."""
        config, seconds = self.run.get("config", {}), self.run.get("wall_time_s")
        if config.get("command") != "train" or not seconds:
            raise ValueError(f"{self.path} is not a recorded `python -m genlib train` run with a training time")
        steps, batch = config["steps"], config["batch_size"]
        epochs = f", {steps * batch / dataset_size:.3g} epochs" if dataset_size else ""
        return (f"{steps:,} steps of {batch} in {seconds:.0f} s{epochs}: {steps / seconds:.3g} steps/s, "
                f"{float(f'{steps * batch / seconds:.3g}'):,.0f} images/s, {1000 * seconds / steps:.3g} ms a step")

    def summary(self) -> str:
        """A few lines for a notebook: :meth:`header`, then the metrics."""
        return "\n".join([self.header()] + [f"{k:<8}: {_fmt(v)}" for k, v in sorted(self.metrics.items())])


def _machine_load(run: dict) -> str:
    """``' | 4 threads | load 1.2 -> 2'`` from a record's threads and 1-minute load averages; '' for older records,
    which lack them."""
    threads = run.get("torch_threads")
    parts = [f" | {threads} thread{'' if threads == 1 else 's'}"] if threads else []
    start, end = run.get("load_average"), run.get("load_average_end")
    if start:
        parts.append(f" | load {start[0]:g}" + (f" -> {end[0]:g}" if end else ""))
    return "".join(parts)


def _fmt(value: object) -> str:
    """Three significant digits for floats, a count for lists and tables, as is for the rest."""
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, dict)):
        return f"{len(value)} {'rows' if isinstance(value, list) else 'entries'} (see metrics.json)"
    return str(value)


def record_run(out_dir: str | Path, *, device: torch.device | str, config: dict, metrics: dict,
               wall_time_s: float, command: list[str] | str | None = None,
               origin: dict | None = None) -> RecordedRun:
    """Write ``run.json`` (provenance + config + wall time) and ``metrics.json`` into ``out_dir``.

    ``origin`` is the :func:`provenance` taken when the run started; without it, provenance is taken now. The
    load average is also taken now (``load_average_end``), so the record brackets the run.
    """
    out = Path(out_dir)
    run = (origin or provenance(device, command)) | {"config": config, "wall_time_s": round(wall_time_s, 2),
                                                      "load_average_end": load_average()}
    write_json(out / "run.json", run)
    write_json(out / "metrics.json", metrics)
    return RecordedRun(out, run, metrics)


def load_run(path: str | Path) -> RecordedRun:
    """Read a recorded run folder; a clear error says which file is missing."""
    path = Path(path)
    run_file = path / "run.json"
    if not run_file.exists():
        raise FileNotFoundError(f"{run_file} does not exist: no recorded run at {path} "
                                "(recorded runs are made with `python -m genlib train ... --out DIR`)")
    metrics_file = path / "metrics.json"
    metrics = read_json(metrics_file) if metrics_file.exists() else {}
    return RecordedRun(path, read_json(run_file), metrics)


def read_json(path: Path) -> dict:
    """The JSON object in ``path``; a file that is not JSON is a ValueError naming it (a bare decoder message
    does not say which file is broken)."""
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); remove or repair it") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not a record (an object); remove or repair it")
    return value


def gpu_runs(name: str, root: str | Path = REPO_ROOT / "results") -> list[RecordedRun]:
    """The GPU recordings of run ``name`` (folders ``root/NAME_TAG``, as ``tools/record_full.sh`` makes), oldest
    first."""
    folders = [path for path in sorted(Path(root).glob(f"{name}_*"))
               if "_" not in path.name[len(name) + 1:] and (path / "run.json").is_file()]  # a tag has no "_"
    runs = [load_run(path) for path in folders]
    return sorted((run for run in runs if run.run["device"] == "cuda"), key=lambda run: run.run["date"])


def full_scale_report(names: list[str], root: str | Path = REPO_ROOT / "results") -> str:
    """For each run name: the summaries of its GPU recordings, or a line saying none exists yet."""
    blocks = []
    for name in names:
        runs = gpu_runs(name, root)
        blocks += [run.summary() for run in runs] or [f"{name}: no full-scale run recorded on a GPU yet "
                                                      f"(it would be results/{name}_<gpu>)"]
    return "\n\n".join(blocks)


def summarize_coverage(rows: list[dict], key: str, means: tuple[str, ...] = ("hq", "seconds"),
                       sums: tuple[str, ...] = ()) -> list[dict]:
    """Per value of ``key`` (a method or setting) over its seeds: runs, mean / min / max / standard error of
    ``modes``, ``total_modes``, min / max / standard error of ``hq`` (see :func:`standard_error`), the mean of
    each field in ``means`` (as ``<field>_mean``, over the runs where it is present and not NaN, e.g. not a diverged
    run's stability fields, nor an older recording's; NaN if none) and the sum of each in ``sums``."""
    out = []
    for name in dict.fromkeys(row[key] for row in rows):
        runs = [row for row in rows if row[key] == name]
        modes, hq = [row["modes"] for row in runs], [row["hq"] for row in runs]
        summary = {key: name, "runs": len(runs), "modes_mean": sum(modes) / len(runs), "modes_min": min(modes),
                   "modes_max": max(modes), "modes_se": standard_error(modes), "total_modes": runs[0]["total_modes"],
                   "hq_min": min(hq), "hq_max": max(hq), "hq_se": standard_error(hq)}
        summary.update({f"{field}_mean": _mean_of_numbers([row.get(field, math.nan) for row in runs])
                        for field in means})
        summary.update({field: sum(row[field] for row in runs) for field in sums})
        out.append(summary)
    return out


def runs_by_method(rows: list[dict]) -> dict[str, list[dict]]:
    """A comparison's rows grouped by ``method`` (in order of first appearance), each group in seed order."""
    grouped: dict[str, list[dict]] = {method: [] for method in dict.fromkeys(row["method"] for row in rows)}
    for row in sorted(rows, key=lambda row: row["seed"]):
        grouped[row["method"]].append(row)
    return grouped


def standard_error(values: list[float]) -> float:
    """The standard error of the mean of ``values``: their sample standard deviation (n - 1) over sqrt(n); NaN for
    fewer than two values, whose spread says nothing."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) >= 2 else math.nan


def _mean_of_numbers(values: list[float]) -> float:
    """The mean of the values that are not NaN (NaN if none is)."""
    numbers = [value for value in values if not math.isnan(value)]
    return sum(numbers) / len(numbers) if numbers else math.nan


def coverage_table(summaries: list[dict], key: str = "method", timing: str | None = None,
                   columns: Mapping[str, str] | None = None, hq_range: bool = False, errors: bool = False) -> str:
    """A fixed-width text table of :func:`summarize_coverage` rows: runs, modes (mean, min-max) and mean hq
    fraction (with ``hq_range`` also its min-max over the runs; with ``errors`` each mean followed by its standard
    error over the runs, ``s.e.``); the diverged runs where the summaries count them;
    the mean of each field of ``columns`` (field -> header, e.g. :data:`genlib.energy.STABILITY_COLUMNS`; 3
    significant digits); with ``timing`` (a field averaged by the summary, e.g. ``"cpu_seconds"``) also its mean per
    run (timings: keep them out of checked outputs unless they are read from a record)."""
    total = summaries[0]["total_modes"] if summaries else 0
    width = max([len(key)] + [len(str(row[key])) for row in summaries])
    timing_header = f"{timing} per run" if timing else ""
    diverged = bool(summaries) and "diverged" in summaries[0]
    columns = dict(columns or {})
    error_header = f" {'s.e.':>5s}" if errors else ""
    lines = [f"{key:{width}s} {'runs':>4s} {f'modes (of {total})':>14s}{error_header} {'min-max':>7s}"
             + f" {'hq fraction':>11s}{error_header}" + (f" {'hq min-max':>11s}" if hq_range else "")
             + (" diverged" if diverged else "")
             + "".join(f" {header}" for header in columns.values())
             + (f" {timing_header}" if timing else "")]
    for row in summaries:
        line = (f"{str(row[key]):{width}s} {row['runs']:4d} {row['modes_mean']:14.1f}"
                + (f" {row['modes_se']:5.1f}" if errors else "")
                + f" {row['modes_min']:3d}-{row['modes_max']:<3d} {row['hq_mean']:11.3f}"
                + (f" {row['hq_se']:5.3f}" if errors else ""))
        line += f" {row['hq_min']:5.3f}-{row['hq_max']:<5.3f}" if hq_range else ""
        line += f" {row['diverged']:8d}" if diverged else ""
        line += "".join(f" {row[f'{field}_mean']:{len(header)}.3g}" for field, header in columns.items())
        lines.append(line + (f" {row[f'{timing}_mean']:{len(timing_header)}.0f}" if timing else ""))
    return "\n".join(lines)


def comparison_report(run: RecordedRun, timing: str | None = "cpu_seconds", diverged: bool = False,
                      columns: Mapping[str, str] | None = None, hq_range: bool = False, errors: bool = False) -> str:
    """A recorded ``python -m genlib compare`` run for a notebook: its :meth:`~RecordedRun.header`, then per toy
    the setting, steps and seeds and the :func:`coverage_table` of its rows (with the mean ``timing`` per run,
    with ``diverged`` the runs a non-finite loss stopped, the mean of each field of ``columns``, with
    ``hq_range`` the hq min-max over the seeds and with ``errors`` the standard errors of the means)."""
    config, rows = run.run["config"], run.metrics["rows"]
    columns = dict(columns or {})
    blocks = [run.header()]
    for toy_name in dict.fromkeys(row["toy"] for row in rows):
        summaries = summarize_coverage([row for row in rows if row["toy"] == toy_name], "method",
                                       means=("hq", *columns, *([timing] if timing else [])),
                                       sums=("diverged",) if diverged else ())
        blocks.append(f"-- {toy_name}, {config['setting']} setting, {config['steps']} steps, seeds {config['seeds']}\n"
                      + coverage_table(summaries, timing=timing, columns=columns, hq_range=hq_range, errors=errors))
    return "\n".join(blocks)


def footer(seed: int, began: float, device: torch.device | str = "cpu") -> str:
    """The reproducibility footer of a chapter: scale, device (on a CPU with the model and instruction set that
    decide its rounding, :func:`genlib.runtime.cpu_fingerprint`), seed, versions, commit and wall time.

    ``began`` is a ``time.perf_counter()`` reading taken at the top of the notebook."""
    from genlib.runtime import cpu_fingerprint

    info = provenance(device, command="")
    machine = info["device_name"] + (f"; {cpu_fingerprint(with_torch=False)}" if info["device"] == "cpu" else "")
    return (f"scale={info['scale']} | device={info['device']} [{machine}] | seed={seed} | "
            f"genlib {info['genlib_version']} (commit {short_commit(info['git_commit'])}) | "
            f"torch {info['torch_version']} | "
            f"wall time {time.perf_counter() - began:.0f} s")
