#!/usr/bin/env bash
# one call, from the repository root: OUT=<folder> bash run.sh <commit>
# the build, the GPU tests of the reset and Adam (gpu-tests.log), the targets run (targets.sh)
set -u
C=${1:?commit}
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
python3 -c "import apm_fast._C_cuda" 2>/dev/null || { echo building; OUT=$OUT bash benchmarks/gpu_check.sh env build > $OUT/build.log 2>&1; tail -2 $OUT/build.log; }
APM_FAST_REQUIRE_CUDA_EXT=1 timeout 90 python3 -m pytest -q -m gpu tests/test_cuda_backend.py tests/test_engine_gpu.py -k "adam or broadcast or step_one or pool_weights or side_by_side" -p no:cacheprovider -rfE > $OUT/gpu-tests.log 2>&1
tail -4 $OUT/gpu-tests.log
# (the bench's budget was set from the time the call had left: 363 s, timeout 423, as in targets.sh)
OUT=$OUT bash "$(dirname "$0")/targets.sh" $C
