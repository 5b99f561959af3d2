#!/usr/bin/env bash
# The device session's script: what a short session with one CUDA GPU runs, in two commands of
# under 10 minutes each (docs/gpu-path.md, "The first GPU session").
#
#   bash scripts/gpu_session.sh 1        # set-up, pytest -m gpu, the benchmark without compile
#   bash scripts/gpu_session.sh 2        # set-up, the benchmark compiling batch 1
#   bash scripts/gpu_session.sh all      # both, one after the other
#   bash scripts/gpu_session.sh --tiny all   # the CPU rehearsal (CI: tests/test_gpu_ready.py)
#
# Every step writes its log into $OUT (default: ./gpu-session-out) as it runs, under its own time
# limit, and one line into $OUT/summary.txt when it ends (ok, FAILED rc=N or TIMEOUT after N s);
# the benchmark rewrites its JSON after each case. A step that fails does not stop the next one.
# Each part leaves at most 5 files in $OUT (the device tool returns 8 at most).
#
# Set-up: the device image has torch (and transformers, peft, accelerate, ...) but not diffusers,
# pydantic, fastapi or uvicorn, and no network. Those come as wheels from .whl/ (ignored by git;
# fetched once with the command in scripts/gpu_wheels.txt), installed into $SITE with pip, no
# index, no dependencies, and put first on PYTHONPATH. --tiny uses this environment as it is.
#
# Environment: OUT, PYTHON (default python3), SITE (default /tmp/craftserve-site), BATCHES (the
# benchmark's batch sizes, default 1), and the CRAFTSERVE_* settings, which pass through.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
TINY=0
PART=""
for arg in "$@"; do
  case "$arg" in
    --tiny) TINY=1 ;;
    1|2|all) PART=$arg ;;
    *) echo "usage: $0 [--tiny] 1|2|all" >&2; exit 64 ;;
  esac
done
[ -n "$PART" ] || { echo "usage: $0 [--tiny] 1|2|all" >&2; exit 64; }

OUT=${OUT:-$ROOT/gpu-session-out}
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/craftserve-site}
BATCHES=${BATCHES:-1}
# What the carried wheels need that the device image already holds (tests/test_gpu_ready.py
# checks that every requirement of a carried wheel is carried or named here).
ON_DEVICE="torch numpy scipy pillow filelock huggingface-hub regex requests safetensors anyio
click h11 annotated-doc"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
# Inductor's cache in the checkout: kept between the two commands on a machine still warm.
export TORCHINDUCTOR_CACHE_DIR="$ROOT/.inductor-cache"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
FAILURES=0

note() { printf '%s %-7s %-15s %s\n' "$(date -u +%H:%M:%S)" "$1" "$2" "$3" | tee -a "$SUMMARY"; }

# step NAME LIMIT_S LOG COMMAND...: run it under `timeout`, its output appended to $OUT/LOG.
step() {
  local name=$1 limit=$2 log="$OUT/$3"; shift 3
  local started=$SECONDS rc
  echo "=== $name: $* (limit ${limit} s)" >>"$log"
  timeout --signal=TERM --kill-after=20 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  local spent=$((SECONDS - started))
  if [ $rc -eq 0 ]; then
    note ok "$name" "${spent} s"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    note TIMEOUT "$name" "after ${spent} s (limit ${limit} s); its log: $3"; FAILURES=$((FAILURES + 1))
  else
    note FAILED "$name" "rc=$rc after ${spent} s; its log: $3"; FAILURES=$((FAILURES + 1))
  fi
  return $rc
}

setup() {
  local log="$OUT/setup.log"
  {
    echo "=== $(date -u) $(uname -srm), $(nproc) CPUs"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
      --format=csv,noheader
    "$PYTHON" -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
  } >>"$log" 2>&1
  if [ $TINY -eq 1 ]; then
    note skip wheels "--tiny: this environment's packages"
  else
    step wheels 120 setup.log install_wheels
  fi
  step imports 120 setup.log "$PYTHON" -c "
import importlib.metadata as m
import diffusers, fastapi, pydantic, pydantic_settings, sse_starlette, torch, torchsde, uvicorn
import app.main, tests.live
names = ('torch', 'diffusers', 'transformers', 'peft', 'fastapi', 'pydantic', 'uvicorn')
print(', '.join(f'{n} {m.version(n)}' for n in names))"
}

install_wheels() {
  # exactly one wheel per pinned package, then install them all, with no index
  local missing=0 name version file
  while read -r name version; do
    file=$(ls .whl/"$(echo "$name" | tr '-' '_')"-"$version"-*.whl 2>/dev/null | head -1)
    if [ -z "$file" ]; then
      echo "missing: $name==$version"; missing=1
    fi
  done < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' -e 's/==/ /' scripts/gpu_wheels.txt)
  if [ $missing -ne 0 ]; then
    echo "fetch them with the command in scripts/gpu_wheels.txt, and carry .whl"
    return 1
  fi
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl || return 1
  echo "installed into $SITE: $(ls .whl | wc -l) wheels"
}

bench() {  # bench NAME LIMIT_S ARGS...
  local name=$1 limit=$2; shift 2
  local args=(--out "$OUT/$name.json" --batches "$BATCHES")
  [ $TINY -eq 1 ] && args+=(--tiny --steps 2 --reps 1)
  step "$name" "$limit" "$name.log" "$PYTHON" scripts/bench_gpu.py "${args[@]}" "$@"
}

part1() {
  local files
  files=$(grep -l "mark.gpu" tests/test_*.py | tr '\n' ' ')
  # shellcheck disable=SC2086 # one word per file
  step pytest-gpu 180 pytest-gpu.log "$PYTHON" -m pytest -p no:cacheprovider -q -rs -m gpu $files
  bench bench-eager 300 --no-compile
}

part2() {
  mkdir -p .compile-cache
  # compile at batch 1 with inductor's artifacts kept (and returned in $OUT, one file), every
  # recompilation logged with its reason
  TORCH_LOGS=recompiles bench bench-compile 480 --compile --compile-cache .compile-cache/artifacts.bin
  local count
  count=$(grep -c "Recompiling function" "$OUT/bench-compile.log" 2>/dev/null)
  note info recompiles "${count:-0} in bench-compile.log (TORCH_LOGS=recompiles)"
  if [ -f .compile-cache/artifacts.bin ] && [ "$(stat -c %s .compile-cache/artifacts.bin)" -lt 16000000 ]; then
    cp .compile-cache/artifacts.bin "$OUT/compile-artifacts.bin"
  fi
}

setup
case "$PART" in
  1) part1 ;;
  2) part2 ;;
  all) part1; part2 ;;
esac
note done "part $PART" "$FAILURES step(s) failed; files in $OUT"
[ $FAILURES -eq 0 ]
