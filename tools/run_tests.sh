#!/usr/bin/env bash
# Run the whole test suite: genlib's unit tests, strict nbval over the chapters'
# committed outputs, notebook hygiene, the -W book build and the browser check of the built pages
# (creates the environment first).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/setup_env.sh"
cd "$ROOT"
export GENLIB_SCALE=small
unset MPLBACKEND  # an exported agg backend silences plt.show() and breaks nbval comparisons
# OpenMP threads that sleep rather than spin while they wait: with both cores shared by two workers, a spinning
# thread steals the core its partner needs (chapter 2's 2-thread DCGAN cell took 223 s spinning, 52 s passive).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"
# Two xdist workers keep both cores busy (one runs a notebook while the other runs unit tests or another
# notebook); --dist loadscope keeps each notebook's cells together, in order, in one kernel.
exec "${GENLIB_VENV:-$ROOT/.venv}/bin/python" -m pytest -n "${GENLIB_TEST_WORKERS:-2}" --dist loadscope "$@"
