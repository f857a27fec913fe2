"""Sphinx extension: write every script of a page once.

Why scripts came out twice. Sphinx 7.4 (jupyter-book 1.x pins ``sphinx~=7.0``) registers a script added by
``app.add_js_file(None, body=...)`` in two places: in the registry, and, when the HTML builder already
exists, directly in the builder with ``filename=None``. When the builder starts writing it adds every
registry script once more, now with ``filename=''``. The builder skips a script it already has, but
``_JavaScript(None, body=b) != _JavaScript('', body=b)``, so every inline script registered after the
builder started is written twice. sphinx-thebe registers ``const THEBE_JS_URL = ...`` that way (in
``env-before-read-docs``), and the second copy fails in the browser with "Identifier 'THEBE_JS_URL' has
already been declared". Sphinx fixed this in sphinx-doc/sphinx#13402 (``None`` becomes ``''`` before the
builder sees it), in a release jupyter-book 1.x cannot use.

The fix here: an ``html-page-context`` handler, run after every other handler, drops each script that
equals an earlier one once ``None`` and ``''`` are read as the same file name (same file or same inline
body, same priority, same attributes). The page keeps the first copy, in its place.
"""

from __future__ import annotations

from typing import Any


def _key(script: Any) -> tuple:
    """What makes two script entries the same ``<script>`` tag (``None`` and ``''`` alike)."""
    if isinstance(script, str):  # old-style entry: a file name
        return (script, 500, ())
    attributes = getattr(script, "attributes", {}) or {}
    return (script.filename or "", script.priority, tuple(sorted(attributes.items())))


def dedupe_scripts(scripts: list) -> list:
    """``scripts`` without repeats, first copies kept in order."""
    seen: set[tuple] = set()
    kept = []
    for script in scripts:
        key = _key(script)
        if key not in seen:
            seen.add(key)
            kept.append(script)
    return kept


def remove_duplicate_scripts(app, pagename: str, templatename: str, context: dict, doctree) -> None:
    """``html-page-context`` handler: replace the page's ``script_files`` by its de-duplicated copy."""
    scripts = context.get("script_files")
    if isinstance(scripts, list):
        context["script_files"] = dedupe_scripts(scripts)


def setup(app) -> dict:
    # Priority 900: after the handlers that add per-page scripts (default 500).
    app.connect("html-page-context", remove_duplicate_scripts, priority=900)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
