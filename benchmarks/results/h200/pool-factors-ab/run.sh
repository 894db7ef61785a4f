#!/usr/bin/env bash
# from the repository root: the build, the GPU tests of the cuda table, the engine and the driver
# (the pool factors' own test among them), the A/B of pool_ab.py, then the one-image step
# timelines of pool_profile.py: OUT=<folder> bash run.sh [notests]
set -u
OUT=$OUT bash benchmarks/gpu_check.sh env build > $OUT/build-stage.log 2>&1; tail -3 $OUT/build-stage.log
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
if [ "${1:-}" != notests ]; then
APM_FAST_REQUIRE_CUDA_EXT=1 timeout 200 python3 -m pytest -q -m gpu tests/test_cuda_backend.py tests/test_engine_gpu.py \
  tests/test_driver.py -p no:cacheprovider -k "not full_size and (not test_cuda_backend or adam or first_layer or fp32_output or pool or bad_arguments or gemm) and (not test_engine_gpu or side_by_side or replay or pool_weights)" \
  > $OUT/gpu-tests.log 2>&1; tail -3 $OUT/gpu-tests.log
fi
timeout 280 python3 benchmarks/results/h200/pool-factors-ab/pool_ab.py $OUT/pool_ab.jsonl > /dev/null 2> $OUT/ab.err
cat $OUT/pool_ab.jsonl; tail -3 $OUT/ab.err
timeout 100 python3 benchmarks/results/h200/pool-factors-ab/pool_profile.py $OUT/pool_profile.jsonl 2> $OUT/prof.err; tail -3 $OUT/prof.err
