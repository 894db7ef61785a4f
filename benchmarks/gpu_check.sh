#!/usr/bin/env bash
# The GPU run: set-up, extension build, GPU tests, sweep, benchmarks; everything lands under $OUT.
#
#   bash benchmarks/gpu_check.sh [stage ...]      (repo root; default: every stage in this order)
#
#   env         GPU, driver, versions
#   build       editable install: apm_fast.kernels mapping + C++/CUDA extensions (strict: a failed
#               CUDA build is an error here)
#   tests       every test marked gpu, then the host-side tests that touch torchvision/open_clip
#   memcheck    compute-sanitizer memcheck over the cuda backend's small GPU tests
#   sweep       Triton config sweep; its winners are copied over kernels/tuned_configs.py
#   triton      benchmarks/bench_triton.py   (issue targets of the Triton backend)
#   cuda        benchmarks/bench_cuda_gemm.py (each GEMM: cuda vs cuBLAS vs Triton)
#   engine      benchmarks/bench_engine.py   (captured step, students side by side, end to end)
#   suite       benchmarks/run_gpu_bench.py  (the whole benchmark suite, every preset; SUITE_ARGS
#               passes more options, e.g. SUITE_ARGS="--only scaling")
#
# Stages can be split over several calls while the machine stays warm (the build stays in place).
# The GPU image lacks open_clip/ftfy/wcwidth, setuptools and the CUTLASS headers: they travel as
# wheels in .whl/ and are installed into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
FINAL=${OUT:-$PWD/gpu-out}
WORK=$(mktemp -d)
OUT=$WORK/gpu-run
mkdir -p "$OUT" "$FINAL"
# the device returns few files: one archive with everything, plus the JSON files
trap 'tar -czf "$FINAL/gpu-run.tgz" -C "$WORK" gpu-run' EXIT
STAGES=${*:-env build tests memcheck sweep triton cuda engine suite}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${PY:-python3}
status=0
step() { echo; echo "=== $* ($(date +%T)) ==="; }
has() { [[ " $STAGES " == *" $1 "* ]]; }
# bench NAME SCRIPT ARGS...: run with a time limit, log to $OUT/NAME.log, show the tail
bench() {
  local name=$1; shift
  step "$name: $*"
  timeout "${BENCH_TIMEOUT:-420}" $PY "$@" 2>&1 | tee "$OUT/$name.log" | tail -"${TAIL:-45}"
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "!! $name failed"; status=1; }
}

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
  start=$SECONDS
  APM_FAST_CUDA_ARCHS=${APM_FAST_CUDA_ARCHS:-90a} MAX_JOBS=${MAX_JOBS:-16} APM_FAST_STRICT_BUILD=1 \
    $PY -m pip install -v --no-deps --no-build-isolation -e . >"$OUT/build.log" 2>&1 \
    || { echo "install/build FAILED (see build.log)"; grep -E "error|Error" "$OUT/build.log" | head -20; status=1; }
  echo "build took $((SECONDS - start)) s"
  $PY -c "import apm_fast; print(apm_fast.available_backends())" 2>&1 | tee -a "$OUT/env.txt"
fi

if has tests; then
  step gpu tests
  APM_FAST_REQUIRE_CUDA_EXT=1 $PY -m pytest -q -m gpu tests -p no:cacheprovider -rfE --durations=10 \
    --junitxml="$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.log" | tail -40
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  step "host-side tests on the GPU machine (healthy torchvision, CUDA default device, the CPU extension's errors)"
  $PY -m pytest -q tests/test_teacher.py tests/test_classify.py tests/test_cli.py tests/test_cpp_cpu.py -p no:cacheprovider 2>&1 \
    | tee "$OUT/host-tests.log" | tail -5
fi

if has memcheck; then
  step memcheck
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 300 compute-sanitizer --tool memcheck --print-limit 20 \
    $PY -m pytest -q -x -m gpu tests/test_cuda_backend.py -p no:cacheprovider -k "bf16 and not graph" 2>&1 \
    | tee "$OUT/memcheck.log" | tail -15
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

if has sweep; then
  BENCH_TIMEOUT=400 bench sweep benchmarks/sweep_triton.py --out "$OUT" --budget-s "${SWEEP_BUDGET:-240}"
  if [ -f "$OUT/tuned_configs.py" ]; then cp "$OUT/tuned_configs.py" kernels/tuned_configs.py; echo "tuned configs installed"; fi
fi
has triton && bench bench_triton benchmarks/bench_triton.py --out "$OUT"
has cuda && bench bench_cuda_gemm benchmarks/bench_cuda_gemm.py --out "$OUT"
has engine && bench bench_engine benchmarks/bench_engine.py --out "$OUT"
has suite && BENCH_TIMEOUT=560 bench suite benchmarks/run_gpu_bench.py --out "$OUT/suite" --commit "${APM_FAST_COMMIT:-unknown}" --time-budget "${SUITE_BUDGET:-480}" ${SUITE_ARGS:-}
exit $status
