#!/usr/bin/env bash
# from the repository root at 6245dad: OUT=<folder> bash run.sh
set -u
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
OUT=$OUT bash benchmarks/gpu_check.sh env build > $OUT/build.log 2>&1; tail -2 $OUT/build.log
APM_FAST_REQUIRE_CUDA_EXT=1 timeout 200 python3 -m pytest -q -m gpu tests/test_cuda_backend.py tests/test_engine_gpu.py tests/test_driver.py tests/test_triton_kernels.py -k "not full_size and (not test_cuda_backend or adam or first_layer or fp32_output or pool or bad_arguments) and (not test_engine_gpu or side_by_side or replay) and (not test_triton_kernels or first_layer or primitives_match or pool)" > $OUT/gpu-tests.log 2>&1; tail -4 $OUT/gpu-tests.log
POOL_LABEL=cuda-6245dad timeout 120 python3 benchmarks/results/h200/measured-not-kept/6245dad-cuda-pool-tensor-cores/pool_prof.py $OUT/prof.jsonl > /dev/null 2>&1; cat $OUT/prof.jsonl
