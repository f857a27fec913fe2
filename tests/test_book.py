"""The book builds with Sphinx warnings as errors, and every page in the TOC is produced."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_book_builds_with_warnings_as_errors(tmp_path):
    jupyter_book = shutil.which("jupyter-book") or str(Path(sys.executable).parent / "jupyter-book")
    result = subprocess.run([jupyter_book, "build", str(ROOT), "-W", "--keep-going", "--path-output", str(tmp_path)],
                            capture_output=True, text=True, timeout=1200)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    html = tmp_path / "_build" / "html"
    toc = (ROOT / "_toc.yml").read_text()
    pages = re.findall(r"^\s*(?:root|-\s*file):\s*(\S+)", toc, re.MULTILINE)
    for page in pages:
        assert (html / f"{page}.html").exists(), f"{page}.html was not built"
    bibliography = (html / "book" / "bibliography.html").read_text()
    assert "implicit maximum likelihood estimation" in bibliography.lower()
