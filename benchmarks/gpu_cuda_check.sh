#!/usr/bin/env bash
# The cuda backend on a GPU machine, in one script: build the extension in place, run the GPU
# tests, one compute-sanitizer memcheck pass over a small subset, and the GEMM benchmark.
# Logs and JSON go to $OUT (default ./gpu-out).
#
#   benchmarks/gpu_cuda_check.sh [build] [test] [memcheck] [bench]     (no argument: all four)
#
# Steps can be run in separate calls on the same machine (the build stays in place). Without
# internet, the CUTLASS headers come from a wheel carried in .whl/ (pip download --no-deps -d .whl
# nvidia-cutlass==4.2.0.0) unless `cutlass_library` is importable or APM_FAST_CUTLASS_INCLUDE set.
# Environment: APM_FAST_CUDA_ARCHS (default 90a here), MAX_JOBS (default: all cores).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
STEPS=${*:-build test memcheck bench}
status=0

if [ -z "${APM_FAST_CUTLASS_INCLUDE:-}" ] && ! python -c "import cutlass_library" 2>/dev/null; then
    if ls .whl/nvidia_cutlass-*.whl >/dev/null 2>&1; then
        python -m pip install -q --no-index --no-deps --target /tmp/apm-fast-site .whl/nvidia_cutlass-*.whl
        export PYTHONPATH="$PYTHONPATH:/tmp/apm-fast-site"
    else
        echo "warning: no CUTLASS headers (carry .whl/nvidia_cutlass-4.2.0.0-py3-none-any.whl); the build" \
             "will have the portable GEMM only" >&2
    fi
fi

# run NAME CMD...: CMD's output to $OUT/NAME.log, a one-line verdict and the log's tail here
run() {
    local name=$1; shift
    local t0=$SECONDS
    echo "== $name: $*"
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "   $name: rc=$rc, $((SECONDS - t0)) s (log: $OUT/$name.log)"
    tail -n 15 "$OUT/$name.log" | sed 's/^/   | /'
    [ $rc -eq 0 ] || status=1
    return $rc
}

for step in $STEPS; do
    case $step in
    build)
        { nvidia-smi; nvcc --version; python -c "import torch; print(torch.__version__, torch.version.cuda)"; } \
            > "$OUT/machine.txt" 2>&1
        APM_FAST_CUDA_ARCHS=${APM_FAST_CUDA_ARCHS:-90a} APM_FAST_STRICT_BUILD=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
            run build python setup.py build_ext --inplace || { echo "build failed: see $OUT/build.log"; exit 1; }
        run import python -c "import torch, apm_fast._C_cuda as C; print('sm90 kernels:', C.sm90_available(torch.empty(1, device='cuda')))"
        ;;
    test)
        APM_FAST_REQUIRE_CUDA_EXT=1 run test python -m pytest -q -ra --durations=10 \
            tests/test_cuda_backend.py tests/test_cuda_backend_plumbing.py tests/test_cpp_cpu.py \
            --junitxml="$OUT/test.xml"
        ;;
    memcheck)
        # exact allocations (no caching pool) so that an out-of-bounds access is outside any buffer
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 APM_FAST_REQUIRE_CUDA_EXT=1 run memcheck \
            compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20 \
            python -m pytest -q -x tests/test_cuda_backend.py -k "bf16 and not adam_steps or adam_matches"
        grep -h "ERROR SUMMARY" "$OUT/memcheck.log" | tail -n 1
        ;;
    bench)
        run bench python benchmarks/bench_cuda_gemm.py --out "$OUT/bench_cuda_gemm.json"
        ;;
    *)
        echo "unknown step '$step' (expected build, test, memcheck, bench)" >&2
        exit 2
        ;;
    esac
done
echo "done: status $status; outputs in $OUT"
exit $status
