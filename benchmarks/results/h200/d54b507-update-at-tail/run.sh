#!/usr/bin/env bash
# the A/B of the update at the backward's tail (APM_FAST_TAIL, a switch of this experiment only)
# from the repository root, with the wheels folder .whl there: OUT=<folder> bash <this file> <commit>
set -u
C=${1:?commit}
OUT=$OUT bash benchmarks/gpu_check.sh build
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
APM_FAST_REQUIRE_CUDA_EXT=1 timeout 200 python3 -m pytest -q -m gpu tests/test_cuda_backend.py tests/test_engine_gpu.py tests/test_driver.py -p no:cacheprovider \
  -k "not full_size and (not test_cuda_backend or adam or first_layer) and (not test_engine_gpu or side_by_side or replay)" > $OUT/gpu-tests.log 2>&1
tail -2 $OUT/gpu-tests.log
S="profile/triton/S=1 profile/cuda/S=1 profile/triton/S=64 profile/cuda/S=64 latency/triton/eager latency/cuda/eager latency/triton/graph/one-stream latency/cuda/graph/one-stream latency/triton/graph/wgrad-inline latency/cuda/graph/wgrad-inline memory/triton memory/cuda latency/triton/graph/position-gemm latency/triton/graph/trigger-written latency/cuda/graph/adam-beside-backward latency/cuda/graph/trigger-factors latency/cuda/graph/position-halves latency/triton/graph/first-act-rebuilt latency/cuda/graph/first-act-rebuilt"
for i in 1 2; do for t in 1 0; do
  APM_FAST_TAIL=$t timeout 200 python3 -m apm_fast.bench --device cuda --commit $C --time-budget 150 --only engine --preset ttt-l14 --no-plots --skip torch reference authors compile $S --out $OUT/e$i$t > $OUT/engine-$i-$t.log 2>&1
  cp $OUT/e$i$t/*/engine.json $OUT/engine-run$i-tail$t.json
  echo "run $i tail=$t"; grep -E "^engine latency" $OUT/engine-$i-$t.log
done; done
