"""book/performance.md cannot drift from the recorded benchmark.

The page includes its CPU tables from results/bench-cpu/bench.md; bench.md must be exactly what
genlib.bench renders from the committed bench.json, and the provenance that the page states in words
(command, device, threads, versions, load) must be the JSON's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from genlib import bench

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "book" / "performance.md"
RUN = ROOT / "results" / "bench-cpu"


def load() -> tuple[str, dict]:
    return PAGE.read_text(encoding="utf-8"), json.loads((RUN / "bench.json").read_text())


def test_committed_table_is_rendered_from_the_committed_json():
    _, report = load()
    assert (RUN / "bench.md").read_text(encoding="utf-8") == bench.render_markdown(report)


def test_page_includes_both_cpu_tables_from_the_committed_run():
    page, report = load()
    includes = re.findall(r"```\{include\} (\S+)\n((?::[\w-]+: .*\n)*)```", page)
    assert [(ROOT / "book" / path).resolve() for path, _ in includes] == [(RUN / "bench.md").resolve()] * 2
    text = (RUN / "bench.md").read_text(encoding="utf-8")
    for _, options in includes:  # every start/end marker exists in the included file
        for marker in re.findall(r":(?:start-after|end-before): \"(.*)\"", options):
            assert marker.encode().decode("unicode_escape") in text, marker
    assert report["training_resolution"] == 64 and {row["batch"] for row in report["training"]} == {16}
    assert "(64×64, batch 16)" in page


def test_page_states_the_runs_provenance():
    page, report = load()
    flat = " ".join(page.split())  # wherever the lines break
    run = report["provenance"]
    assert run["device"] == "cpu"
    assert f"python -m genlib {run['command'].split(' ', 1)[1]}\n" in page  # the exact command, as run
    assert f"`{run['device_name']}`" in flat
    assert f"Torch used {run['torch_threads']} threads" in flat
    assert f"torch `{run['torch_version']}`" in flat and f"Python `{run['python_version']}`" in flat
    assert f"genlib `{run['genlib_version']}`" in flat
    assert f"The whole run took {run['wall_s']:.0f} s ({run['wall_s'] / 60:.1f} minutes)" in flat
    share = {key: f"{100 * value:.1f} %" for key, value in run["cpu_share"].items()}
    assert (f"this process {share['this_process']}, other processes {share['other_processes']}, "
            f"idle {share['idle']}, taken by the hypervisor {share['steal']}") in flat
    assert "No GPU figures have been recorded yet" in flat
    assert "python -m genlib bench --device cuda --out results/bench-h100" in page


def test_every_number_in_the_cpu_tables_is_the_jsons():
    """The included tables, parsed back: each cell equals the JSON value formatted by bench.format_number."""
    _, report = load()
    rows = [line for line in (RUN / "bench.md").read_text().splitlines() if line.startswith("| ")]
    tables = [report["nearest_neighbors"], report["training"]]
    cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]
    headers = [i for i, row in enumerate(cells) if row[0] in ("M", "model")]
    assert len(headers) == 2
    for table, start in zip(tables, headers):
        keys = cells[start]
        for row, line in zip(table, cells[start + 1:start + 1 + len(table)]):
            assert line == [bench.format_number(row.get(key)) for key in keys]
    for row in report["nearest_neighbors"]:
        assert row["agrees_with_float64"] == 1.0, "the exact search must agree with float64 everywhere"
