#!/usr/bin/env bash
# Run the whole test suite: genlib's unit tests, strict nbval over the chapters'
# committed outputs, notebook hygiene and the -W book build (creates the environment first).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/setup_env.sh"
cd "$ROOT"
export GENLIB_SCALE=small
unset MPLBACKEND  # an exported agg backend silences plt.show() and breaks nbval comparisons
exec "${GENLIB_VENV:-$ROOT/.venv}/bin/python" -m pytest "$@"
