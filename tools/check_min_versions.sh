#!/usr/bin/env bash
# Test genlib against the oldest packages requirements.txt allows: uv's lowest-direct resolution puts every
# package named there at its lower bound (torch 2.3.0, numpy 1.24.0, matplotlib 3.7.0, ...) and what they pull in
# at its newest. Run it after raising a feature's torch or library needs; CI does not (see CONTRIBUTING).
#
#   bash tools/check_min_versions.sh                 # the tests in tests/, in a new .venv-min
#   bash tools/check_min_versions.sh --notebooks     # and execute every chapter (errors only, not outputs)
#
# On Linux the first run downloads torch's CUDA wheel from PyPI with its CUDA libraries (about 3.3 GB; no GPU
# needed; uv caches them for the next run).
# The chapters' strict nbval outputs are not compared: another torch may round differently.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GENLIB_MIN_VENV:-$ROOT/.venv-min}"
NOTEBOOKS=""
if [ "${1:-}" = "--notebooks" ]; then NOTEBOOKS=1; shift; fi

if [ -e "$VENV" ] && [ ! -f "$VENV/pyvenv.cfg" ]; then
  echo "check_min_versions: $VENV exists and is no virtual environment; set GENLIB_MIN_VENV to another folder" >&2
  exit 2
fi
rm -rf "$VENV"  # made anew each time: an older run's packages would satisfy the bounds without being the oldest
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q uv
"$VENV/bin/uv" pip install --python "$VENV/bin/python" -q --resolution lowest-direct -r "$ROOT/requirements.txt"
"$VENV/bin/python" - <<'EOF'
from importlib.metadata import version
names = ["torch", "numpy", "scipy", "matplotlib", "pillow", "scikit-learn", "scikit-image", "ipywidgets", "ipykernel",
         "sympy", "jupyter-book"]
print("[min-versions] " + ", ".join(f"{name} {version(name)}" for name in names))
EOF

# The suite's own command in this venv: its set-up adds the system packages, the vendored JavaScript, genlib and
# the kernel, and pip leaves the oldest versions alone (they satisfy the bounds). Everything in tests/ (the -W book
# build and the browser check too), not the chapters' strict nbval outputs (addopts holds --nbval).
GENLIB_VENV="$VENV" bash "$ROOT/tools/run_tests.sh" -p no:cacheprovider -o addopts="-ra" -q tests "$@"
if [ -n "$NOTEBOOKS" ]; then
  "$VENV/bin/python" "$ROOT/tools/smoke_full.py" --scale small --out "$ROOT/_build/min-versions"
fi
