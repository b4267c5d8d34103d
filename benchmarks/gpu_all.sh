#!/usr/bin/env bash
# Everything that needs a GPU, in one short run (for a lent GPU machine with little time):
# the GPU-marked tests, then the kernel, autotune and decode benchmarks in --quick form.
# Results go to $OUT (or ./bench-out); each step's log beside them. Rerun steps singly for more.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench-out}"
mkdir -p "$out"
export TRITON_DEFAULT_FP_FUSION=1
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'" || exit 2
status=0
step() {  # step <name> <command...>: run, log, keep going on failure
  local name=$1; shift
  echo "== $name"
  if ! "$@" > "$out/$name.log" 2>&1; then
    echo "   failed (see $out/$name.log)"; status=1
  fi
  tail -n 5 "$out/$name.log"
}
step gpu-tests python -m pytest -q -m gpu tests
step gpu-kernels python -m benchmarks.gpu_kernels --quick --out "$out"
step gpu-autotune python -m benchmarks.gpu_autotune --quick --out "$out"
step gpu-decode python -m benchmarks.gpu_decode --quick --layers 4 --out "$out"
exit $status
