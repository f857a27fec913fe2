"""Notebook hygiene: what the re-execution tool guarantees is really in the committed notebooks."""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import execute_notebooks as tool  # noqa: E402

NOTEBOOKS = sorted((ROOT / "chapters").glob("*.ipynb"))
UNSTABLE_MIMES = ("image/png", "image/svg+xml", tool.WIDGET_MIME)


def read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def tags(cell) -> list[str]:
    return cell.metadata.get("tags", [])


def test_there_is_a_chapter_notebook():
    assert NOTEBOOKS, "chapters/ holds no notebook"


def test_every_chapter_in_the_toc_exists_and_every_notebook_is_listed():
    toc = (ROOT / "_toc.yml").read_text()
    listed = set(re.findall(r"^\s*-\s*file:\s*(chapters/\S+)", toc, re.MULTILINE))
    assert listed == {f"chapters/{p.stem}" for p in NOTEBOOKS}


@pytest.fixture(params=NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def notebook(request):
    return request.param, read(request.param)


def test_executed_in_order_without_errors(notebook):
    path, nb = notebook
    cells = code_cells(nb)
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1)), f"{path.name}: re-run the tool"
    for cell in cells:
        assert all(o.output_type != "error" for o in cell.outputs), f"{path.name}: error output in {cell.source[:60]!r}"
        assert "execution" not in cell.metadata and "ExecuteTime" not in cell.metadata


def test_kernelspec_and_setup_cell(notebook):
    path, nb = notebook
    assert nb.metadata.kernelspec == tool.KERNELSPEC
    first = code_cells(nb)[0]
    assert tool.SETUP_TAG in tags(first) and first.source == tool.setup_source(), \
        f"{path.name}: first cell is not the current Colab set-up cell; re-run tools/execute_notebooks.py"


def test_states_it_ran_at_small_scale(notebook):
    path, nb = notebook
    texts = [o.get("text", "") for c in code_cells(nb)[:4] for o in c.outputs if o.output_type == "stream"]
    assert any(t.startswith("scale=small | device=cpu") for t in texts), \
        f"{path.name}: no 'scale=small | device=cpu' line near the top"


def test_unstable_outputs_are_tagged_and_numbers_are_checked(notebook):
    path, nb = notebook
    checked_numbers = 0
    for cell in code_cells(nb):
        mimes = {m for o in cell.outputs for m in o.get("data", {})}
        stderr = any(o.output_type == "stream" and o.name == "stderr" for o in cell.outputs)
        ignored = "nbval-ignore-output" in tags(cell)
        if mimes & set(UNSTABLE_MIMES) or stderr:
            assert ignored, f"{path.name}: tag nbval-ignore-output on the cell {cell.source[:60]!r}"
        elif not ignored and any(re.search(r"\d\.\d", o.get("text", "")) for o in cell.outputs):
            checked_numbers += 1
    assert checked_numbers >= 3, f"{path.name}: fewer than 3 cells print numbers that nbval checks"


def test_widget_state_is_saved_with_stable_ids(notebook):
    path, nb = notebook
    views = [o.data[tool.WIDGET_MIME]["model_id"] for c in code_cells(nb) for o in c.outputs
             if tool.WIDGET_MIME in o.get("data", {})]
    state = nb.metadata.get("widgets", {}).get(tool.WIDGET_STATE, {}).get("state", {})
    assert all(v in state for v in views), f"{path.name}: a displayed widget has no saved state"
    again = copy.deepcopy(nb)
    tool.stable_widget_ids(again, path.stem)
    assert json.dumps(again, sort_keys=True) == json.dumps(nb, sort_keys=True), \
        f"{path.name}: widget ids are not the stable ones; re-run tools/execute_notebooks.py"


def test_figures_are_stored_compact(notebook):
    path, nb = notebook
    again = copy.deepcopy(nb)
    tool.compact_images(again)
    assert json.dumps(again, sort_keys=True) == json.dumps(nb, sort_keys=True), \
        f"{path.name}: a figure is not the compact PNG; re-run tools/execute_notebooks.py (--cleanup-only will do)"


def test_tool_compacts_outputs_and_slider_frames_but_leaves_what_would_band():
    import base64
    import io

    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=60)
    plt.close(fig)
    plot = base64.b64encode(buffer.getvalue()).decode()
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buffer, format="png")
    noise = base64.b64encode(buffer.getvalue()).decode()
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell("plot", outputs=[nbformat.v4.new_output(
        "display_data", data={"image/png": image}) for image in (plot, noise)]))
    frame = {"model_name": "ImageModel", "state": {"format": "png"},
             "buffers": [{"data": plot, "encoding": "base64", "path": ["value"]}]}
    nb.metadata["widgets"] = {tool.WIDGET_STATE: {"state": {"c" * 32: frame}}}
    tool.compact_images(nb)
    frame = nb.metadata["widgets"][tool.WIDGET_STATE]["state"]["c" * 32]  # the notebook holds a copy
    stored = [o.data["image/png"] for o in nb.cells[0].outputs] + [frame["buffers"][0]["data"]]
    modes = [Image.open(io.BytesIO(base64.b64decode(image))).mode for image in stored]
    assert modes == ["P", "RGB", "P"] and stored[1] == noise and len(stored[0]) < len(plot)


def test_tool_renames_widget_ids_deterministically():
    nb = nbformat.v4.new_notebook()
    ids = ["a" * 32, "b" * 32]
    nb.metadata["widgets"] = {tool.WIDGET_STATE: {"state": {i: {"state": {"children": [f"IPY_MODEL_{ids[1]}"]}}
                                                            for i in ids}, "version_major": 2}}
    nb.cells.append(nbformat.v4.new_code_cell("w", outputs=[nbformat.v4.new_output(
        "display_data", data={tool.WIDGET_MIME: {"model_id": ids[0]}})]))
    first, second = copy.deepcopy(nb), copy.deepcopy(nb)
    tool.stable_widget_ids(first, "x")
    second.metadata["widgets"][tool.WIDGET_STATE]["state"] = dict(
        reversed(list(second.metadata["widgets"][tool.WIDGET_STATE]["state"].items())))
    text = json.dumps(first)
    assert ids[0] not in text and ids[1] not in text
    new_view = first.cells[0].outputs[0].data[tool.WIDGET_MIME]["model_id"]
    assert new_view in first.metadata["widgets"][tool.WIDGET_STATE]["state"]


def test_clean_metadata_numbers_cells_and_drops_timings():
    nb = nbformat.v4.new_notebook()
    timing = {"execution": {"iopub.status.busy": "2026-01-01T00:00:00Z"}}
    nb.cells = [nbformat.v4.new_code_cell("1", execution_count=7, metadata=timing),
                nbformat.v4.new_markdown_cell("m"), nbformat.v4.new_code_cell("2", execution_count=9)]
    tool.clean_metadata(nb)
    assert [c.get("execution_count") for c in nb.cells] == [1, None, 2]
    assert "execution" not in nb.cells[0].metadata and nb.metadata.kernelspec["name"] == "python3"


def test_coalesce_streams_joins_consecutive_prints_of_one_stream_only():
    out = nbformat.v4.new_output
    cell = nbformat.v4.new_code_cell("x", outputs=[
        out("stream", name="stdout", text="a\n"), out("stream", name="stdout", text="b\n"),
        out("stream", name="stderr", text="warn\n"), out("stream", name="stdout", text="c\n"),
        out("display_data", data={"text/plain": "plot"}), out("stream", name="stdout", text="d\n")])
    nb = nbformat.v4.new_notebook()
    nb.cells = [cell]
    tool.coalesce_streams(nb)
    assert [(o.output_type, o.get("name"), o.get("text")) for o in nb.cells[0].outputs] == [
        ("stream", "stdout", "a\nb\n"), ("stream", "stderr", "warn\n"), ("stream", "stdout", "c\n"),
        ("display_data", None, None), ("stream", "stdout", "d\n")]


@pytest.mark.parametrize("failing", [None, "b.ipynb"])
def test_the_tool_writes_the_notebooks_once_all_have_run_or_one_failed(tmp_path, monkeypatch, failing):
    """A notebook written before the next one runs would make the next one's record of the commit "-dirty"."""
    for name in ("CUDA_VISIBLE_DEVICES", "GENLIB_SCALE", "MPLBACKEND", "GENLIB_DEVICE"):  # main() sets them
        monkeypatch.setenv(name, "")
    paths = [tmp_path / name for name in ("a.ipynb", "b.ipynb", "c.ipynb")]
    for path in paths:
        nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1")]), path)
    events = []

    def execute(path: Path, timeout: int, run: bool):
        events.append(("run", path.name))
        if path.name == failing:
            raise RuntimeError("a cell failed")
        return read(path), 0.0

    monkeypatch.setattr(tool, "execute", execute)
    monkeypatch.setattr(tool.nbformat, "write", lambda nb, path: events.append(("write", Path(path).name)))
    if failing:
        with pytest.raises(RuntimeError, match="a cell failed"):
            tool.main([str(path) for path in paths])
        assert events == [("run", "a.ipynb"), ("run", "b.ipynb"), ("write", "a.ipynb")]  # the one done is kept
    else:
        tool.main([str(path) for path in paths])
        assert events == [("run", name) for name in ("a.ipynb", "b.ipynb", "c.ipynb")] + [
            ("write", name) for name in ("a.ipynb", "b.ipynb", "c.ipynb")]


SOLUTION = re.compile(r":::\{admonition\} Solution\s*\n:class: dropdown\n(.*?)\n:::", re.S)
GENLIB_MODULES = r"(?:imle|gan|energy|dae|flows|metrics|g?data|features|evaluate|results)"
GENLIB_CALL = re.compile(rf"\bgenlib\.{GENLIB_MODULES}\.[a-z_]\w*|\b{GENLIB_MODULES}\.[a-z_]\w*\(")


EXERCISES = re.compile(r"^## (?:[\d.]+ )?Exercises$", re.M)
SUMMARY = re.compile(r"^## (?:[\d.]+ )?Summary$", re.M)


def exercise_cells(nb) -> list:
    """The cells from the one with the exercises' heading to the one with the summary's (which may share a cell)."""
    first = next(i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and EXERCISES.search(c.source))
    last = next(i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and SUMMARY.search(c.source))
    return nb.cells[first:last + 1]


def test_follows_the_chapter_template(notebook):
    """Title first, then the set-up cell; a widget; at least 3 exercises with hidden solutions, one of them
    checked by a genlib function; the reproducibility footer last (CONTRIBUTING.md, 'The template')."""
    path, nb = notebook
    assert nb.cells[0].cell_type == "markdown" and re.match(r"# \d+\. ", nb.cells[0].source), \
        f"{path.name}: the first cell must be the chapter title"
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    solutions = SOLUTION.findall(markdown)
    assert len(solutions) >= 3, f"{path.name}: {len(solutions)} exercises with a dropdown solution, want >= 3"
    cells = exercise_cells(nb)
    exercises = "\n".join(c.source for c in cells if c.cell_type == "markdown")
    exercises = exercises[EXERCISES.search(exercises).start():SUMMARY.search(exercises).start()]
    assert len(SOLUTION.findall(exercises)) >= 3, f"{path.name}: fewer than 3 solutions in the exercises section"
    assert GENLIB_CALL.search(exercises), f"{path.name}: no exercise is checked by a genlib function"
    shown = [c.id for c in cells if c.cell_type == "code" and "hide-cell" not in tags(c)]
    assert not shown, f"{path.name}: exercise check cells {shown} show their answers (tag them hide-cell)"
    widgets = [c for c in code_cells(nb) if "frame_slider(" in c.source
               and any(tool.WIDGET_MIME in o.get("data", {}) for o in c.outputs)]
    assert widgets, f"{path.name}: no interactive widget (genlib.viz.frame_slider) with saved output"
    last = code_cells(nb)[-1]
    assert "results.footer(" in last.source and "nbval-ignore-output" in tags(last), \
        f"{path.name}: the last code cell must print the reproducibility footer"
