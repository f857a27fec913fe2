"""tools/output_drift.py: after a re-execution, the printed numbers that changed and the text that still quotes them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import output_drift as tool  # noqa: E402


def printing(source: str, text: str, ignored: bool = False) -> nbformat.NotebookNode:
    """A code cell with ``source`` that printed ``text`` (tagged nbval-ignore-output when ``ignored``)."""
    cell = new_code_cell(source, outputs=[new_output("stream", name="stdout", text=text)])
    if ignored:
        cell.metadata["tags"] = [tool.IGNORED]
    return cell


def chapter(*cells: nbformat.NotebookNode) -> nbformat.NotebookNode:
    return new_notebook(cells=list(cells))


def test_numbers_reads_them_as_printed():
    text = "hq 0.219 and 1,024 rows (5%), gap -3e-04 | 10, 20 and 7.82; seed0 x2 1.2.3"
    assert tool.numbers(text) == ["0.219", "1,024", "5", "-3e-04", "10", "20", "7.82"]


def test_a_changed_line_lists_only_the_numbers_that_left_it():
    old = chapter(printing("print(table)", "seed 0: 8/8 modes, hq 0.219\nseed 1: 7/8 modes, hq 0.201\nsteps 500\n"))
    new = chapter(printing("print(table)", "seed 0: 8/8 modes, hq 0.219\nseed 1: 8/8 modes, hq 0.187\nsteps 500\n"))
    [drift] = tool.drifts(old, new)
    assert drift.cell == 0 and drift.old == "seed 1: 7/8 modes, hq 0.201" and drift.gone == ("7", "0.201")
    assert drift.new == "seed 1: 8/8 modes, hq 0.187"


def test_unchanged_code_changed_code_ignored_cells_and_numbers_printed_again():
    old = chapter(printing("a()", "fd 43.6\n"), printing("b()", "fd 52.3\n"),
                  printing("plot()", "wall 134 s\n", ignored=True), printing("c()", "lr 0.01: 0.5\nlr 0.1: 0.4\n"))
    new = chapter(printing("a()", "fd 43.6\n"), printing("b(steps=2)", "fd 40.1\n"),
                  printing("plot()", "wall 227 s\n", ignored=True), printing("c()", "lr 0.01: 0.4\nlr 0.1: 0.5\n"))
    # a(): same output; b(): its code changed, nothing to pair with; plot(): not compared; c(): the two values
    # swapped rows, so each is still printed by the cell and neither is gone
    assert tool.drifts(old, new) == []
    twice = chapter(printing("a()", "fd 43.6\n"), printing("a()", "fd 40.0\n"))  # a second a() has no old twin
    assert tool.drifts(chapter(printing("a()", "fd 43.6\n")), twice) == []
    gone = chapter(printing("a()", "fd 43.6\nkid 0.468\n"))
    assert tool.drifts(gone, chapter(printing("a()", "fd 43.6\n"))) == [tool.Drift(0, "kid 0.468", "", ("0.468",))]


def test_quotes_find_a_number_as_prose_writes_it_and_nothing_that_merely_contains_it():
    changed = [tool.Drift(0, "", "", ("1024", "-0.272", "0.21", "7", "0.187"))]
    text = chapter(new_markdown_cell("All 1,024 queries; the gap was \N{MINUS SIGN}0.272 at the end."),
                   new_markdown_cell("hq 0.215, 10.21, 0.21.5 and v0.21 are other numbers; 7 is too short to look for"),
                   new_markdown_cell("The live table has hq 0.21, on 7 seeds."),
                   new_markdown_cell("PacGAN puts 19 % of its samples on a mode (18.7% to one decimal), not 19."))
    found = tool.quotes(text, changed, width=5)
    assert [(quote.cell, quote.number) for quote in found] == [(0, "-0.272"), (0, "1024"), (2, "0.21"),
                                                               (3, "0.187"), (3, "0.187")]
    assert found[1].context == "All 1,024 quer"


@pytest.fixture
def repository(tmp_path, monkeypatch):
    """A git repository holding one committed chapter whose text quotes its printed FD (43.6)."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    path = tmp_path / "chapters" / "03_x.ipynb"
    path.parent.mkdir()
    nbformat.write(chapter(printing("score()", "FD 43.6, KID 0.468\n"), new_markdown_cell("We reach FD 43.6 here.")),
                   path)
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "chapter"], check=True)
    monkeypatch.setattr(tool, "ROOT", tmp_path)
    return path


def test_the_command_fails_while_the_text_quotes_an_old_number(repository, capsys):
    nb = nbformat.read(repository, as_version=4)
    nb.cells[0].outputs[0].text = "FD 41.9, KID 0.468\n"  # re-executed on another machine
    nbformat.write(nb, repository)
    assert tool.main([str(repository), "--base", "HEAD"]) == 1
    printed = capsys.readouterr().out
    assert "03_x.ipynb: 1 printed line(s) changed, 1 quote(s) of an old number in the text" in printed
    assert "cell 0: FD 43.6, KID 0.468\n        -> FD 41.9, KID 0.468" in printed
    assert "markdown cell 1 quotes 43.6: ...We reach FD 43.6 here...." in printed
    nb.cells[1].source = "We reach FD 41.9 here."  # the text re-read
    nbformat.write(nb, repository)
    assert tool.main([str(repository), "--base", "HEAD"]) == 0
