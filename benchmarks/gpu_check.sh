#!/usr/bin/env bash
# The GPU run: set-up, extension build, GPU tests, sweep, benchmark suite; everything under $OUT.
#
#   bash benchmarks/gpu_check.sh [stage ...]      (from anywhere; default: every stage in order)
#
#   env         GPU, driver, versions
#   build       editable install: apm_fast.kernels mapping + the CUDA extension (strict: a failed
#               build is an error here)
#   tests       every test marked gpu, then the host-side tests that touch torchvision/open_clip
#   memcheck    compute-sanitizer memcheck over the cuda table's small GPU tests (bf16 ones, Adam's
#               step-1 case, the reset's broadcast)
#   sweep       Triton config sweep; its winners are copied over kernels/tuned_configs.py
#   bench       the benchmark suite (python -m apm_fast.bench); BENCH_ARGS passes options, e.g.
#               BENCH_ARGS="--only step primitives --preset ttt-l14 --skip latency/*/eager" (split on
#               spaces, not globbed: patterns unquoted)
#
# Stages can be split over several calls while the machine stays warm (the build stays in place).
# Where the machine's Python lacks open_clip/ftfy/wcwidth, setuptools and the CUTLASS headers, they
# come as wheels in .whl/ at the repository root and are installed into $APM_FAST_SITE (default:
# site/ under $TMPDIR or /tmp), which is put on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
FINAL=${OUT:-$PWD/gpu-out}
WORK=$(mktemp -d)
OUT=$WORK/gpu-run
mkdir -p "$OUT" "$FINAL"
# the device returns few files: one archive with everything, plus the suite's JSON files
trap 'tar -czf "$FINAL/gpu-run.tgz" -C "$WORK" gpu-run' EXIT
STAGES=${*:-env build tests memcheck sweep bench}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${PY:-python3}
SITE=${APM_FAST_SITE:-${TMPDIR:-/tmp}/site}
status=0
step() { echo; echo "=== $* ($(date +%T)) ==="; }
has() { [[ " $STAGES " == *" $1 "* ]]; }

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    && export PYTHONPATH=$SITE:${PYTHONPATH:-}
else
  echo "note: no wheels in $PWD/.whl (open_clip, CUTLASS): teacher tests and the CUTLASS build may fail"
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
  step "host-side tests on the GPU machine (healthy torchvision, CUDA default device)"
  $PY -m pytest -q tests/test_teacher.py tests/test_classify.py tests/test_cli.py -p no:cacheprovider 2>&1 \
    | tee "$OUT/host-tests.log" | tail -5
fi

if has memcheck; then
  step memcheck
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 300 compute-sanitizer --tool memcheck --print-limit 20 --error-exitcode 1 \
    $PY -m pytest -q -x -m gpu tests/test_cuda_backend.py -p no:cacheprovider -k "(bf16 and not graph) or broadcast or step_one" 2>&1 \
    | tee "$OUT/memcheck.log" | tail -15
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

if has sweep; then
  step sweep
  timeout 400 $PY benchmarks/sweep_triton.py --out "$OUT" --budget-s "${SWEEP_BUDGET:-240}" 2>&1 | tee "$OUT/sweep.log" | tail -45
  if [ -f "$OUT/tuned_configs.py" ]; then cp "$OUT/tuned_configs.py" kernels/tuned_configs.py; echo "tuned configs installed"; fi
fi

if has bench; then
  step "bench: python -m apm_fast.bench ${BENCH_ARGS:-}"
  # BENCH_ARGS is split on spaces, never globbed: --skip patterns go in unquoted (latency/*/eager)
  set -f
  # shellcheck disable=SC2086
  # the commit: git's where the tree has its .git (with +dirty), else APM_FAST_COMMIT
  commit_arg=()
  git rev-parse --git-dir >/dev/null 2>&1 || commit_arg=(--commit "${APM_FAST_COMMIT:-unknown}")
  timeout "${BENCH_TIMEOUT:-560}" $PY -m apm_fast.bench --device cuda --out "$OUT/suite" \
    ${commit_arg[@]+"${commit_arg[@]}"} --time-budget "${BENCH_BUDGET:-480}" \
    --authors-presets ttt-l14 --compile-presets ttt-l14 ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -"${TAIL:-60}"
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "!! bench failed (gate or error)"; status=1; }
  set +f
fi
exit $status
