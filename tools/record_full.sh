#!/usr/bin/env bash
# Record the book's full-scale Fashion-MNIST runs and the speed benchmark on a GPU, in one command.
#
#   bash tools/record_full.sh --list              the run names and their arguments
#   bash tools/record_full.sh --dry-run [NAME...] print the commands, run nothing
#   bash tools/record_full.sh [NAME...]           run them (all when no NAME), each into results/NAME_TAG
#   bash tools/record_full.sh --tag               print TAG for this machine
#
# TAG is $GENLIB_RUN_TAG, else the GPU's model (e.g. h100, h200, a100), else "cpu". Each run resumes from
# its checkpoint when rerun, so an interrupted session loses at most the run in progress. The commands are
# the ones the chapters quote (tests/test_record_full.py keeps the two in agreement).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${GENLIB_PYTHON:-python}"
[[ -x "$ROOT/.venv/bin/python" && -z "${GENLIB_PYTHON:-}" ]] && PYTHON="$ROOT/.venv/bin/python"

# One run per line, "NAME ARGUMENTS", in the default order: the benchmark (re-measured at every call: the search
# and the steps change between leases; beside a committed record it goes to results/bench-TAG-YYYYMMDD), then the
# runs that open issues still wait for, each group shortest first (chapter 1's GLO, GLANN (plain and with its
# mapper on the sphere) and IMLE; chapter 5's
# RealNVP; chapter 3's energy model; chapter 4's NCSN), then the
# extras (chapter 4's DDE, chapter 2's PacGAN and DCGAN), so that a short lease records what matters most. Measured on
# an H200: the DCGAN 151 s of training, the energy model 31-34 steps/s (~10 min; that log was not kept); the others
# are estimated from the benchmark's rates (a run that outlasts a lease resumes in the next one if its checkpoint
# is small enough to travel both ways: see tools/device_check.sh).
RUNS="\
bench bench
ch01_glo_fashion train glo --data fashion-mnist --steps 20000 --lr 1e-3 --z-dim 64 --opt loss=lap1 --opt code_lr=1e-2
ch01_glann_fashion train glann --data fashion-mnist --steps 25000 --lr 1e-3 --z-dim 64 --opt glo_steps=20000 --opt loss=lap1 --opt code_lr=1e-2
ch01_glann_sphere_fashion train glann --data fashion-mnist --steps 25000 --lr 1e-3 --z-dim 64 --opt glo_steps=20000 --opt loss=lap1 --opt code_lr=1e-2 --opt sphere=yes
ch01_imle_fashion train imle --data fashion-mnist --steps 20000 --lr 1e-3 --z-dim 64 --opt fakes_per_real=10 --opt refresh_every=4690
ch05_realnvp_fashion train realnvp --data fashion-mnist --steps 30000 --batch-size 64 --width 64 --lr 1e-3 --opt scales=3 --opt blocks=4 --opt decay_steps=30000
ch03_energy_fashion train energy --data fashion-mnist --steps 20000 --batch-size 64 --z-dim 128 --lr 1e-4
ch04_score_fashion train score --data fashion-mnist --steps 50000 --batch-size 128 --width 32 --lr 1e-3 --opt n_sigmas=10
ch04_dde_fashion train dde --data fashion-mnist --steps 20000 --batch-size 64 --width 64 --lr 1e-3 --opt sigma=0.6
ch02_pacgan_fashion train gan --data fashion-mnist --steps 20000 --opt variant=pacgan --opt pack=2
ch02_dcgan_fashion train gan --data fashion-mnist --steps 20000 --batch-size 128"
declare -A ARGS=()
ORDER=()
while read -r name arguments; do ARGS[$name]="$arguments"; ORDER+=("$name"); done <<< "$RUNS"

mode=run
if [[ "${1:-}" == "--list" || "${1:-}" == "--dry-run" || "${1:-}" == "--tag" ]]; then mode="${1#--}"; shift; fi
names=("$@")
[[ ${#names[@]} -eq 0 ]] && names=("${ORDER[@]}")
for name in "${names[@]}"; do
  [[ -n "${ARGS[$name]+x}" ]] || { echo "error: unknown run '$name'; known: ${ORDER[*]}" >&2; exit 2; }
done

if [[ "$mode" == list ]]; then
  for name in "${names[@]}"; do echo "$name: python -m genlib ${ARGS[$name]}"; done
  exit 0
fi

if [[ -n "${GENLIB_RUN_TAG:-}" ]]; then
  TAG="$GENLIB_RUN_TAG"
elif [[ "$mode" == dry-run ]]; then
  TAG="TAG"
else
  TAG="$("$PYTHON" -c 'import re, torch
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
print(next(iter(re.findall(r"\b([A-Z]\d{2,4}|L\d{1,2}|T4)\b", name)), name.split()[-1]).lower())')"
fi
if [[ "$mode" == tag ]]; then echo "$TAG"; exit 0; fi

for name in "${names[@]}"; do
  out="results/${name}_${TAG}" record="run.json"
  [[ "$name" == bench ]] && out="results/bench-${TAG}" record="bench.json"  # the benchmark's own file and folder name
  # a new measurement goes beside a committed one, which the Performance page quotes: results/bench-TAG-YYYYMMDD
  [[ "$name" == bench && "$mode" == run && -f "$out/$record" ]] && out="$out-$(date -u +%Y%m%d)"
  command=("$PYTHON" -m genlib ${ARGS[$name]} --out "$out")
  if [[ "$mode" == dry-run ]]; then
    echo "${command[*]}"
    continue
  fi
  if [[ "$name" != bench && -f "$out/$record" ]]; then
    echo "== $name: already recorded in $out (delete it to record again)"
    continue
  fi
  echo "== $name -> $out"
  # In the background, with TERM and INT forwarded and waited for: a deadline's SIGTERM (timeout in
  # device_check.sh) then lets genlib finish its step and save a checkpoint before this script, and timeout,
  # return. (A background job ignores SIGINT, so INT is forwarded as TERM.)
  "${command[@]}" &
  child=$!
  trap 'kill -TERM "$child" 2>/dev/null; wait "$child"; exit 143' TERM
  trap 'kill -TERM "$child" 2>/dev/null; wait "$child"; exit 130' INT
  wait "$child"
  trap - TERM INT
done
