"""requirements.txt and pyproject.toml name the same packages with the same lower bounds, and every one has a
lower bound, so that tools/check_min_versions.sh (uv's lowest-direct resolution) tests the oldest versions we claim."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def requirement_lines() -> list[str]:
    """requirements.txt's requirements, comments and blank lines dropped."""
    lines = (re.sub(r"\s*#.*", "", line).strip() for line in (ROOT / "requirements.txt").read_text().splitlines())
    return [line for line in lines if line]


def test_every_requirement_has_a_lower_bound():
    unbounded = [line for line in requirement_lines() if not re.fullmatch(r"[A-Za-z0-9_.-]+>=[0-9][^<>=!~]*(,<.+)?",
                                                                          line)]
    assert not unbounded


def test_pyproject_names_requirements_txt_s_packages_with_its_bounds():
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads TOML")  # genlib itself supports 3.10
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [dep for group in project["optional-dependencies"].values() for dep in group]
    assert set(declared) <= set(requirement_lines())
    # what requirements.txt adds is for the tests and the book's browser check only
    assert set(requirement_lines()) - set(declared) == {"selenium>=4.11", "setuptools>=77"}


def test_the_oldest_versions_check_refuses_to_replace_a_folder_that_is_no_virtual_environment(tmp_path):
    keep = tmp_path / "notes.txt"
    keep.write_text("mine")
    result = subprocess.run(["bash", str(ROOT / "tools" / "check_min_versions.sh")], capture_output=True, text=True,
                            env=os.environ | {"GENLIB_MIN_VENV": str(tmp_path)}, timeout=60)
    assert result.returncode == 2 and "is no virtual environment" in result.stderr
    assert keep.read_text() == "mine"
