"""Re-execute the chapters' notebooks and write their outputs back, deterministically.

    python tools/execute_notebooks.py                 # every notebook in chapters/
    python tools/execute_notebooks.py chapters/01_imle.ipynb

What it guarantees, so that re-running an unchanged notebook gives an (almost) empty diff:
run at GENLIB_SCALE=small on the CPU; the Colab set-up cell rewritten from the one template
below (repository URL read from _config.yml); widget state saved with widget ids renamed to
stable ones; no timing or execution metadata; kernelspec python3; execution counts 1, 2, ...;
figures stored as 256-colour PNGs where no pixel moves by more than 16 of 255 levels (genlib.viz.palette_png).
The machine's :func:`genlib.runtime.cpu_fingerprint` goes into the notebook's metadata (``genlib.executed_on``):
trained numbers depend on the CPU's rounding, and the test suite's header says when this machine differs.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import sys
import time
import uuid
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from genlib import __version__  # noqa: E402
from genlib.runtime import cpu_fingerprint  # noqa: E402
from genlib.viz import palette_png  # noqa: E402

SETUP_TAG = "colab-setup"
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def repository_url() -> str:
    """The repository URL, kept in one place: ``repository: url:`` in _config.yml."""
    text = (ROOT / "_config.yml").read_text()
    match = re.search(r"^repository:\s*\n(?:\s+.*\n)*?\s+url:\s*(\S+)", text, re.MULTILINE)
    if not match:
        raise SystemExit("_config.yml has no repository: url: entry")
    return match.group(1)


def setup_source() -> str:
    """The first cell of every chapter: on Colab, install genlib at the book's version."""
    url = repository_url()
    return f'''# On Colab: install genlib {__version__}, pinned to this book's version, from its repository
# (Colab's own torch is kept). GPU-sized runs: Runtime > Change runtime type > GPU, then "full" below.
import os, subprocess, sys
if "google.colab" in sys.modules:
    source = os.environ.get("GENLIB_INSTALL", "genlib @ git+{url}@v{__version__}")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", source], check=True)
os.environ["GENLIB_SCALE"] = os.environ.get("GENLIB_SCALE", "small")'''


def set_setup_cell(nb: nbformat.NotebookNode) -> None:
    """Make the first code cell the Colab set-up cell (insert it if missing)."""
    cell = nbformat.v4.new_code_cell(setup_source(), metadata={"tags": [SETUP_TAG]})
    first = next((i for i, c in enumerate(nb.cells) if c.cell_type == "code"), None)
    if first is not None and SETUP_TAG in nb.cells[first].metadata.get("tags", []):
        nb.cells[first].source = cell.source
    else:
        nb.cells.insert(first if first is not None else 0, cell)


def widget_order(nb: nbformat.NotebookNode, state: dict) -> list[str]:
    """Widget model ids in an order that does not depend on the id values themselves:
    displayed widgets in cell order, then the models they reference (breadth first, keys
    sorted), then unreferenced models (e.g. browser links) sorted by their state."""
    order: list[str] = []
    queue = [o["data"][WIDGET_MIME]["model_id"] for c in nb.cells if c.cell_type == "code"
             for o in c.get("outputs", []) if WIDGET_MIME in o.get("data", {})]
    while queue:
        model = queue.pop(0)
        if model in state and model not in order:
            order.append(model)
            queue += re.findall(r"IPY_MODEL_([0-9a-f]{32})", json.dumps(state[model], sort_keys=True))
    known = {old: f"#{k}" for k, old in enumerate(order)}

    def masked(model: str) -> str:
        text = json.dumps(state[model], sort_keys=True)
        return re.sub(r"[0-9a-f]{32}", lambda m: known.get(m.group(0), "?"), text)

    return order + sorted((m for m in state if m not in known), key=masked)


def stable_widget_ids(nb: nbformat.NotebookNode, name: str) -> None:
    """Rename every widget model id, in one pass, to one derived from the notebook name and its place in
    :func:`widget_order`."""
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    mapping = {old: uuid.UUID(hashlib.md5(f"{name}:{k}".encode()).hexdigest()).hex
               for k, old in enumerate(widget_order(nb, state))}
    text = re.sub(r"[0-9a-f]{32}", lambda m: mapping.get(m.group(0), m.group(0)), json.dumps(nb))
    renamed = nbformat.from_dict(json.loads(text))
    widgets = renamed.metadata.get("widgets", {}).get(WIDGET_STATE, {})
    if "state" in widgets:
        widgets["state"] = dict(sorted(widgets["state"].items()))
    nb.clear()
    nb.update(renamed)


def clean_metadata(nb: nbformat.NotebookNode) -> None:
    """Drop timing/execution metadata, fix the kernelspec and number the executed cells 1, 2, ..."""
    nb.metadata["kernelspec"] = KERNELSPEC
    nb.metadata.get("language_info", {}).pop("version", None)
    count = 0
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        cell.metadata.pop("ExecuteTime", None)
        if cell.cell_type == "code":
            count += 1
            cell.execution_count = count
            for output in cell.get("outputs", []):
                if "execution_count" in output:
                    output["execution_count"] = count


def coalesce_streams(nb: nbformat.NotebookNode) -> None:
    """Join each run of consecutive stdout (or stderr) outputs of a cell into one: how a cell's printing is cut
    into messages depends on its timing (a slow computation between two prints splits them), not on its text."""
    for cell in nb.cells:
        joined: list = []
        for output in cell.get("outputs", []):
            previous = joined[-1] if joined else None
            if (output.output_type == "stream" and previous is not None and previous.output_type == "stream"
                    and previous.name == output.name):
                previous.text += output.text
            else:
                joined.append(output)
        if cell.cell_type == "code":
            cell.outputs = joined


def compact_images(nb: nbformat.NotebookNode) -> None:
    """Re-encode every PNG output and slider frame as :func:`genlib.viz.palette_png`: a quarter of the bytes in the
    repository's history and the book, with full colour kept where a palette would band."""
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if "image/png" in output.get("data", {}):
                output.data["image/png"] = compact_base64(output.data["image/png"])
    for model in nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {}).values():
        if model.get("model_name") == "ImageModel" and model.get("state", {}).get("format") == "png":
            for buffer in model.get("buffers", []):
                if buffer.get("encoding") == "base64":
                    buffer["data"] = compact_base64(buffer["data"])


def compact_base64(data: str) -> str:
    """:func:`genlib.viz.palette_png` of base64 PNG text (as notebooks store images), as base64 text."""
    png = base64.b64decode(data)
    compact = palette_png(png)
    return data if compact is png else base64.b64encode(compact).decode("ascii")


def execute(path: Path, timeout: int, run: bool = True) -> tuple[nbformat.NotebookNode, float]:
    """Execute one notebook (or, with ``run=False``, only redo the clean-up); return it, cleaned up and not yet
    written, and the wall time."""
    nb = nbformat.read(path, as_version=4)
    began = time.perf_counter()
    if run:
        set_setup_cell(nb)
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}},
                                store_widget_state=True, record_timing=False)
        client.execute()
    elapsed = time.perf_counter() - began
    if run:  # strict nbval reproduces these outputs only on a CPU like this one (see tests/conftest.py)
        nb.metadata["genlib"] = {"executed_on": cpu_fingerprint()}
    clean_metadata(nb)
    coalesce_streams(nb)
    compact_images(nb)
    stable_widget_ids(nb, path.stem)
    nbformat.validate(nb)
    return nb, elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks to run (default: chapters/*.ipynb)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell")
    parser.add_argument("--cleanup-only", action="store_true",
                        help="do not execute: only redo the clean-up (metadata, widget ids, figures) of the outputs")
    args = parser.parse_args(argv)
    os.environ["GENLIB_SCALE"] = "small"
    os.environ.pop("MPLBACKEND", None)
    os.environ.pop("GENLIB_DEVICE", None)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # committed outputs are CPU runs, whatever the machine has
    notebooks = args.notebooks or sorted((ROOT / "chapters").glob("*.ipynb"))
    executed = []
    try:
        for path in notebooks:
            print(f"executing {path} ...", flush=True)
            nb, elapsed = execute(path.resolve(), args.timeout, run=not args.cleanup_only)
            executed.append((path, nb))
            print(f"  done in {elapsed:.0f} s", flush=True)
    finally:
        # Written once every notebook has run (or one failed): a notebook rewritten earlier would make git call the
        # tree dirty, and the later chapters' last cell would record their commit as "-dirty".
        for path, nb in executed:
            nbformat.write(nb, path)


if __name__ == "__main__":
    main()
