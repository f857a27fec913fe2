"""The house style that review alone kept letting slip: source lines fit the project's width (the chapters' code too:
the book shows it, and a wider line scrolls), and every genlib function states the types it takes and returns (the
API page prints them)."""

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 120
PYTHON_SOURCES = sorted(path for folder in ("genlib", "tests", "tools", "book/_ext")
                        for path in (ROOT / folder).rglob("*.py"))


def too_long(source: str) -> list[tuple[int, int]]:
    """(line number, length) of each line of ``source`` wider than :data:`WIDTH` characters."""
    return [(number, len(line)) for number, line in enumerate(source.splitlines(), 1) if len(line) > WIDTH]


CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))


def chapter_code(path: Path) -> str:
    """The code cells of notebook ``path``, one after the other."""
    cells = json.loads(path.read_text())["cells"]
    return "\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "code")


def unannotated(source: str) -> list[tuple[int, str]]:
    """(line number, name) of each function in ``source`` with a parameter (not self/cls) or a return (not
    ``__init__``'s) left without a type annotation."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            params = [arg for arg in args.posonlyargs + args.args + args.kwonlyargs if arg.arg not in ("self", "cls")]
            params += [arg for arg in (args.vararg, args.kwarg) if arg is not None]
            if any(arg.annotation is None for arg in params) or (node.returns is None and node.name != "__init__"):
                found.append((node.lineno, node.name))
    return sorted(found)


def test_the_sources_are_found():
    names = {str(path.relative_to(ROOT)) for path in PYTHON_SOURCES}
    assert {"genlib/train.py", "tests/test_style.py", "tools/execute_notebooks.py"} <= names
    assert len(CHAPTERS) == 5 and "import" in chapter_code(CHAPTERS[0])


@pytest.mark.parametrize("path", PYTHON_SOURCES, ids=lambda path: str(path.relative_to(ROOT)))
def test_no_source_line_is_wider_than_the_project_width(path):
    assert too_long(path.read_text()) == []


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda path: path.name)
def test_no_chapter_code_line_is_wider_than_the_project_width(path):
    assert too_long(chapter_code(path)) == []


def test_every_genlib_function_is_annotated():
    found = {str(path.relative_to(ROOT)): unannotated(path.read_text()) for path in (ROOT / "genlib").glob("*.py")}
    assert {name: functions for name, functions in found.items() if functions} == {}


def test_the_checks_catch_what_they_look_for():
    source = ("def typed(x: int, *rest: str, **kw: float) -> int:\n    return x\n\n\n"
              "class C:\n    def __init__(self, n: int):\n        self.n = n\n\n"
              "    def method(self, y) -> None:\n        pass\n\n\n"
              "def untyped_return(x: int):\n    return x\n\n\n"
              "def untyped_varargs(*rest) -> None:\n    pass\n" + "#" * WIDTH + "\n" + "#" * (WIDTH + 1) + "\n")
    assert unannotated(source) == [(9, "method"), (13, "untyped_return"), (17, "untyped_varargs")]
    assert too_long(source) == [(20, WIDTH + 1)]
