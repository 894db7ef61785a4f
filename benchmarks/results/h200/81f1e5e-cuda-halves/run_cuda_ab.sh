#!/usr/bin/env bash
set -u
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
OUT=$OUT bash benchmarks/gpu_check.sh build > $OUT/build.log 2>&1; tail -2 $OUT/build.log
APM_FAST_REQUIRE_CUDA_EXT=1 timeout 120 python3 -m pytest -q -m gpu tests/test_cuda_backend.py tests/test_engine_gpu.py -k "first_layer or side_by_side" > $OUT/gpu-tests.log 2>&1; tail -2 $OUT/gpu-tests.log
for i in 1 2; do timeout 120 python3 benchmarks/results/h200/81f1e5e-cuda-halves/engine_ab.py run$i $OUT/cuda_ab.jsonl cuda > /dev/null 2>> $OUT/ab.err; done
cat $OUT/cuda_ab.jsonl; tail -3 $OUT/ab.err
