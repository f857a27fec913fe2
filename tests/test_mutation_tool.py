"""tools/mutation_test.py: finds the mutants a test command misses, and always puts the module back."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import running

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "mutation_test.py"

MODULE = '''\
def clamp_positive(x, floor=-7):
    """x if it is positive, else floor."""
    if x > 0:
        return x
    if x is None:
        raise ValueError(f"need a number, got {x + 1}")
    return floor - 0
'''


def run_tool(tmp_path: Path, command: str, *extra: str) -> subprocess.CompletedProcess:
    """The tool on tmp_path/clamp.py with ``command`` as its test."""
    return subprocess.run([sys.executable, str(TOOL), "clamp.py", command, "--repo", str(tmp_path), *extra],
                          capture_output=True, text=True, timeout=120)


def check_command(*cases: tuple[float, float]) -> str:
    """A test command asserting clamp_positive(x) == expected for each case."""
    asserts = "; ".join(f"assert clamp.clamp_positive({x}) == {expected}" for x, expected in cases)
    return f'{sys.executable} -c "import clamp; {asserts}"'


def test_lists_operator_comparison_and_number_mutants_but_not_messages_or_defaults(tmp_path):
    (tmp_path / "clamp.py").write_text(MODULE)
    listed = run_tool(tmp_path, "true", "--list").stdout.splitlines()
    changes = sorted(line.split(" ", 2)[2] for line in listed[:-1])
    # x > 0 (two ways), x is None, floor - 0 (two ways); the raise's f-string (x + 1) and the default -7 are skipped
    assert changes == sorted(["Gt->GtE", "0->1", "Is->IsNot", "Sub->Add", "0->1"])
    assert listed[-1] == "5 mutants" and all(line.startswith("clamp.py:") for line in listed[:-1])


def test_a_weak_test_lets_mutants_survive_and_a_strong_one_kills_them(tmp_path):
    (tmp_path / "clamp.py").write_text(MODULE)
    weak = run_tool(tmp_path, check_command((2, 2), (-1, -7)))
    assert weak.returncode == 1
    survivors = weak.stdout.split("survived\n")[1].split()
    # x >= 0 and x > 1 agree with x > 0 on 2 and -1; so do floor - 0 and floor + 0 (an equivalent mutant)
    assert "3 of 5 survived" in weak.stdout
    assert survivors.count("Gt->GtE") == 1 and survivors.count("0->1") == 1 and survivors.count("Sub->Add") == 1
    strong = run_tool(tmp_path, check_command((2, 2), (-1, -7), (0, -7), (1, 1)), "--only", "clamp_positive",
                      "--lines", "3")
    assert strong.returncode == 0 and "0 of 2 survived" in strong.stdout
    assert (tmp_path / "clamp.py").read_text() == MODULE


def test_a_sigterm_mid_run_puts_the_module_back_and_keeps_the_results_so_far(tmp_path):
    (tmp_path / "clamp.py").write_text(MODULE)
    first, started, saved = tmp_path / "first", tmp_path / "started", tmp_path / "results.json"
    # the first mutant's test fails at once; the second one's hangs until the tool is stopped
    command = f"if [ -e {first} ]; then touch {started}; sleep 30; else touch {first}; false; fi"
    tool = subprocess.Popen([sys.executable, str(TOOL), "clamp.py", command, "--repo", str(tmp_path),
                             "--json", str(saved)], stdout=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not started.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "clamp.py").read_text() != MODULE  # a mutant is in place while its test runs
    tool.send_signal(signal.SIGTERM)
    assert tool.wait(timeout=60) == 143
    assert (tmp_path / "clamp.py").read_text() == MODULE
    assert [r["status"] for r in json.loads(saved.read_text())] == ["killed"]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_timeout_kills_the_whole_test_process_group(tmp_path):
    (tmp_path / "clamp.py").write_text(MODULE)
    pids = tmp_path / "pids"
    # the shell starts a long sleep of its own: a timeout must end it too, not only the shell
    run = run_tool(tmp_path, f"sleep 300 & echo $! >> {pids}; wait", "--lines", "3", "--timeout", "1",
                   "--json", str(tmp_path / "results.json"))
    assert "0 of 2 survived" in run.stdout
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["status"] for r in saved] == ["killed", "killed"] and all(r["seconds"] < 60 for r in saved)
    pids = pids.read_text().split()
    deadline = time.time() + 10  # a killed process is gone once the kernel next schedules it
    while any(map(running, pids)) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(map(running, pids))  # the old tool left both sleeping for 300 s
    assert (tmp_path / "clamp.py").read_text() == MODULE
