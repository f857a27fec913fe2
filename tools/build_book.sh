#!/usr/bin/env bash
# Build the HTML book into _build/html (creates the environment first). Open _build/html/index.html.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/setup_env.sh"
cd "$ROOT"
"${GENLIB_VENV:-$ROOT/.venv}/bin/jupyter-book" build . -W --keep-going
echo "The book is in $ROOT/_build/html/index.html"
