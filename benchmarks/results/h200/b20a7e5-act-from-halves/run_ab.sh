#!/usr/bin/env bash
# from the repository root: OUT=<folder> bash run_ab.sh ; old tree: git archive a5ae814 apm_fast kernels > scratch/old.tar; scratch/engine_ab.py: ../81f1e5e-cuda-halves/engine_ab.py (the run had an earlier version of it, without the other ways: the rows without a "way" are the default ones)
set -u
OUT=$OUT bash benchmarks/gpu_check.sh env build > $OUT/build.log 2>&1; tail -3 $OUT/build.log
export PYTHONPATH=/tmp/site
APM_FAST_REQUIRE_CUDA_EXT=1 timeout 240 python3 -m pytest -q -m gpu tests/test_cuda_backend.py tests/test_engine_gpu.py tests/test_driver.py tests/test_triton_kernels.py -k "not full_size and (not test_cuda_backend or adam or first_layer or fp32_output) and (not test_engine_gpu or side_by_side or replay) and (not test_triton_kernels or first_layer or primitives_match or pool)" > $OUT/gpu-tests.log 2>&1; tail -3 $OUT/gpu-tests.log
mkdir -p /tmp/old && tar -xf scratch/old.tar -C /tmp/old && ln -sfn ../kernels /tmp/old/apm_fast/kernels
for i in 1 2; do
  timeout 100 python3 scratch/engine_ab.py new $OUT/engine_ab.jsonl > /dev/null 2>> $OUT/ab.err
  (cd /tmp/old && PYTHONPATH=/tmp/old timeout 100 python3 $OLDPWD/scratch/engine_ab.py old $OUT/engine_ab.jsonl > /dev/null 2>> $OUT/ab.err)
done
cat $OUT/engine_ab.jsonl; tail -5 $OUT/ab.err
