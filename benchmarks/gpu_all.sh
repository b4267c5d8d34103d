#!/usr/bin/env bash
# Everything that needs a GPU, in one device call, most valuable first: the kernel benchmark and
# the decode benchmark (issue #4's targets), the GPU-marked tests, then autotuning. A lent GPU
# gives a session about 15 minutes in all and 10 per command, so each step runs under a time
# limit, cut to what is left before DEADLINE (seconds from the start, default 540); a step with
# under a minute left is skipped. STEPS picks and orders the steps, e.g.
#   STEPS="tests autotune" bash benchmarks/gpu_all.sh
# Results and one log per step go to $OUT (or ./bench-out): at most 7 files, under the 8 a device
# call brings back. Each log ends with the step's table; rerun a step alone for more.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench-out}"
mkdir -p "$out"
py="${PYTHON:-python3}"
deadline="${DEADLINE:-540}"
steps="${STEPS:-kernels decode tests autotune}"
export TRITON_DEFAULT_FP_FUSION=1 PYTHONUNBUFFERED=1
# A fresh kernel cache for the run: a CUDA C build killed by a time limit leaves a lock file that
# would make the next build of that kernel wait forever.
KOMPAKT_CACHE_DIR="${KOMPAKT_CACHE_DIR:-$(mktemp -d)}"
export KOMPAKT_CACHE_DIR
"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'" || exit 2
status=0

step() {  # step <name> <limit s> <command...>: run under a time limit, log, keep going on failure
  local name=$1 limit=$2
  shift 2
  local left=$((deadline - SECONDS))
  if ((left < 60)); then
    echo "== $name skipped: ${left} s left before the ${deadline} s deadline"
    status=1
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (at most ${limit} s)"
  timeout --kill-after=10 "$limit" "$@" >"$out/gpu-$name.log" 2>&1
  local rc=$?
  ((rc == 124)) && echo "   stopped at its ${limit} s limit (see gpu-$name.log)"
  ((rc != 0 && rc != 124)) && echo "   failed with status $rc (see gpu-$name.log)"
  ((rc != 0)) && status=1
  tail -n 15 "$out/gpu-$name.log"
}

for name in $steps; do
  case $name in
    kernels) step kernels 180 "$py" -m benchmarks.gpu_kernels --quick --out "$out" ;;
    # batch 1 only (the issue's decode targets): each batch size is another torch.compile
    decode) step decode 360 "$py" -m benchmarks.gpu_decode --quick --layers 4 --batches 1 --out "$out" ;;
    # the six odd-shape CUDA C configs are ~1 min of nvcc each; the three real sizes stay
    tests) step tests 300 "$py" -m pytest -q -m gpu -k "not emulation_on_odd_shapes" tests ;;
    autotune) step autotune 240 "$py" -m benchmarks.gpu_autotune --quick --no-cuda-gemv --out "$out" ;;
    *) echo "unknown step '$name' (known: kernels decode tests autotune)"; status=2 ;;
  esac
done
rm -f "$out"/*.md # the same tables as the logs; keeps the files under the call's limit
exit $status
