"""tools/smoke_full.py: runs a notebook at full scale with training cut short, past errors, and reports them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent


def write_notebook(path: Path, sources: list[str]) -> Path:
    """A notebook of code cells with ``sources``, for the python3 kernel, written to ``path``."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in sources])
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nbformat.write(nb, path)
    return path


def smoke(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "smoke_full.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=180, cwd=ROOT)


def test_smoke_runs_at_full_scale_past_errors_and_timeouts_and_reports_each(tmp_path):
    cells = ["import os\nprint(os.environ['GENLIB_SCALE'], os.environ['GENLIB_MAX_STEPS'])",  # fast: no torch import
             "raise ValueError('boom')",
             "import time\ntime.sleep(60)",
             "print('still running')"]
    result = smoke(write_notebook(tmp_path / "toy.ipynb", cells), "--max-steps", "4", "--timeout", "3",
                   "--out", tmp_path / "out")
    assert result.returncode == 1, result.stderr
    assert "ERROR in code cell #2: ValueError: boom" in result.stdout
    assert "ERROR in code cell #3: KeyboardInterrupt" in result.stdout and "--timeout 3 s" in result.stdout
    assert "#1" not in result.stdout.split("ERROR")[1] and "code cell #4" not in result.stdout
    executed = nbformat.read(tmp_path / "out" / "toy.ipynb", as_version=4)
    assert executed.cells[0].outputs[0]["text"] == "full 4\n"
    assert executed.cells[3].outputs[0]["text"] == "still running\n"
    assert "slowest cells: #3 " in result.stdout  # the sleeping cell, cut at the timeout
    source = nbformat.read(tmp_path / "toy.ipynb", as_version=4)
    assert all(not cell.outputs for cell in source.cells)  # the notebook itself is left as it was


def test_a_kernel_that_dies_ends_its_notebook_with_an_error_and_the_next_notebook_runs(tmp_path):
    dies = write_notebook(tmp_path / "dies.ipynb", ["print('alive')", "import os\nos._exit(1)", "print('never')"])
    result = smoke(dies, write_notebook(tmp_path / "next.ipynb", ["print('next ran')"]), "--out", tmp_path / "out")
    assert result.returncode == 1 and "ERROR in code cell #2: DeadKernelError" in result.stdout, result.stdout
    assert nbformat.read(tmp_path / "out" / "dies.ipynb", as_version=4).cells[0].outputs[0]["text"] == "alive\n"
    assert nbformat.read(tmp_path / "out" / "next.ipynb", as_version=4).cells[0].outputs[0]["text"] == "next ran\n"


def test_small_scale_runs_uncut_and_a_clean_notebook_exits_zero(tmp_path, monkeypatch):
    monkeypatch.setenv("GENLIB_MAX_STEPS", "7")  # one left in the caller's environment must not cut the runs
    cells = ["import os\nprint(os.environ['GENLIB_SCALE'], os.environ.get('GENLIB_MAX_STEPS'))"]
    result = smoke(write_notebook(tmp_path / "toy.ipynb", cells), "--scale", "small", "--out", tmp_path / "out")
    assert result.returncode == 0 and "toy.ipynb: running at small scale ..." in result.stdout, result.stdout
    executed = nbformat.read(tmp_path / "out" / "toy.ipynb", as_version=4)
    assert executed.cells[0].outputs[0]["text"] == "small None\n"
