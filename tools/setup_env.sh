#!/usr/bin/env bash
# Create (or update) the project's environment in .venv on a fresh Debian/Ubuntu machine:
# Debian packages the tests use, the book's vendored JavaScript (tools/vendor_js.sh), torch, the pip
# requirements and genlib itself (editable).
# Run by tools/build_book.sh and tools/run_tests.sh; safe to run again.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GENLIB_VENV:-$ROOT/.venv}"
# CI and these machines keep a CPU wheel of this torch on local disk; on your own machine,
# set TORCH_SPEC (e.g. TORCH_SPEC=torch) to take whatever build suits your GPU.
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

APT_UPDATED=""
apt_install() {
  # apt_install "NOTE" PACKAGE...: install Debian packages as root, else with sudo, else print NOTE.
  local note="$1"; shift
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] apt-get install $*"
    [ -n "$APT_UPDATED" ] || { apt-get update -qq && APT_UPDATED=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then
    echo "[setup] sudo apt-get install $*"
    [ -n "$APT_UPDATED" ] || { sudo apt-get update -qq && APT_UPDATED=1; }
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    echo "[setup] note: $note" >&2
  fi
}

# Debian's Fashion-MNIST (real data, offline) for the image chapters and tests.
[ -d /usr/share/datasets/fashion-mnist ] || apt_install \
  "Fashion-MNIST not found; install Debian's dataset-fashion-mnist or set GENLIB_DATA" dataset-fashion-mnist
# Headless Chromium and its driver for the browser test of the built book (tests/test_browser.py).
# Debian's package names; elsewhere (Ubuntu ships them as snaps) the install may fail: the browser test then skips.
{ [ -e /usr/bin/chromium ] && [ -e /usr/bin/chromedriver ]; } || apt_install \
  "chromium not found; install Debian's chromium and chromium-driver (tests/test_browser.py needs them)" \
  chromium chromium-driver || echo "[setup] note: chromium was not installed; tests/test_browser.py will skip" >&2
# npm vendors the book's JavaScript (MathJax, ipywidgets embed manager) for the offline HTML.
command -v npm >/dev/null || apt_install "npm not found; install Node.js and npm" npm
bash "$ROOT/tools/vendor_js.sh" || echo "[setup] note: the book's JavaScript is not vendored; the book build will fail" >&2

if [ ! -x "$VENV/bin/python" ]; then
  # Debian and Ubuntu ship venv's pip bootstrap (ensurepip) in a package of its own.
  python3 -c "import ensurepip" 2>/dev/null || apt_install \
    "python3 cannot create a venv with pip; install python3-venv" python3-venv
  echo "[setup] creating $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip 2>/dev/null || true
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[setup] pip install $TORCH_SPEC"
  "$PY" -m pip install -q "$TORCH_SPEC"
fi
quiet_pip() {
  # pip's and setuptools' chatter goes to a log, shown only if the install fails.
  local log; log="$(mktemp)"
  if ! "$PY" -m pip install -q "$@" >"$log" 2>&1; then cat "$log" >&2; rm -f "$log"; exit 1; fi
  rm -f "$log"
}
echo "[setup] pip install -r requirements.txt and genlib (editable)"
quiet_pip -r "$ROOT/requirements.txt"
quiet_pip --no-deps -e "$ROOT"
"$PY" -m ipykernel install --sys-prefix --name python3 --display-name "Python 3" >/dev/null
"$PY" -c "import torch, genlib; print(f'[setup] ready: torch {torch.__version__}, genlib {genlib.__version__}')"
