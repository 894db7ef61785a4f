#!/usr/bin/env bash
set -u
C=${1:?commit}
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
python3 -c "import torch, apm_fast._C_cuda" 2>/dev/null || { OUT=$OUT bash benchmarks/gpu_check.sh build > $OUT/build.log 2>&1; tail -2 $OUT/build.log; }
S="profile/triton/S=1 profile/cuda/S=1 profile/triton/S=64 profile/cuda/S=64 latency/triton/eager latency/cuda/eager latency/triton/graph/one-stream latency/cuda/graph/one-stream latency/triton/graph/wgrad-inline latency/cuda/graph/wgrad-inline memory/triton memory/cuda latency/triton/graph/position-gemm latency/triton/graph/trigger-written latency/triton/graph/adam-after-backward latency/cuda/graph/adam-beside-backward latency/cuda/graph/trigger-factors latency/cuda/graph/position-halves latency/cuda/graph/position-gemm latency/triton/graph/first-act-rebuilt latency/cuda/graph/first-act-rebuilt"
timeout 200 python3 -m apm_fast.bench --device cuda --commit $C --time-budget 170 --only engine --preset ttt-l14 --no-plots --skip torch reference authors compile $S --out $OUT/e > $OUT/engine.log 2>&1
cp $OUT/e/*/engine.json $OUT/engine.json 2>/dev/null; grep -E "^engine latency|gate" $OUT/engine.log
