"""The first cell of every chapter, run as Colab would run it, against a wheel of genlib built here.

Colab is simulated by: a fresh virtual environment whose preinstalled packages (torch, numpy, ...)
are this project's, minus genlib; a fake ``google.colab`` module; and ``GENLIB_INSTALL`` pointing the
cell's pip install at the local wheel instead of the repository, with the package index switched off.
So the install path (packaging, package data, dependency resolution against Colab's own torch) is
proven without the internet.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import nbformat
import pytest

import genlib

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))

PROBE = """
import json, os, sys
try:
    import genlib
    found = {"genlib_file": genlib.__file__, "version": genlib.__version__}
    from genlib import data, features
    found["ring8"] = list(data.toy_dataset("ring8", 5, seed=0).shape)
    found["classifier_loaded"] = not features.load_fashion_classifier().training
except ImportError as error:
    found = {"import_error": str(error)}
import torch
found.update(torch_file=torch.__file__, scale=os.environ.get("GENLIB_SCALE"))
print("PROBE" + json.dumps(found))
"""


def setup_cell() -> str:
    """The source of the Colab set-up cell, which must be the same in every chapter."""
    first_code = {next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code").source
                  for path in CHAPTERS}
    assert len(first_code) == 1, "the chapters' set-up cells differ"
    return first_code.pop()


@pytest.fixture(scope="module")
def colab(tmp_path_factory) -> dict:
    """A simulated Colab: wheel, environment with preinstalled packages, fake google.colab."""
    base = tmp_path_factory.mktemp("colab")
    wheels = base / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels), str(ROOT)], check=True, capture_output=True, text=True, timeout=600)
    wheel = next(wheels.glob("genlib-*.whl"))

    # Colab's preinstalled packages: ours, seen through links, with every trace of genlib left out.
    preinstalled = base / "preinstalled"
    preinstalled.mkdir()
    ours = Path(sysconfig.get_paths()["purelib"])
    for entry in ours.iterdir():
        if not entry.name.lower().startswith(("genlib", "__editable__")):
            (preinstalled / entry.name).symlink_to(entry)
    env_dir = base / "env"
    # No pip of its own: pip, setuptools and the rest come from the preinstalled packages, as on Colab.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=300)
    python = env_dir / "bin" / "python"
    env_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    (Path(env_site) / "colab_preinstalled.pth").write_text(f"{preinstalled}\n")

    fake = base / "fake_colab" / "google" / "colab"
    fake.mkdir(parents=True)
    (fake.parent / "__init__.py").write_text("")
    (fake / "__init__.py").write_text('"""Stands in for Colab\'s google.colab module."""\n')
    return {"python": python, "wheel": wheel, "fake": fake.parent.parent, "base": base, "preinstalled": preinstalled}


def run_cell(colab: dict, on_colab: bool) -> dict:
    """Run the set-up cell and then a probe in the simulated environment; the probe's findings."""
    prelude = f"import sys; sys.path.insert(0, {str(colab['fake'])!r}); import google.colab\n" if on_colab else ""
    script = prelude + setup_cell() + "\n" + textwrap.dedent(PROBE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "GENLIB_"))}
    env.update(GENLIB_INSTALL=str(colab["wheel"]), PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    result = subprocess.run([str(colab["python"]), "-c", script], cwd=colab["base"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("PROBE"))
    return json.loads(line[len("PROBE"):])


@pytest.mark.slow
def test_setup_cell_outside_colab_installs_nothing(colab):
    found = run_cell(colab, on_colab=False)
    assert "import_error" in found and found["scale"] == "small"


@pytest.mark.slow
def test_setup_cell_on_colab_installs_the_pinned_genlib_and_keeps_torch(colab):
    cell = setup_cell()
    assert f"@v{genlib.__version__}" in cell, "the cell must pin the book's version"
    found = run_cell(colab, on_colab=True)
    assert "import_error" not in found, found
    assert found["version"] == genlib.__version__
    assert Path(found["genlib_file"]).resolve().is_relative_to(colab["python"].parent.parent.resolve())
    assert found["ring8"] == [5, 2] and found["classifier_loaded"] is True  # package data shipped
    assert Path(found["torch_file"]).parent.parent == colab["preinstalled"], "Colab's torch was replaced"
    assert found["scale"] == "small"
