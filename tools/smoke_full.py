"""Smoke-test the chapters' full-scale path: run each notebook at GENLIB_SCALE=full with every training run cut short.

    python tools/smoke_full.py                            # every chapter, 20 steps per training run
    python tools/smoke_full.py chapters/02_gan_js.ipynb --max-steps 5 --out /tmp/smoke
    python tools/smoke_full.py --scale small              # as CI runs them, uncut: another environment's errors

A reader who turns "small" into "full" on a Colab GPU runs code paths that CI (GENLIB_SCALE=small) never does:
wider networks, the full datasets, more samples to score. This runs them all in minutes, with
``GENLIB_MAX_STEPS`` cutting every :func:`genlib.train.fit` call (so the numbers it prints mean nothing), and
reports every cell that raised and the slowest cells. The committed notebooks are never touched: the executed
copies go to ``--out``. It runs on whatever device torch finds (``GENLIB_DEVICE`` chooses); exit status 1 if a
cell raised, timed out or killed its kernel (a dead kernel ends that notebook; the next one runs). Expected
errors, which also make the status 1: a cell that reads a run's log at a fixed step, or the snapshots it records
every so many steps, finds too few of them in a run cut short (a KeyError, an IndexError, max() of an empty
sequence). On a CPU everything lives on one device, so a tensor left off the GPU shows only in a run on the GPU.
``--scale small`` runs the chapters as CI does, nothing cut, to find the cells another environment breaks
(tools/check_min_versions.sh runs it under the oldest packages requirements.txt allows).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import DeadKernelError

ROOT = Path(__file__).resolve().parent.parent


def cell_errors(code_cells: list[nbformat.NotebookNode]) -> list[tuple[int, str]]:
    """(code cell number, 'ErrorName: message') of every code cell whose outputs hold an error."""
    return [(number, f"{output['ename']}: {output['evalue']}"[:300])
            for number, cell in enumerate(code_cells, 1) for output in cell.get("outputs", [])
            if output.get("output_type") == "error"]


def first_line(cell: nbformat.NotebookNode) -> str:
    """A cell's first non-blank source line, cut to 70 characters."""
    return next((line for line in cell.source.splitlines() if line.strip()), "")[:70]


def smoke(path: Path, out: Path, timeout: int) -> tuple[list[tuple[int, str]], list[tuple[float, int, str]], float]:
    """Execute one notebook into ``out``, going on past errors (a cell over ``timeout`` seconds is interrupted)
    and printing each code cell's time as it ends; return its errors, its cells' times ``(seconds, code cell
    number, first source line)`` slowest first, and the total seconds."""
    nb = nbformat.read(path, as_version=4)
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    numbers = {id(cell): number for number, cell in enumerate(code_cells, 1)}
    times: list[tuple[float, int, str]] = []
    started, current = [0.0], [0]

    def on_start(cell, **_):
        started[0], current[0] = time.perf_counter(), numbers.get(id(cell), current[0])

    def on_executed(cell, **_):
        seconds = time.perf_counter() - started[0]
        times.append((seconds, numbers[id(cell)], first_line(cell)))
        print(f"    #{numbers[id(cell)]} {seconds:.0f} s  {first_line(cell)}", flush=True)

    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True, interrupt_on_timeout=True,
                            resources={"metadata": {"path": str(path.parent)}}, on_cell_start=on_start,
                            on_cell_executed=on_executed)
    began = time.perf_counter()
    died = []
    try:
        client.execute()
    except DeadKernelError as error:  # out of host memory, say: the cells after it cannot run in that kernel
        died = [(current[0], f"DeadKernelError: {error}"[:300])]
    total = time.perf_counter() - began
    out.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out / path.name)
    return cell_errors(code_cells) + died, sorted(times, reverse=True), total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks (default: chapters/*.ipynb)")
    parser.add_argument("--max-steps", type=int, default=20, help="steps each training run is cut to (full scale)")
    parser.add_argument("--scale", choices=("full", "small"), default="full",
                        help="GENLIB_SCALE to run at; small runs every training run uncut")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell")
    parser.add_argument("--out", type=Path, default=ROOT / "_build" / "smoke-full",
                        help="folder for the executed copies")
    parser.add_argument("--slowest", type=int, default=5, help="how many of each notebook's slowest cells to list")
    args = parser.parse_args(argv)
    if args.max_steps < 1:
        parser.error("--max-steps must be >= 1")
    os.environ["GENLIB_SCALE"] = args.scale
    if args.scale == "full":
        os.environ["GENLIB_MAX_STEPS"] = str(args.max_steps)
        how = f"at full scale, training cut to {args.max_steps} steps"
    else:
        os.environ.pop("GENLIB_MAX_STEPS", None)
        how = "at small scale"
    failed = False
    for path in args.notebooks or sorted((ROOT / "chapters").glob("*.ipynb")):
        print(f"{path.name}: running {how} ...", flush=True)
        errors, times, total = smoke(path.resolve(), args.out, args.timeout)
        print(f"  {total:.0f} s; slowest cells: "
              + "; ".join(f"#{number} {seconds:.0f} s ({line})" for seconds, number, line in times[:args.slowest]))
        for number, message in errors:
            cut = f" (cut at --timeout {args.timeout} s)" if message.startswith("KeyboardInterrupt") else ""
            print(f"  ERROR in code cell #{number}: {message}{cut}", flush=True)
        failed |= bool(errors)
    print(f"executed copies in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
