#!/usr/bin/env bash
# from the repository root: OUT=<folder> bash run.sh <commit>
set -u
C=${1:?commit}
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
OUT=$OUT bash benchmarks/gpu_check.sh build > $OUT/build.log 2>&1; tail -1 $OUT/build.log
timeout 300 python3 -m apm_fast.bench --device cuda --commit $C --time-budget 240 --only engine --preset ttt-l14 --no-plots --skip torch reference authors compile latency/triton/eager latency/triton/graph/adam-after-backward latency/triton/graph/wgrad-inline latency/triton/graph/one-stream latency/triton/graph/trigger-written latency/triton/graph/position-gemm latency/triton/graph/first-act-rebuilt memory/triton latency/cuda/eager latency/cuda/graph/adam-beside-backward latency/cuda/graph/wgrad-inline latency/cuda/graph/one-stream latency/cuda/graph/trigger-factors latency/cuda/graph/position-gemm latency/cuda/graph/first-act-rebuilt memory/cuda --out $OUT/e > $OUT/engine.log 2>&1
cp $OUT/e/*/engine.json $OUT/engine.json 2>/dev/null; grep -E "^engine|gate|profile" $OUT/engine.log | tail -20
