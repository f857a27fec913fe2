"""Recorded runs: provenance written and read back, clear errors."""

import json
import math

import numpy as np
import pytest
import torch

from genlib import results, runtime


def test_record_and_load_a_run(tmp_path, monkeypatch):
    monkeypatch.setenv("GENLIB_SCALE", "full")
    run = results.record_run(tmp_path / "r", device="cpu", config={"steps": 3}, metrics={"fd": 1.23456,
                             "modes": torch.tensor(7)}, wall_time_s=12.345, command=["python", "-m", "genlib", "x"])
    back = results.load_run(tmp_path / "r")
    assert back.command == "python -m genlib x" == run.command
    assert back.metrics == {"fd": 1.23456, "modes": 7}
    assert back.run["scale"] == "full" and back.run["config"] == {"steps": 3}
    assert back.run["wall_time_s"] == 12.35 and back.run["torch_version"] == torch.__version__
    assert "fd      : 1.23" in back.summary() and "scale   : full | wall time 12 s" in back.summary()
    assert json.loads((tmp_path / "r" / "run.json").read_text())["device"] == "cpu"
    assert back.run["cpu"] == runtime.cpu_fingerprint()  # CPU numbers reproduce only on a like CPU
    assert not list((tmp_path / "r").glob("*.tmp"))
    (tmp_path / "r" / "metrics.json").unlink()  # a run recorded before its metrics: read with none
    assert results.load_run(tmp_path / "r").metrics == {} and results.load_run(tmp_path / "r").run == back.run
    assert back.samples_png is None  # no picture yet: the chapters show none rather than a broken link
    (tmp_path / "r" / "samples.png").write_bytes(b"\x89PNG")
    assert back.samples_png == tmp_path / "r" / "samples.png"


def test_a_record_says_how_many_threads_ran_and_how_busy_the_machine_was(tmp_path, monkeypatch):
    loads = iter([(1.234, 0.5, 0.25), (2.0, 1.0, 0.5)])
    monkeypatch.setattr(results.os, "getloadavg", lambda: next(loads))
    origin = results.provenance("cpu", command="python -m genlib x")
    back = results.load_run(results.record_run(tmp_path / "r", device="cpu", config={}, metrics={}, wall_time_s=1.0,
                                               origin=origin).path)
    assert back.run["torch_threads"] == torch.get_num_threads()
    assert back.run["load_average"] == [1.23, 0.5, 0.25] and back.run["load_average_end"] == [2.0, 1.0, 0.5]
    for threads, shown in ((4, "4 threads"), (1, "1 thread")):
        with_threads = results.RecordedRun(back.path, {**back.run, "torch_threads": threads})
        assert with_threads.header().splitlines()[1].endswith(f" | {shown} | load 1.23 -> 2")
    older = results.RecordedRun(back.path, {k: v for k, v in back.run.items()
                                            if k not in ("torch_threads", "load_average", "load_average_end")})
    assert older.header().splitlines()[1].endswith(f"commit {results.short_commit(back.run['git_commit'])}")

    def no_load_average():
        raise OSError("no load average here")

    monkeypatch.setattr(results.os, "getloadavg", no_load_average)
    assert results.provenance("cpu")["load_average"] is None


def test_summary_counts_tables_instead_of_printing_them(tmp_path):
    metrics = {"rows": [{"modes": 8}] * 3, "summary": {"ring8": [], "grid25": []}, "fd": 2.0}
    lines = results.record_run(tmp_path, device="cpu", config={}, metrics=metrics, wall_time_s=1.0).summary()
    assert "rows    : 3 rows (see metrics.json)" in lines and "summary : 2 entries (see metrics.json)" in lines
    assert "modes" not in lines


def test_pace_of_a_training_run_from_its_steps_batch_and_clock(tmp_path):
    config = {"command": "train", "steps": 3000, "batch_size": 50}
    run = results.record_run(tmp_path / "t", device="cpu", config=config, metrics={}, wall_time_s=40.0)
    assert run.pace() == "3,000 steps of 50 in 40 s: 75 steps/s, 3,750 images/s, 13.3 ms a step"
    pace = results.load_run(tmp_path / "t").pace(dataset_size=60_000)
    assert pace.startswith("3,000 steps of 50 in 40 s, 2.5 epochs:")
    compare = results.record_run(tmp_path / "c", device="cpu", config={"command": "compare"}, metrics={},
                                 wall_time_s=9.0)
    with pytest.raises(ValueError, match="not a recorded `python -m genlib train` run"):
        compare.pace()


def test_missing_run_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no recorded run"):
        results.load_run(tmp_path / "nothing")


def test_git_commit_outside_a_repository(tmp_path):
    assert results.git_commit(tmp_path) == "unknown"


def test_git_commit_is_dirty_for_code_changes_but_not_for_records(tmp_path):
    import subprocess

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    for run in ("run", "other"):
        (tmp_path / results.RECORDS / run).mkdir(parents=True)
        (tmp_path / results.RECORDS / run / "metrics.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "results.py").write_text("y = 1\n")   # a file named like the folder is code all the same
    git("init", "-q"); git("add", "."); git("commit", "-qm", "c")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert results.git_commit(tmp_path) == head
    (tmp_path / results.RECORDS / "run" / "metrics.json").unlink()          # a rerun replaces its older record
    (tmp_path / results.RECORDS / "other" / "metrics.json").write_text("{1}")  # and an earlier rerun's
    assert results.git_commit(tmp_path) == head
    (tmp_path / "results.py").write_text("y = 2\n")
    assert results.git_commit(tmp_path) == head + "-dirty"
    git("checkout", "--", "results.py")
    (tmp_path / "code.py").unlink()
    assert results.git_commit(tmp_path) == head + "-dirty"


def test_footer_states_what_was_run(monkeypatch):
    import time

    monkeypatch.setenv("GENLIB_SCALE", "small")
    line = results.footer(4, time.perf_counter() - 12.4)
    assert line.startswith("scale=small | device=cpu") and "seed=4" in line and line.endswith("wall time 12 s")
    assert torch.__version__ in line
    machine = f"[{runtime.device_name(torch.device('cpu'))}; {runtime.cpu_fingerprint(with_torch=False)}]"
    assert machine in line  # which CPU rounded the page's numbers
    assert runtime.cpu_fingerprint() == f"{runtime.cpu_fingerprint(with_torch=False)} | torch {torch.__version__}"


def test_summarize_coverage_groups_seeds_by_key():
    rows = [{"method": "a", "modes": 8, "total_modes": 8, "hq": 0.5, "seconds": 1.0, "diverged": 0},
            {"method": "b", "modes": 2, "total_modes": 8, "hq": 0.1, "seconds": 3.0, "diverged": 1},
            {"method": "a", "modes": 6, "total_modes": 8, "hq": 0.3, "seconds": 2.0, "diverged": 1}]
    first, second = results.summarize_coverage(rows, "method", sums=("diverged",))
    # standard errors by hand: modes 8 and 6 have sample std sqrt(2), hq 0.5 and 0.3 have 0.1 * sqrt(2)
    assert first == pytest.approx({"method": "a", "runs": 2, "modes_mean": 7.0, "modes_min": 6, "modes_max": 8,
                                   "modes_se": 1.0, "total_modes": 8, "hq_min": 0.3, "hq_max": 0.5, "hq_se": 0.1,
                                   "hq_mean": 0.4, "seconds_mean": 1.5, "diverged": 1})
    assert second["method"] == "b" and second["runs"] == 1 and second["diverged"] == 1
    assert math.isnan(second["modes_se"]) and math.isnan(second["hq_se"])   # one run has no spread


def test_runs_by_method_groups_rows_in_seed_order():
    rows = [{"method": m, "seed": seed} for m, seed in (("b", 2), ("a", 1), ("b", 0), ("a", 0), ("b", 1))]
    grouped = results.runs_by_method(rows)
    assert list(grouped) == ["b", "a"]   # methods as they first appear
    assert [[row["seed"] for row in group] for group in grouped.values()] == [[0, 1, 2], [0, 1]]
    assert all(row["method"] == method for method, group in grouped.items() for row in group)


def test_standard_error_against_numpy():
    values = [3.0, 7.5, 1.25, 9.0, 4.0]
    assert results.standard_error(values) == pytest.approx(np.std(values, ddof=1) / np.sqrt(len(values)))
    assert results.standard_error([2.0, 2.0]) == 0.0 and math.isnan(results.standard_error([2.0]))


def test_coverage_table_prints_one_aligned_line_per_summary():
    rows = [{"method": "GAN", "modes": 8, "total_modes": 8, "hq": 0.5, "seconds": 1.0},
            {"method": "Unrolled", "modes": 3, "total_modes": 8, "hq": 0.25, "seconds": 9.0},
            {"method": "GAN", "modes": 6, "total_modes": 8, "hq": 0.3, "seconds": 2.0}]
    summaries = results.summarize_coverage(rows, "method")
    header, gan_line, unrolled_line = results.coverage_table(summaries, timing="seconds").splitlines()
    assert header.endswith("seconds per run")
    assert "modes (of 8)" in header and len(header) == len(gan_line) == len(unrolled_line)
    assert gan_line.split() == ["GAN", "2", "7.0", "6-8", "0.400", "2"]
    assert unrolled_line.split() == ["Unrolled", "1", "3.0", "3-3", "0.250", "9"]
    assert results.coverage_table(summaries).splitlines()[1].split() == ["GAN", "2", "7.0", "6-8", "0.400"]
    ranged = results.coverage_table(summaries, hq_range=True).splitlines()
    assert ranged[0].split()[-2:] == ["hq", "min-max"] and len(ranged[0]) == len(ranged[1]) == len(ranged[2])
    assert ranged[1].split()[-2:] == ["0.400", "0.300-0.500"] and ranged[2].split()[-1] == "0.250-0.250"
    errors = results.coverage_table(summaries, errors=True).splitlines()
    assert errors[0].split()[4:] == ["8)", "s.e.", "min-max", "hq", "fraction", "s.e."]
    assert errors[1].split() == ["GAN", "2", "7.0", "1.0", "6-8", "0.400", "0.100"]
    assert errors[2].split() == ["Unrolled", "1", "3.0", "nan", "3-3", "0.250", "nan"]
    assert len(errors[0]) == len(errors[1]) == len(errors[2])


def test_coverage_table_shows_extra_columns_averaged_over_the_runs_that_have_them(tmp_path):
    nan = float("nan")
    rows = [{"toy": "ring8", "method": "none", "seed": 0, "modes": 1, "total_modes": 8, "hq": 0.1, "diverged": 0,
             "late_gap": 300.0, "gap_flips": 4.0},
            {"toy": "ring8", "method": "none", "seed": 1, "modes": 0, "total_modes": 8, "hq": 0.0, "diverged": 1,
             "late_gap": nan, "gap_flips": nan},
            {"toy": "ring8", "method": "none", "seed": 2, "modes": 3, "total_modes": 8, "hq": 0.2, "diverged": 0,
             "late_gap": 100.0, "gap_flips": 1.0},
            {"toy": "ring8", "method": "dead", "seed": 0, "modes": 0, "total_modes": 8, "hq": 0.0, "diverged": 1,
             "late_gap": nan, "gap_flips": nan}]
    columns = {"late_gap": "late |gap|", "gap_flips": "flips"}
    summaries = results.summarize_coverage(rows, "method", means=("hq", *columns), sums=("diverged",))
    assert summaries[0]["late_gap_mean"] == 200.0 and summaries[0]["gap_flips_mean"] == 2.5
    assert math.isnan(summaries[1]["late_gap_mean"])
    header, none_line, dead_line = results.coverage_table(summaries, columns=columns).splitlines()
    assert header.split()[-4:] == ["diverged", "late", "|gap|", "flips"]
    assert none_line.split() == ["none", "3", "1.3", "0-3", "0.100", "1", "200", "2.5"]
    assert dead_line.split()[-2:] == ["nan", "nan"] and len(header) == len(none_line) == len(dead_line)
    results.record_run(tmp_path, device="cpu", config={"command": "compare", "setting": "penalties", "steps": 5,
                       "seeds": "0,1,2"}, metrics={"rows": rows, "summary": {}}, wall_time_s=3.0)
    report = results.comparison_report(results.load_run(tmp_path), timing=None, diverged=True, columns=columns)
    assert report.splitlines()[-2].split() == none_line.split()
    # a recording made before these fields existed still prints, with NaN where they are missing
    older = [{k: v for k, v in row.items() if k not in columns} for row in rows[:1]] + rows[1:3]
    assert results.summarize_coverage(older, "method", means=tuple(columns))[0]["late_gap_mean"] == 100.0


def test_comparison_report_prints_one_table_per_toy(tmp_path):
    rows = [{"toy": "ring8", "method": "GAN", "seed": 0, "modes": 8, "total_modes": 8, "hq": 0.5, "cpu_seconds": 2.0},
            {"toy": "ring8", "method": "GAN", "seed": 1, "modes": 6, "total_modes": 8, "hq": 0.3, "cpu_seconds": 4.0},
            {"toy": "grid25", "method": "GAN", "seed": 0, "modes": 20, "total_modes": 25, "hq": 0.1,
             "cpu_seconds": 9.0}]
    results.record_run(tmp_path, device="cpu", config={"command": "compare", "setting": "tuned", "steps": 5,
                       "seeds": "0,1"}, metrics={"rows": rows, "summary": {}}, wall_time_s=3.0,
                       command="genlib compare")
    lines = results.comparison_report(results.load_run(tmp_path)).splitlines()
    # A CLI command's flags set every size, so its record does not print GENLIB_SCALE (which it ignores).
    assert len(lines) == 9 and lines[0] == "command : genlib compare" and lines[2].startswith("run     : wall time 3 s")
    assert lines[3] == "-- ring8, tuned setting, 5 steps, seeds 0,1" and lines[4].endswith("cpu_seconds per run")
    assert lines[5].split() == ["GAN", "2", "7.0", "6-8", "0.400", "3"]
    assert lines[6] == "-- grid25, tuned setting, 5 steps, seeds 0,1"
    assert lines[8].split() == ["GAN", "1", "20.0", "20-20", "0.100", "9"]
    untimed = results.comparison_report(results.load_run(tmp_path), timing=None).splitlines()
    assert untimed[5].split() == ["GAN", "2", "7.0", "6-8", "0.400"]
    ranged = results.comparison_report(results.load_run(tmp_path), timing=None, hq_range=True).splitlines()
    assert ranged[4].endswith("hq min-max") and ranged[5].split() == ["GAN", "2", "7.0", "6-8", "0.400", "0.300-0.500"]
    with_errors = results.comparison_report(results.load_run(tmp_path), timing=None, errors=True).splitlines()
    assert with_errors[5].split() == ["GAN", "2", "7.0", "1.0", "6-8", "0.400", "0.100"]


def test_coverage_table_counts_diverged_runs_where_the_summary_has_them(tmp_path):
    rows = [{"toy": "ring8", "method": "none", "seed": seed, "modes": 0, "total_modes": 8, "hq": 0.0,
             "diverged": seed == 1} for seed in (0, 1, 2)]
    summary = results.summarize_coverage(rows, "method", means=("hq",), sums=("diverged",))
    header, line = results.coverage_table(summary).splitlines()
    assert header.split()[-1] == "diverged" and line.split() == ["none", "3", "0.0", "0-0", "0.000", "1"]
    results.record_run(tmp_path, device="cpu", config={"command": "compare", "setting": "penalties", "steps": 5,
                       "seeds": "0,1,2"}, metrics={"rows": rows, "summary": {}}, wall_time_s=3.0)
    report = results.comparison_report(results.load_run(tmp_path), timing=None, diverged=True).splitlines()
    assert report[-1].split() == ["none", "3", "0.0", "0-0", "0.000", "1"]


@pytest.mark.parametrize("commit, shown", [("0123456789abcdef0123", "0123456789ab"),
                                           ("0123456789abcdef0123-dirty", "0123456789ab-dirty"),
                                           ("unknown", "unknown")])
def test_short_commit_keeps_the_dirty_mark(commit, shown):
    assert results.short_commit(commit) == shown


def _record(folder, device: str, date: str, fd: float) -> None:
    results.record_run(folder, device="cpu", config={}, metrics={"fd": fd}, wall_time_s=1.0,
                 origin={"command": f"train --out {folder.name}", "git_commit": "0" * 40, "device": device,
                         "device_name": device.upper(), "torch_version": "x", "scale": "full", "date": date})


def test_gpu_runs_finds_gpu_recordings_of_a_name_oldest_first(tmp_path):
    _record(tmp_path / "ch02_dcgan_fashion_cpu", "cpu", "2026-01-01", 30.0)       # a CPU run is not full scale
    _record(tmp_path / "ch02_dcgan_fashion_h200", "cuda", "2026-02-01", 9.0)   # named after the a100, made first
    _record(tmp_path / "ch02_dcgan_fashion_a100", "cuda", "2026-03-01", 10.0)
    _record(tmp_path / "ch02_dcgan_fashion_more_h100", "cuda", "2026-04-01", 1.0)  # another name's run, same prefix
    (tmp_path / "ch02_dcgan_fashion_empty").mkdir()                                 # an interrupted run: no run.json
    runs = results.gpu_runs("ch02_dcgan_fashion", tmp_path)
    names = [run.path.name for run in runs]
    assert names == ["ch02_dcgan_fashion_h200", "ch02_dcgan_fashion_a100"]
    report = results.full_scale_report(["ch02_dcgan_fashion", "ch04_dde_fashion"], tmp_path)
    assert "fd      : 9" in report and "fd      : 10" in report and "fd      : 30" not in report
    assert "ch04_dde_fashion: no full-scale run recorded on a GPU yet" in report


@pytest.mark.parametrize("argv0, program", [("/x/site-packages/genlib/__main__.py", "python -m genlib"),
                                            ("/home/me/.venv/bin/genlib", "python -m genlib"),
                                            ("tools/smoke_full.py", "tools/smoke_full.py"),
                                            ("/x/other/__main__.py", "/x/other/__main__.py")])
def test_a_record_names_the_program_as_a_reader_types_it(monkeypatch, argv0, program):
    monkeypatch.setattr(results.sys, "argv", [argv0, "train", "gan", "--opt", "betas=0.5 0.9"])
    assert results.provenance("cpu")["command"] == f"{program} train gan --opt 'betas=0.5 0.9'"


def test_an_older_record_s_command_is_shown_runnable(tmp_path):
    run = results.record_run(tmp_path / "r", device="cpu", config={"command": "train"}, metrics={}, wall_time_s=1.0,
                             command="__main__.py train gan --out r")
    assert run.command == "python -m genlib train gan --out r" == results.load_run(run.path).command
    assert run.header().startswith("command : python -m genlib train gan --out r\n")
    assert json.loads((run.path / "run.json").read_text())["command"] == "__main__.py train gan --out r"  # as recorded


def test_write_json_is_atomic_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    results.write_json(path, {"fd": 1.0})

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(results.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        results.write_json(path, {"fd": 2.0})
    assert json.loads(path.read_text()) == {"fd": 1.0}  # the old record is whole, not half-replaced


def test_a_record_stores_tensors_paths_and_numpy_scalars_as_plain_json(tmp_path):
    import numpy as np

    metrics = {"curve": torch.tensor([[1.0, 2.5], [0.0, -1.0]]), "modes": torch.tensor(7), "grid": tmp_path / "g.png",
               "steps": np.int64(3), "hq": np.float32(0.5)}
    run = results.record_run(tmp_path / "r", device="cpu", config={"out": tmp_path / "r"}, metrics=metrics,
                             wall_time_s=1.0, command="x")
    back = results.load_run(run.path)
    assert back.metrics == {"curve": [[1.0, 2.5], [0.0, -1.0]], "modes": 7, "grid": str(tmp_path / "g.png"),
                            "steps": 3, "hq": 0.5}
    assert back.run["config"] == {"out": str(tmp_path / "r")}
    with pytest.raises(TypeError, match="cannot store set in a run record"):
        results.write_json(tmp_path / "bad.json", {"seeds": {1, 2}})


def test_write_json_sorts_keys_so_records_diff_cleanly(tmp_path):
    path = tmp_path / "run.json"
    results.write_json(path, {"b": 1, "a": {"d": 2, "c": 3}})
    assert path.read_text() == '{\n  "a": {\n    "c": 3,\n    "d": 2\n  },\n  "b": 1\n}\n'


def test_summarize_coverage_takes_total_modes_from_each_group():
    rows = [{"toy": "ring8", "modes": 8, "total_modes": 8, "hq": 0.5},
            {"toy": "grid25", "modes": 20, "total_modes": 25, "hq": 0.1},
            {"toy": "grid25", "modes": 24, "total_modes": 25, "hq": 0.3}]
    ring, grid = results.summarize_coverage(rows, "toy", means=("hq",))
    assert (ring["toy"], ring["total_modes"]) == ("ring8", 8) and (grid["toy"], grid["total_modes"]) == ("grid25", 25)
    assert grid["modes_mean"] == 22.0 and grid["modes_min"] == 20 and grid["modes_max"] == 24


def test_summarize_coverage_sums_count_every_diverged_run():
    rows = [{"method": "none", "modes": 0, "total_modes": 8, "hq": 0.0, "diverged": flag} for flag in (1, 1, 0, 1)]
    assert results.summarize_coverage(rows, "method", means=(), sums=("diverged",))[0]["diverged"] == 3
    as_bools = [row | {"diverged": bool(row["diverged"])} for row in rows]
    assert results.summarize_coverage(as_bools, "method", means=(), sums=("diverged",))[0]["diverged"] == 3


def test_header_names_the_cpu_a_cpu_run_ran_on(tmp_path):
    run = results.record_run(tmp_path / "r", device="cpu", config={}, metrics={}, wall_time_s=1.0, command="x")
    assert run.run["cpu"] == runtime.cpu_fingerprint()
    device_line = run.header().splitlines()[1]
    assert device_line.startswith(f"device  : {run.run['device_name']} | {runtime.cpu_fingerprint()} | commit ")
    older = results.RecordedRun(run.path, {k: v for k, v in run.run.items() if k != "cpu"})  # before fingerprints
    older_line = older.header().splitlines()[1]
    assert older_line.startswith(f"device  : {run.run['device_name']} | torch {torch.__version__} |")
    gpu = results.RecordedRun(run.path, run.run | {"device": "cuda", "device_name": "NVIDIA H200"})  # host CPU: moot
    assert gpu.header().splitlines()[1].startswith(f"device  : NVIDIA H200 | torch {torch.__version__} | commit ")


def test_header_mentions_resumed_processes_only_when_there_were_several(tmp_path):
    run = results.record_run(tmp_path / "r", device="cpu", config={"steps": 3}, metrics={}, wall_time_s=12.3,
                             command="x")
    assert run.header().splitlines()[2] == f"scale   : {run.run['scale']} | wall time 12 s | {run.run['date']}"
    resumed = results.RecordedRun(run.path, run.run | {"train_processes": 3})
    assert resumed.header().splitlines()[2] == (f"scale   : {run.run['scale']} | wall time 12 s "
                                               f"(over 3 resumed processes) | {run.run['date']}")
    same = results.RecordedRun(run.path, run.run | {"train_processes": 2, "train_devices": ["NVIDIA H200"] * 2})
    assert "(over 2 resumed processes) |" in same.header()
    mixed = results.RecordedRun(run.path, run.run | {"train_processes": 2,
                                                     "train_devices": ["NVIDIA H200", "CPU (x86_64, 2 cores)"]})
    assert "(over 2 resumed processes on NVIDIA H200, CPU (x86_64, 2 cores)) |" in mixed.header()
