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
