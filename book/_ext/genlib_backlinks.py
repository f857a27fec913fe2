"""Sphinx extension: link every documented genlib object back to the chapters that use it.

The links are computed, never kept by hand. At build time every chapter notebook
(``genlib_backlinks_notebooks``, a glob relative to the book root) is scanned:

* code cells are parsed with :mod:`ast`; ``import genlib.x [as y]``, ``from genlib import x [as y]``
  and ``from genlib.x import name [as y]`` bind local names, and every dotted use of such a name
  (``imle.nearest_neighbors(...)``, ``flows.RealNVP``, ``fit(...)``) is a use;
* markdown cells count every dotted ``genlib.x.name`` (also inside MyST roles) and every inline code
  span ```x.name``` whose first part is a name the notebook's code cells bound to genlib.

A use counts only if it resolves to a real genlib object, which is then named where it is defined
(``energy.input_gradients`` is ``genlib.gan.input_gradients``). An ``autodoc-process-docstring``
handler appends "Used in: <chapter links>" to the docstring of every object (module, class,
function, method, data) that a chapter uses.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import re
from collections.abc import Iterable
from pathlib import Path

ROOT_PACKAGE = "genlib"

_DOTTED_GENLIB = re.compile(r"(?<![\w.])genlib(?:\.[A-Za-z_]\w*)+")
_CODE_SPAN = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
_NAME_CHAIN = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})")


# --------------------------------------------------------------------------------------
# Reading notebooks
# --------------------------------------------------------------------------------------

def _cells(path: Path) -> list[dict]:
    """The cells of a notebook as plain dicts with ``cell_type`` and ``source`` (a string)."""
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    cells = []
    for cell in nb.get("cells", []):
        source = cell.get("source", "")
        if isinstance(source, list):
            source = "".join(source)
        cells.append({"cell_type": cell.get("cell_type"), "source": source})
    return cells


def _python_source(source: str) -> str:
    """Cell source with IPython-only lines (magics, shell escapes) commented out."""
    lines = []
    for line in source.splitlines():
        stripped = line.lstrip()
        lines.append("#" + line if stripped.startswith(("%", "!", "?")) else line)
    return "\n".join(lines)


def _parse(source: str) -> ast.AST | None:
    try:
        return ast.parse(_python_source(source))
    except SyntaxError:
        return None


def _bindings(tree: ast.AST) -> dict[str, str]:
    """Local names that the import statements in ``tree`` bind to genlib, as full dotted names."""
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == ROOT_PACKAGE or alias.name.startswith(ROOT_PACKAGE + "."):
                    if alias.asname:
                        bound[alias.asname] = alias.name
                    else:  # ``import genlib.imle`` binds ``genlib``
                        bound[alias.name.split(".")[0]] = ROOT_PACKAGE
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == ROOT_PACKAGE or node.module.startswith(ROOT_PACKAGE + "."):
                for alias in node.names:
                    if alias.name != "*":
                        bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return bound


def _dotted(node: ast.AST) -> str | None:
    """``a.b.c`` for a chain of attribute lookups on a plain name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _code_names(tree: ast.AST, bound: dict[str, str]) -> list[str]:
    """Every dotted name in ``tree`` that starts with a genlib-bound name, expanded to ``genlib....``."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Attribute, ast.Name)) and isinstance(node.ctx, ast.Load):
            dotted = _dotted(node)
            if dotted is None:
                continue
            head, _, rest = dotted.partition(".")
            if head in bound:
                names.append(bound[head] + ("." + rest if rest else ""))
    return names


def _markdown_without_fences(source: str) -> str:
    """Markdown with fenced code blocks (```` ``` ```` or ``~~~``) removed: shell commands are not uses."""
    kept, fence = [], None
    for line in source.splitlines():
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match.group(2)[0] * len(match.group(2))
            continue
        if fence is not None:
            if line.strip().startswith(fence) and set(line.strip()) == {fence[0]}:
                fence = None
            continue
        kept.append(line)
    return "\n".join(kept)


def _markdown_names(source: str, bound: dict[str, str]) -> list[str]:
    """Dotted genlib names mentioned in a markdown cell (see the module docstring)."""
    text = _markdown_without_fences(source)
    names = _DOTTED_GENLIB.findall(text)
    for span in _CODE_SPAN.findall(text):
        span = span.strip().lstrip("~")
        match = _NAME_CHAIN.match(span)
        if match is None:
            continue
        dotted = match.group(0)
        head, _, rest = dotted.partition(".")
        if head in bound and head != ROOT_PACKAGE and rest:
            names.append(bound[head] + "." + rest)
    return names


def notebook_names(path: Path, kinds: Iterable[str] = ("code", "markdown")) -> list[str]:
    """Every dotted genlib name (not yet resolved) that a notebook's cells of ``kinds`` use."""
    cells = _cells(path)
    trees = [_parse(c["source"]) for c in cells if c["cell_type"] == "code"]
    bound: dict[str, str] = {}
    for tree in trees:
        if tree is not None:
            bound.update(_bindings(tree))
    names = []
    if "code" in kinds:
        for tree in trees:
            if tree is not None:
                names.extend(_code_names(tree, bound))
    if "markdown" in kinds:
        for cell in cells:
            if cell["cell_type"] == "markdown":
                names.extend(_markdown_names(cell["source"], bound))
    return names


# --------------------------------------------------------------------------------------
# Resolving names to the objects autodoc documents
# --------------------------------------------------------------------------------------

def _canonical(obj: object, owner: str) -> str | None:
    """Where autodoc documents ``obj`` (found as ``owner.<attr>``), or None if it is not genlib's."""
    if inspect.ismodule(obj):
        return obj.__name__ if obj.__name__.startswith(ROOT_PACKAGE) else None
    if isinstance(obj, property):
        obj = obj.fget
    obj = getattr(obj, "__func__", obj)  # bound methods, classmethods
    if inspect.isclass(obj) or inspect.isfunction(obj):
        module = getattr(obj, "__module__", "") or ""
        if module != ROOT_PACKAGE and not module.startswith(ROOT_PACKAGE + "."):
            return None
        return f"{module}.{obj.__qualname__}" if "<locals>" not in obj.__qualname__ else None
    return owner  # module- or class-level data: documented where it was found


def resolve(dotted: str) -> str | None:
    """The canonical name of the genlib object ``dotted`` refers to, or None.

    ``genlib.imle.nearest_neighbors`` -> itself; ``genlib.energy.input_gradients`` ->
    ``genlib.gan.input_gradients`` (imported from there); ``genlib.imle.torch`` -> None.
    Chains that go past an object (``genlib.imle.IMLE.sample.__doc__``) resolve to the longest
    prefix that is still a genlib function, class or module attribute.
    """
    parts = dotted.split(".")
    if parts[0] != ROOT_PACKAGE:
        return None
    obj = importlib.import_module(ROOT_PACKAGE)
    found = ROOT_PACKAGE
    for i, part in enumerate(parts[1:], start=1):
        if not (inspect.ismodule(obj) or inspect.isclass(obj)) or part.startswith("__"):
            break  # attributes of data or functions (``CANDIDATES.items``), dunders (``__main__``)
        if inspect.ismodule(obj) and not hasattr(obj, part):
            try:  # a submodule not imported yet
                importlib.import_module(f"{obj.__name__}.{part}")
            except ImportError:
                break
        if inspect.isclass(obj):
            attr = inspect.getattr_static(obj, part, None)
            if attr is None:
                break
            if isinstance(attr, (staticmethod, classmethod)):
                attr = attr.__func__
        else:
            if not hasattr(obj, part):
                break
            attr = getattr(obj, part)
        name = _canonical(attr, ".".join(parts[: i + 1]))
        if name is None:
            return None if i == 1 or inspect.ismodule(obj) else found
        obj, found = attr, name
    return found if found != ROOT_PACKAGE else None


def notebook_uses(path: Path, kinds: Iterable[str] = ("code", "markdown")) -> set[str]:
    """Canonical names of the genlib modules, classes, functions and data a notebook's cells of ``kinds`` use."""
    uses = set()
    for dotted in notebook_names(path, kinds):
        name = resolve(dotted)
        if name is not None:
            uses.add(name)
    return uses


def uses_by_object(notebooks: dict[str, Path]) -> dict[str, list[str]]:
    """``{canonical name: [docname, ...]}`` for notebooks given as ``{docname: path}`` (docname order)."""
    index: dict[str, list[str]] = {}
    for docname in sorted(notebooks):
        for name in notebook_uses(notebooks[docname]):
            index.setdefault(name, []).append(docname)
    return index


def used_in_lines(docnames: Iterable[str]) -> list[str]:
    """The reST appended to a docstring: a "Used in" paragraph of ``:doc:`` links."""
    links = ", ".join(f":doc:`/{docname}`" for docname in docnames)
    return ["", f"*Used in:* {links}.", ""] if links else []


# --------------------------------------------------------------------------------------
# Sphinx glue
# --------------------------------------------------------------------------------------

def _chapter_notebooks(app) -> dict[str, Path]:
    srcdir = Path(app.srcdir)
    found = app.env.found_docs
    notebooks = {}
    for path in sorted(srcdir.glob(app.config.genlib_backlinks_notebooks)):
        docname = path.relative_to(srcdir).with_suffix("").as_posix()
        if docname in found:  # only pages that are in the book can be linked
            notebooks[docname] = path
    return notebooks


def _index(app) -> tuple[dict[str, list[str]], set[str]]:
    cached = getattr(app, "_genlib_backlinks", None)
    if cached is None:
        notebooks = _chapter_notebooks(app)
        cached = (uses_by_object(notebooks), set(notebooks))
        app._genlib_backlinks = cached
    return cached


def _on_process_docstring(app, what, name, obj, options, lines) -> None:
    index, _ = _index(app)
    docnames = index.get(name)
    if docnames is None and what != "module":
        canonical = _canonical(obj, name)
        docnames = index.get(canonical) if canonical else None
    if docnames:
        lines.extend(used_in_lines(docnames))
        docs = getattr(app.env, "genlib_backlinks_docs", set())
        docs.add(app.env.docname)
        app.env.genlib_backlinks_docs = docs


def _on_get_outdated(app, env, added, changed, removed) -> list[str]:
    """Re-read the API pages whenever a chapter notebook changed, so that the links follow."""
    _, chapters = _index(app)
    if chapters & (set(added) | set(changed) | set(removed)):
        return sorted(getattr(env, "genlib_backlinks_docs", set()))
    return []


def _on_purge_doc(app, env, docname) -> None:
    getattr(env, "genlib_backlinks_docs", set()).discard(docname)


def _on_merge_info(app, env, docnames, other) -> None:
    docs = getattr(env, "genlib_backlinks_docs", set())
    docs |= getattr(other, "genlib_backlinks_docs", set())
    env.genlib_backlinks_docs = docs


def setup(app):
    app.add_config_value("genlib_backlinks_notebooks", "chapters/*.ipynb", "env")
    app.connect("autodoc-process-docstring", _on_process_docstring)
    app.connect("env-get-outdated", _on_get_outdated)
    app.connect("env-purge-doc", _on_purge_doc)
    app.connect("env-merge-info", _on_merge_info)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
