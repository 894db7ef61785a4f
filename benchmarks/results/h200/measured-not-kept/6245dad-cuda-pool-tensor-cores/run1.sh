#!/usr/bin/env bash
# The experiment's tree, from the repository root at 6245dad's parent (801c6b1): the old
# csrc/cuda/pool.cu first copied to csrc/cuda/pool_old.cu with
# pool_tile_rows, pool_tiles, pool_fwd and pool_bwd renamed *_old (and kPoolMaxWidth written as
# 2048); then pool_mma.patch applied (csrc/cuda/pool.cu: the tensor-core kernels) and
# experiment-switch.patch (APM_FAST_POOL_OLD=1 calls the old kernels). Then:
# OUT=<folder> bash run1.sh
set -u
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
OUT=$OUT bash benchmarks/gpu_check.sh env build > $OUT/build.log 2>&1; tail -3 $OUT/build.log
APM_FAST_REQUIRE_CUDA_EXT=1 timeout 200 python3 -m pytest -q -m gpu tests/test_cuda_backend.py tests/test_engine_gpu.py tests/test_driver.py tests/test_triton_kernels.py -k "not full_size and (not test_cuda_backend or adam or first_layer or fp32_output or pool or bad_arguments) and (not test_engine_gpu or side_by_side or replay) and (not test_triton_kernels or first_layer or primitives_match or pool)" > $OUT/gpu-tests.log 2>&1; tail -15 $OUT/gpu-tests.log
timeout 240 python3 benchmarks/results/h200/measured-not-kept/6245dad-cuda-pool-tensor-cores/cuda_pool_ab.py $OUT/cuda_pool_ab.jsonl > /dev/null 2> $OUT/ab.err; cat $OUT/cuda_pool_ab.jsonl; tail -5 $OUT/ab.err
