"""Shared test set-up."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def pytest_report_header(config) -> list[str]:
    """Say when the chapters' committed outputs were made on a CPU unlike this one: trained numbers depend on the
    CPU's rounding, so strict nbval would then fail on cells whose outputs are right for their own machine."""
    from genlib.runtime import cpu_fingerprint

    here = cpu_fingerprint()
    lines = [f"this machine: {here}"]
    for path in sorted((ROOT / "chapters").glob("*.ipynb")):
        made_on = json.loads(path.read_text()).get("metadata", {}).get("genlib", {}).get("executed_on")
        if made_on != here:
            lines.append(f"WARNING {path.name}'s outputs were made on {made_on or 'an unrecorded CPU'}: strict nbval "
                         "may fail here; re-execute it with tools/execute_notebooks.py and re-read its text "
                         "(tools/output_drift.py lists what changed and where the text quotes it)")
    return lines


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Unit tests run many tiny ops: one torch thread is faster and steadier than several
    (no OpenMP hand-offs, no spin-waiting when the CPU is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def default_matmul_flags():
    """Tests that train through the CLI or the bench turn on TF32 and cuDNN autotuning for the whole process
    (:func:`genlib.runtime.use_fast_matmul`); put the previous flags back, so that every later test on a GPU runs
    with the kernels it was written for, whatever ran before it."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark
    yield
    matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark = saved


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=CUDA)])
def device(request) -> torch.device:
    """Every device a test must pass on: the CPU always, a CUDA GPU where there is one (so the GPU paths are
    checked by the same tests on a machine that has one; CI reports them as skipped)."""
    return torch.device(request.param)


@dataclass
class BookBuild:
    """One `jupyter-book build . -W --keep-going` of the repository into a temporary folder."""
    returncode: int
    log: str
    html: Path  # <path-output>/_build/html

    def __fspath__(self) -> str:
        return str(self.html)


def _run_folder(tmp_path_factory) -> Path:
    """A temporary folder shared by every xdist worker of this test run (the run's own folder without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def book_build(tmp_path_factory) -> BookBuild:
    """Build the book once per test run, shared by all tests of the built HTML (test_book.py, test_browser.py,
    test_api_docs.py): under xdist the first worker to ask builds it, the others wait on the lock and reuse it."""
    run_folder = _run_folder(tmp_path_factory)
    out, record = run_folder / "book", run_folder / "book-build.json"
    with open(run_folder / "book-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not record.exists():
            jupyter_book = shutil.which("jupyter-book") or str(Path(sys.executable).parent / "jupyter-book")
            result = subprocess.run([jupyter_book, "build", str(ROOT), "-W", "--keep-going", "--path-output", str(out)],
                                    capture_output=True, text=True, timeout=1200)
            record.write_text(json.dumps({"returncode": result.returncode, "log": result.stdout + result.stderr}))
        built = json.loads(record.read_text())
    return BookBuild(built["returncode"], built["log"], out / "_build" / "html")


@pytest.fixture(scope="session")
def built_book(book_build) -> Path:
    """The HTML folder of the session's book build; fails the dependent test if the build failed."""
    if book_build.returncode != 0:
        pytest.fail(f"the -W book build failed:\n{book_build.log[-5000:]}", pytrace=False)
    return book_build.html


def workers_of(parent: int) -> list[int]:
    """The pids of the spawned worker processes whose parent is ``parent`` (Linux's /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == parent:  # the field after the state: ppid
                if b"spawn_main" in (stat.parent / "cmdline").read_bytes():
                    found.append(int(stat.parent.name))
    return found


def running(pid: int) -> bool:
    """Whether the process exists and is not a zombie waiting to be reaped."""
    with contextlib.suppress(OSError):
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    return False
