#!/usr/bin/env bash
# Create (or update) the project's environment in .venv on a fresh Debian/Ubuntu machine:
# Debian packages the tests use, torch, the pip requirements and genlib itself (editable).
# Sourced by tools/build_book.sh and tools/run_tests.sh; safe to run again.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GENLIB_VENV:-$ROOT/.venv}"
# CI and these machines keep a CPU wheel of this torch on local disk; on your own machine,
# set TORCH_SPEC (e.g. TORCH_SPEC=torch) to take whatever build suits your GPU.
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

apt_install() {
  # Debian's Fashion-MNIST (real data, offline) for the image chapters and tests.
  [ -d /usr/share/datasets/fashion-mnist ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] apt-get install dataset-fashion-mnist"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "[setup] note: Fashion-MNIST not found; install Debian's dataset-fashion-mnist or set GENLIB_DATA" >&2
  fi
}

apt_install
if [ ! -x "$VENV/bin/python" ]; then
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
