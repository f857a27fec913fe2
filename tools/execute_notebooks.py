"""Re-execute the chapters' notebooks and write their outputs back, deterministically.

    python tools/execute_notebooks.py                 # every notebook in chapters/
    python tools/execute_notebooks.py chapters/01_imle.ipynb

What it guarantees, so that re-running an unchanged notebook gives an (almost) empty diff:
run at GENLIB_SCALE=small on the CPU; the Colab set-up cell rewritten from the one template
below (repository URL read from _config.yml); widget state saved with widget ids renamed to
stable ones; no timing or execution metadata; kernelspec python3; execution counts 1, 2, ...
"""

from __future__ import annotations

import argparse
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
    return f'''# On Colab: install genlib {__version__} from the book's repository (Colab's own torch is kept).
# For the GPU-sized runs: Runtime > Change runtime type > GPU, then set GENLIB_SCALE="full" below.
import os, subprocess, sys
if "google.colab" in sys.modules:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "genlib @ git+{url}@v{__version__}"], check=True)
os.environ.setdefault("GENLIB_SCALE", "small")'''


def set_setup_cell(nb: nbformat.NotebookNode) -> None:
    """Make the first code cell the Colab set-up cell (insert it if missing)."""
    cell = nbformat.v4.new_code_cell(setup_source(), metadata={"tags": [SETUP_TAG]})
    first = next((i for i, c in enumerate(nb.cells) if c.cell_type == "code"), None)
    if first is not None and SETUP_TAG in nb.cells[first].metadata.get("tags", []):
        nb.cells[first].source = cell.source
    else:
        nb.cells.insert(first if first is not None else 0, cell)


def stable_widget_ids(nb: nbformat.NotebookNode, name: str) -> None:
    """Rename every widget model id to one derived from the notebook name and its order of appearance."""
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    text = json.dumps(nb)
    ids = list(dict.fromkeys(re.findall(r"[0-9a-f]{32}", text)))
    known = [i for i in ids if i in state]
    mapping = {old: uuid.UUID(hashlib.md5(f"{name}:{k}".encode()).hexdigest()).hex for k, old in enumerate(known)}
    for old, new in mapping.items():
        text = text.replace(old, new)
    nb.clear()
    nb.update(nbformat.from_dict(json.loads(text)))


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


def execute(path: Path, timeout: int) -> float:
    """Execute one notebook in place; return the wall time in seconds."""
    nb = nbformat.read(path, as_version=4)
    set_setup_cell(nb)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}},
                            store_widget_state=True, record_timing=False)
    began = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - began
    clean_metadata(nb)
    stable_widget_ids(nb, path.stem)
    nbformat.validate(nb)
    nbformat.write(nb, path)
    return elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks to run (default: chapters/*.ipynb)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell")
    args = parser.parse_args(argv)
    os.environ["GENLIB_SCALE"] = "small"
    os.environ.pop("MPLBACKEND", None)
    os.environ.pop("GENLIB_DEVICE", None)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # committed outputs are CPU runs, whatever the machine has
    notebooks = args.notebooks or sorted((ROOT / "chapters").glob("*.ipynb"))
    for path in notebooks:
        print(f"executing {path} ...", flush=True)
        print(f"  done in {execute(path.resolve(), args.timeout):.0f} s", flush=True)


if __name__ == "__main__":
    main()
