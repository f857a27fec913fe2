"""The API reference: the backlink scanner (book/_ext/genlib_backlinks.py), docstrings of what the chapters
use, and (with a built book) the links between chapters and API entries in both directions."""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "book" / "_ext"))
import genlib_backlinks as backlinks  # noqa: E402

CHAPTERS = sorted((ROOT / "chapters").glob("[0-9][0-9]_*.ipynb"))


def write_notebook(path: Path, cells) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
                for kind, src in cells]
    nbformat.write(nb, path)
    return path


@pytest.fixture
def fake_notebook(tmp_path):
    return write_notebook(tmp_path / "fake.ipynb", [
        ("md", "# A chapter\n\nIt uses `imle.match` and {py:func}`~genlib.gan.optimal_discriminator`; "
               "`numpy.mean` and `data.toy` are not genlib here.\n\n"
               "```bash\npython -m genlib train imle --out results/genlib.imle.GLO\n```"),
        ("code", "%matplotlib inline\nimport numpy as np\nimport torch\n"
                 "from genlib import imle, energy\nimport genlib.flows as fl\nfrom genlib.train import fit\n"
                 "data = {'toy': 1}"),
        ("code", "flow = fl.RealNVP(2)\n_, index = imle.nearest_neighbors(torch.zeros(3, 2), torch.ones(4, 2))\n"
                 "g = energy.input_gradients\nfit\nnp.mean([1.0])\ndata['toy']\nimle.torch.zeros(1)\n"
                 "imle.IMLE.attach_ema"),
    ])


def test_scanner_finds_genlib_uses_in_code_and_markdown(fake_notebook):
    uses = backlinks.notebook_uses(fake_notebook)
    expected = {
        "genlib.imle", "genlib.energy",              # the modules themselves
        "genlib.imle.nearest_neighbors",             # module.attr after `from genlib import imle`
        "genlib.flows.RealNVP",                      # through an `import ... as` alias
        "genlib.train.fit",                          # a name imported from a genlib module
        "genlib.gan.input_gradients",                # re-exported by energy: named where it is defined
        "genlib.imle.match",                         # markdown code span, first part bound by the code
        "genlib.gan.optimal_discriminator",          # markdown MyST role
        "genlib.train.GenerativeModel.attach_ema",   # an inherited method, named where it is defined
        "genlib.imle.IMLE",
    }
    assert expected <= uses, expected - uses


def test_scanner_ignores_names_that_are_not_genlib(fake_notebook):
    uses = backlinks.notebook_uses(fake_notebook)
    assert all(name.startswith("genlib.") for name in uses)
    # torch reached through a genlib module, a local `data` dict, numpy, and a shell command in a fence
    assert not any("torch" in name or "numpy" in name for name in uses)
    assert "genlib.data" not in uses and "genlib.data.toy" not in uses
    assert "genlib.imle.GLO" not in uses


def test_resolve_and_used_in_lines():
    assert backlinks.resolve("genlib.imle.nearest_neighbors") == "genlib.imle.nearest_neighbors"
    assert backlinks.resolve("genlib.energy.input_gradients") == "genlib.gan.input_gradients"
    assert backlinks.resolve("genlib.imle.torch") is None
    assert backlinks.resolve("genlib.no_such_module.x") is None
    assert backlinks.resolve("numpy.mean") is None
    assert backlinks.used_in_lines(["chapters/01_imle", "chapters/05_flows"]) == [
        "", "*Used in:* :doc:`/chapters/01_imle`, :doc:`/chapters/05_flows`.", ""]
    assert backlinks.used_in_lines([]) == []


def test_uses_by_object_lists_chapters_in_order(tmp_path):
    a = write_notebook(tmp_path / "a.ipynb", [("code", "from genlib import imle\nimle.match")])
    b = write_notebook(tmp_path / "b.ipynb", [("code", "import genlib.imle\ngenlib.imle.match")])
    index = backlinks.uses_by_object({"chapters/02_b": b, "chapters/01_a": a})
    assert index["genlib.imle.match"] == ["chapters/01_a", "chapters/02_b"]


def _object(canonical: str):
    parts = canonical.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            obj = inspect.getattr_static(obj, part) if inspect.isclass(obj) else getattr(obj, part)
        return obj
    raise LookupError(canonical)


def _own_docstring(obj) -> str:
    """The object's own docstring (not inherited, not a dataclass's generated signature)."""
    obj = getattr(obj, "__func__", obj)
    if isinstance(obj, property):
        obj = obj.fget
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    if inspect.isclass(obj) and doc and doc.startswith(obj.__name__ + "("):  # dataclass default
        doc = None
    return (doc or "").strip()


def test_every_genlib_function_and_class_a_chapter_uses_has_a_docstring():
    assert CHAPTERS
    used = set()
    for notebook in CHAPTERS:
        used |= backlinks.notebook_uses(notebook)
    callables = {name for name in used
                 if inspect.isclass(obj := _object(name)) or callable(getattr(obj, "__func__", obj))}
    assert len(callables) > 50  # the chapters use most of genlib
    missing = sorted(name for name in callables
                     if not any(p.startswith("_") for p in name.split(".")) and not _own_docstring(_object(name)))
    assert not missing, f"used by a chapter but without a docstring: {missing}"


_ROLE = re.compile(r"\{py:(?:func|class|meth|mod|attr|data)\}`(?:[^`<]*<\s*)?~?([\w.]+)>?`")


@pytest.mark.parametrize("notebook", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_text_links_every_genlib_function_and_class_its_code_calls(notebook):
    """CONTRIBUTING: a chapter's markdown links (a MyST py role) everything of genlib its code cells call."""
    called = {name for name in backlinks.notebook_uses(notebook, kinds=("code",))
              if not any(p.startswith("_") for p in name.split("."))
              and (inspect.isclass(obj := _object(name)) or inspect.isfunction(getattr(obj, "__func__", obj)))}
    markdown = "\n".join(cell.source for cell in nbformat.read(notebook, as_version=4).cells
                         if cell.cell_type == "markdown")
    linked = {backlinks.resolve(target) for target in _ROLE.findall(markdown)}
    missing = sorted(called - linked)
    assert not missing, f"{notebook.stem} calls these without linking them from its text: {missing}"


# --------------------------------------------------------------------------------------------------------------
# Checks on the built HTML book. They need the book built with `jupyter-book build . -W`; the book-building
# session fixture `built_book` provides it (see tests/conftest.py).
# --------------------------------------------------------------------------------------------------------------

def _html_dir(built) -> Path:
    built = Path(built)
    for candidate in (built, built / "html", built / "_build" / "html"):
        if (candidate / "book" / "api.html").exists() or (candidate / "index.html").exists():
            return candidate
    raise AssertionError(f"no built HTML book under {built}")


def check_api_docs(html: Path) -> None:
    """The API page documents genlib, chapter 1 links to an entry, and the entry links back to chapter 1."""
    api = (html / "book" / "api.html").read_text(encoding="utf-8")
    for anchor in ("genlib.imle.nearest_neighbors", "genlib.imle.IMLE", "genlib.gan.optimal_discriminator",
                   "genlib.flows.RealNVP", "genlib.train.fit", "module-genlib.runtime"):
        assert f'id="{anchor}"' in api, f"{anchor} is not documented on the API page"
    chapter1 = (html / "chapters" / "01_imle.html").read_text(encoding="utf-8")
    assert 'href="../book/api.html#genlib.imle.nearest_neighbors"' in chapter1
    entry = api[api.index('id="genlib.imle.nearest_neighbors"'):]
    entry = entry[:entry.index("</dd></dl>")]
    assert re.search(r'Used in:</em>\s*<a class="reference internal" href="\.\./chapters/01_imle\.html">', entry), \
        "the API entry of nearest_neighbors does not link back to chapter 1"
    # every chapter links to the API page, and the API page links to every chapter
    for notebook in CHAPTERS:
        page = (html / "chapters" / f"{notebook.stem}.html").read_text(encoding="utf-8")
        assert 'href="../book/api.html#genlib.' in page, f"{notebook.stem} has no link to the API page"
        assert f'href="../chapters/{notebook.stem}.html"' in api, f"no API entry links back to {notebook.stem}"


@pytest.mark.slow
def test_api_page_and_links_in_both_directions(built_book):
    check_api_docs(_html_dir(built_book))
