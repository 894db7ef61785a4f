#!/usr/bin/env bash
# call 1: build, GPU tests, the engine rows (first layer's activation kept / rebuilt)
# from the repository root, with the wheels folder .whl there: OUT=<folder> bash <this file> <commit>
set -u
C=${1:?commit}
OUT=$OUT bash benchmarks/gpu_check.sh env build
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
start=$SECONDS
APM_FAST_REQUIRE_CUDA_EXT=1 timeout 200 python3 -m pytest -q -m gpu tests/test_cuda_backend.py tests/test_engine_gpu.py tests/test_driver.py tests/test_triton_kernels.py -p no:cacheprovider \
  -k "not full_size and (not test_cuda_backend or first_layer or adam) and (not test_engine_gpu or side_by_side or replay) and (not test_triton_kernels or first_layer)" > $OUT/gpu-tests.log 2>&1
tail -3 $OUT/gpu-tests.log; echo "tests took $((SECONDS - start)) s"
S="profile/triton/S=1 profile/cuda/S=1 profile/triton/S=64 profile/cuda/S=64 latency/triton/eager latency/cuda/eager latency/triton/graph/one-stream latency/cuda/graph/one-stream latency/triton/graph/wgrad-inline latency/cuda/graph/wgrad-inline memory/triton latency/triton/graph/position-gemm latency/triton/graph/trigger-written latency/triton/graph/adam-after-backward latency/cuda/graph/adam-beside-backward latency/cuda/graph/trigger-factors latency/cuda/graph/position-halves"
timeout 280 python3 -m apm_fast.bench --device cuda --commit $C --time-budget 230 --only engine --preset ttt-l14 --no-plots --skip torch reference authors compile $S --out $OUT/engine > $OUT/engine.log 2>&1
grep -E "latency|memory|gate" $OUT/engine.log | head -30
cp $OUT/engine/*.json $OUT/ 2>/dev/null; ls $OUT
