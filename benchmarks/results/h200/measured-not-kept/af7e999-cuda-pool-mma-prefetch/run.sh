#!/usr/bin/env bash
# from the repository root at af7e999, with cuda_pool_ab2.py made first from the 6245dad record:
# patch -o cuda_pool_ab2.py ../6245dad-cuda-pool-tensor-cores/cuda_pool_ab.py cuda_pool_ab2.patch (in this folder)
# OUT=<folder> bash run.sh
set -u
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
OUT=$OUT bash benchmarks/gpu_check.sh env build > $OUT/build.log 2>&1; tail -2 $OUT/build.log
APM_FAST_REQUIRE_CUDA_EXT=1 timeout 150 python3 -m pytest -q -m gpu tests/test_cuda_backend.py tests/test_engine_gpu.py -k "not full_size and (not test_cuda_backend or pool or first_layer or fp32_output) and (not test_engine_gpu or side_by_side or replay)" > $OUT/gpu-tests.log 2>&1; tail -12 $OUT/gpu-tests.log
timeout 200 python3 benchmarks/results/h200/measured-not-kept/af7e999-cuda-pool-mma-prefetch/cuda_pool_ab2.py $OUT/cuda_pool_ab2.jsonl > /dev/null 2> $OUT/ab.err; cat $OUT/cuda_pool_ab2.jsonl; tail -5 $OUT/ab.err
POOL_LABEL=cuda-mma timeout 60 python3 benchmarks/results/h200/measured-not-kept/6245dad-cuda-pool-tensor-cores/pool_prof.py $OUT/prof.jsonl > /dev/null 2>&1; grep '"S": 64' $OUT/prof.jsonl
