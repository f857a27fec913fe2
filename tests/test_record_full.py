"""tools/record_full.sh: its commands parse, and they are the ones the chapters quote."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from genlib import cli

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "record_full.sh"


def script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "GENLIB_PYTHON": "python"})


def genlib_arguments(command: str) -> list[str]:
    """The arguments after ``python -m genlib`` in a shell command line."""
    words = shlex.split(command)
    return words[words.index("genlib") + 1:]


def without_out(namespace) -> dict:
    return {k: v for k, v in vars(namespace).items() if k not in ("out", "func")}


def dry_run_commands() -> list[str]:
    result = script("--dry-run")
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_every_command_parses_and_records_under_results():
    commands = dry_run_commands()
    names = [line.split(":")[0] for line in script("--list").stdout.splitlines()]
    assert len(commands) == len(names) == 11 and "bench" in names
    for command in commands:
        args = cli.make_parser().parse_args(genlib_arguments(command))
        assert args.out.startswith("results/") and args.out.endswith("TAG"), command
        if args.command == "train":
            assert args.data == "fashion-mnist" and args.steps >= 20_000, command


def test_unknown_run_is_an_error_that_lists_the_known_ones():
    result = script("--dry-run", "ch09_nothing")
    assert result.returncode == 2 and "unknown run 'ch09_nothing'" in result.stderr
    assert "ch02_dcgan_fashion" in result.stderr


def test_chosen_runs_only():
    result = script("--dry-run", "ch02_dcgan_fashion")
    assert result.stdout.strip().endswith("--out results/ch02_dcgan_fashion_TAG")
    assert len(result.stdout.splitlines()) == 1


def quoted_fashion_commands() -> list[str]:
    """Every ``python -m genlib train ... --data fashion-mnist`` command in the chapters' text."""
    found = []
    for path in sorted((ROOT / "chapters").glob("*.ipynb")):
        for cell in nbformat.read(path, 4).cells:
            if cell.cell_type != "markdown":
                continue
            text = cell.source.replace("\\\n", " ")
            found += [m.group(0) for m in re.finditer(r"python -m genlib train [^\n`]*", text)
                      if "--data fashion-mnist" in m.group(0)]
    return found


def test_chapters_quote_the_scripts_commands():
    recorded = [without_out(cli.make_parser().parse_args(genlib_arguments(c))) for c in dry_run_commands()]
    quoted = quoted_fashion_commands()
    assert len(quoted) >= 8
    for command in quoted:
        assert without_out(cli.make_parser().parse_args(genlib_arguments(command))) in recorded, command


@pytest.mark.parametrize("name, folder, record, redone", [
    ("ch01_imle_fashion", "ch01_imle_fashion_x", "run.json", False),
    ("ch05_realnvp_fashion", "ch05_realnvp_fashion_x", "run.json", False),
    ("bench", "bench-x", "bench.json", True)])
def test_a_recorded_run_is_not_redone_but_the_benchmark_is(tmp_path, name, folder, record, redone):
    """A run whose folder holds its record is skipped (the script is rerun after an interruption); the benchmark is
    measured again (the code it times changes between leases)."""
    root = tmp_path / "repo"
    (root / "tools").mkdir(parents=True)
    (root / "tools" / "record_full.sh").write_text(SCRIPT.read_text())
    (root / "results" / folder).mkdir(parents=True)
    (root / "results" / folder / record).write_text("{}")
    # python is `false` here: a command that is started fails the script
    result = subprocess.run(["bash", str(root / "tools" / "record_full.sh"), name], capture_output=True, text=True,
                            timeout=60, env={"PATH": "/usr/bin:/bin", "GENLIB_RUN_TAG": "x", "GENLIB_PYTHON": "false"})
    if redone:  # beside the committed record, which stays as it is
        today = time.strftime("%Y%m%d", time.gmtime())
        assert result.returncode != 0 and f"== {name} -> results/{folder}-{today}" in result.stdout
    else:
        assert result.returncode == 0 and "already recorded" in result.stdout


def test_device_check_keeps_to_its_budget_and_packs_nothing_it_did_not_record(tmp_path):
    """With no time left it starts nothing, says so for the tests and every run, and packs no archive."""
    env = {"PATH": "/usr/bin:/bin", "GENLIB_PYTHON": sys.executable, "OUT": str(tmp_path),
           "GENLIB_RUN_TAG": "no-such-tag"}
    result = subprocess.run(["bash", str(ROOT / "tools" / "device_check.sh"), "0"], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "device.log").read_text()
    names = [line.split(":")[0] for line in script("--list").stdout.splitlines()]
    assert "== tests: not started" in log
    assert all(f"== {name}: not started" in log for name in names)
    assert not (tmp_path / "results.tgz").exists()


FAKE_PYTHON = """#!/bin/bash
# Stands in for python on a GPU machine: a `-m genlib` run writes a checkpoint, outlives the deadline and, like
# genlib's fit, answers SIGTERM by finishing its step and saving (here: a second later) before it exits.
if [[ "$1" == "-m" && "$2" == "genlib" ]]; then
  out="${@: -1}"; mkdir -p "$out"; printf 'early weights of %s' "$out" > "$out/checkpoint.pt"
  trap 'sleep 1; printf "weights of %s at the deadline" "$out" > "$out/checkpoint.pt"; exit 143' TERM
  sleep 60 & wait $!
fi
"""


def stopped_run(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    """device_check.sh with 18 s for ch02_dcgan_fashion, run by :data:`FAKE_PYTHON` so that it outlives the deadline
    (``env`` adds variables); (result, its $OUT)."""
    root, out = tmp_path / "repo", tmp_path / "out"
    (root / "tools").mkdir(parents=True)
    out.mkdir()
    for name in ("device_check.sh", "record_full.sh"):
        (root / "tools" / name).write_text((ROOT / "tools" / name).read_text())
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "GENLIB_PYTHON": str(python), "OUT": str(out), "GENLIB_RUN_TAG": "x",
           "MIN_RUN_SECONDS": "1", "TEST_SECONDS": "1000", **env}
    result = subprocess.run(["bash", str(root / "tools" / "device_check.sh"), "18", "ch02_dcgan_fashion"],
                            capture_output=True, text=True, timeout=60, env=env)
    return result, out


def test_device_check_brings_back_the_checkpoint_of_a_run_stopped_at_its_deadline(tmp_path):
    """A run still going at the deadline is stopped, and the checkpoint it saves on the way out comes back in parts
    to resume from."""
    result, out = stopped_run(tmp_path)
    assert result.returncode == 0, result.stderr
    log = (out / "device.log").read_text()
    assert "ch02_dcgan_fashion exit 124" in log and "== ch03_energy_fashion" not in log
    parts = sorted(out.glob("resume.tgz.part-*"))
    assert [part.name for part in parts] == ["resume.tgz.part-0"]
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    subprocess.run(f"cat {' '.join(map(str, parts))} | tar xz -C {unpacked}", shell=True, check=True)
    checkpoint = unpacked / "results" / "ch02_dcgan_fashion_x" / "checkpoint.pt"
    # the save on the way out was waited for
    assert checkpoint.read_text() == "weights of results/ch02_dcgan_fashion_x at the deadline"


def test_device_check_leaves_behind_checkpoints_too_large_to_come_back(tmp_path):
    """Files come back 8 at most, 64 MiB in all: checkpoints over RESUME_MAX_MIB stay, and the log says so."""
    result, out = stopped_run(tmp_path, RESUME_MAX_MIB="0")
    assert result.returncode == 0, result.stderr
    assert not list(out.glob("resume.tgz.part-*"))
    assert "too large to bring back (at most 0 MiB), so these runs must start again" in (out / "device.log").read_text()


def test_device_check_unpacks_the_staged_xz_files_where_genlib_looks(tmp_path):
    """--prepare stages Fashion-MNIST as .xz (what travels has 64 MiB in all); on the GPU machine the files are
    unpacked into $UNPACKED/fashion-mnist and GENLIB_DATA points there."""
    import lzma

    root, seen = tmp_path / "repo", tmp_path / "seen"
    (root / "tools").mkdir(parents=True)
    (root / ".device" / "fashion-mnist").mkdir(parents=True)
    for name in ("device_check.sh", "record_full.sh"):
        (root / "tools" / name).write_text((ROOT / "tools" / name).read_text())
    labels = bytes(range(200))
    (root / ".device" / "fashion-mnist" / "t10k-labels-idx1-ubyte.xz").write_bytes(lzma.compress(labels))
    python = tmp_path / "python"  # the real python, noting where GENLIB_DATA points when torch is first asked
    python.write_text(f'#!/bin/bash\necho "GENLIB_DATA=$GENLIB_DATA" >> {seen}\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "GENLIB_PYTHON": str(python), "OUT": str(tmp_path / "out"),
           "GENLIB_RUN_TAG": "no-such-tag", "UNPACKED": str(tmp_path / "data")}
    result = subprocess.run(["bash", str(root / "tools" / "device_check.sh"), "0"], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "data" / "fashion-mnist" / "t10k-labels-idx1-ubyte").read_bytes() == labels
    assert f"GENLIB_DATA={tmp_path / 'data'}" in seen.read_text().splitlines()