#!/usr/bin/env bash
# The one GPU run: set-up, extension build, GPU tests, benchmarks; everything lands under $OUT.
#
#   device run (repo root, carrying the wheels folder .whl):  bash benchmarks/gpu_check.sh [stages]
#   stages (default: all): env build tests bench
#
# The GPU image lacks open_clip/ftfy/wcwidth and the CUTLASS headers: they travel as wheels in
# .whl/ (see README, "Running on a GPU") and are installed into /tmp/site here.
set -uo pipefail
# Results are gathered in one folder and packed into one archive at the end (the device returns
# few files).
FINAL=${OUT:-$PWD/gpu-out}
OUT=$(mktemp -d)/gpu-run
mkdir -p "$OUT" "$FINAL"
trap 'tar -czf "$FINAL/gpu-run.tgz" -C "$(dirname "$OUT")" gpu-run; cp "$OUT"/*.json "$FINAL"/ 2>/dev/null' EXIT
STAGES=${*:-env build tests bench}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${PY:-python3}
status=0
step() { echo; echo "=== $* ==="; }
has() { [[ " $STAGES " == *" $1 "* ]]; }

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi

if has env; then
  step env
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/env.txt"
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/env.txt"
fi

if has build; then
  step build
  start=$(date +%s)
  # editable install: maps kernels/ to apm_fast.kernels and builds the CUDA extension in place
  APM_FAST_CUDA_ARCHS=${APM_FAST_CUDA_ARCHS:-90a} MAX_JOBS=${MAX_JOBS:-16} \
    $PY -m pip install -v --no-deps --no-build-isolation -e . >"$OUT/build.log" 2>&1 \
    || { echo "install/build FAILED (see build.log)"; status=1; }
  echo "build took $(( $(date +%s) - start )) s"; tail -5 "$OUT/build.log"
fi

if has tests; then
  step gpu tests
  $PY -m pytest -q -m gpu tests -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.log" | tail -25
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  step "CPU-side tests on the GPU machine (teachers, CLI: healthy torchvision, CUDA default device)"
  $PY -m pytest -q tests/test_teacher.py tests/test_classify.py tests/test_cli.py -p no:cacheprovider 2>&1 \
    | tee "$OUT/host-tests.log" | tail -8
fi

if has bench; then
  for b in benchmarks/bench_triton.py benchmarks/bench_cuda_gemm.py benchmarks/bench_engine.py benchmarks/run_gpu_bench.py; do
    [ -f "$b" ] || continue
    step "$b"
    timeout ${BENCH_TIMEOUT:-420} $PY "$b" --out "$OUT" 2>&1 | tee "$OUT/$(basename "$b" .py).log" | tail -40
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
  done
fi
exit $status
