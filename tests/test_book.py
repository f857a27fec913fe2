"""The book builds with Sphinx warnings as errors, and every page in the TOC is produced.
The build itself is the session fixture `book_build` (tests/conftest.py), shared with the browser test."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_book_builds_with_warnings_as_errors(book_build):
    assert book_build.returncode == 0, book_build.log[-5000:]
    html = book_build.html
    toc = (ROOT / "_toc.yml").read_text()
    pages = re.findall(r"^\s*(?:root|-\s*file):\s*(\S+)", toc, re.MULTILINE)
    for page in pages:
        assert (html / f"{page}.html").exists(), f"{page}.html was not built"
    bibliography = (html / "book" / "bibliography.html").read_text()
    assert "implicit maximum likelihood estimation" in bibliography.lower()


def test_dedupe_inline_scripts_reads_none_and_empty_file_names_alike():
    """The extension's rule (book/_ext/dedupe_inline_scripts.py) on Sphinx's own script objects."""
    import sys

    from sphinx.builders.html._assets import _JavaScript

    sys.path.insert(0, str(ROOT / "book" / "_ext"))
    from dedupe_inline_scripts import dedupe_scripts

    thebe = 'const THEBE_JS_URL = "x"'
    scripts = [_JavaScript("_static/a.js"), _JavaScript(None, body=thebe), _JavaScript("_static/a.js", priority=200),
               _JavaScript("", body=thebe), _JavaScript("", body="other"), _JavaScript("_static/a.js"),
               "old.js", "old.js"]
    kept = dedupe_scripts(scripts)
    assert kept == [scripts[0], scripts[1], scripts[2], scripts[4], "old.js"]


@pytest.mark.slow
def test_every_script_is_written_once(built_book):
    """No page repeats a <script> tag (book/_ext/dedupe_inline_scripts.py: Sphinx 7.4 wrote late-registered
    inline scripts twice, and sphinx-thebe's second `const THEBE_JS_URL` was a console error)."""
    repeated = []
    for page in Path(built_book).rglob("*.html"):
        tags = re.findall(r"<script\b[^>]*>.*?</script>", page.read_text(encoding="utf-8"), re.DOTALL)
        tags = [tag for tag in tags if 'type="application/vnd.jupyter.widget' not in tag]  # widget data
        seen: set[str] = set()
        for tag in tags:
            if tag in seen:
                repeated.append(f"{page.relative_to(built_book)}: {tag[:120]}")
            seen.add(tag)
    assert not repeated, "scripts written twice:\n" + "\n".join(repeated[:20])


@pytest.mark.slow
def test_every_chapter_has_an_open_in_colab_button(built_book):
    """The launch button opens the chapter's notebook from the repository named in _config.yml."""
    repository = re.search(r"^repository:\s*\n\s+url:\s*https://github.com/(\S+)", (ROOT / "_config.yml").read_text(),
                           re.MULTILINE).group(1)
    for notebook in sorted((ROOT / "chapters").glob("*.ipynb")):
        page = (Path(built_book) / "chapters" / f"{notebook.stem}.html").read_text(encoding="utf-8")
        expected = f"https://colab.research.google.com/github/{repository}/blob/main/chapters/{notebook.name}"
        assert expected in page, f"{notebook.stem}.html has no Colab launch button"
