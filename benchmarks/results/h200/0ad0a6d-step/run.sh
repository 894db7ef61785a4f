#!/usr/bin/env bash
set -u
# from the repository root, with the wheels folder .whl there: OUT=<folder> bash <this file> <commit>
C=${1:?commit}
OUT=$OUT bash benchmarks/gpu_check.sh build
S="profile/triton/S=1 profile/cuda/S=1 profile/triton/S=64 profile/cuda/S=64 latency/triton/eager latency/cuda/eager latency/triton/graph/one-stream latency/cuda/graph/one-stream latency/triton/graph/wgrad-inline latency/cuda/graph/wgrad-inline memory/triton memory/cuda latency/triton/graph/position-gemm latency/triton/graph/trigger-written latency/triton/graph/adam-after-backward latency/cuda/graph/adam-beside-backward latency/cuda/graph/trigger-factors latency/cuda/graph/position-halves latency/triton/graph/first-act-rebuilt latency/cuda/graph/first-act-rebuilt"
for i in 1 2; do
timeout 150 python3 -m apm_fast.bench --device cuda --commit $C --time-budget 120 --only engine --preset ttt-l14 --no-plots --skip torch reference authors compile $S --out $OUT/e$i > $OUT/engine-$i.log 2>&1
cp $OUT/e$i/*/engine.json $OUT/engine-$i.json; grep -E "^engine latency|gate" $OUT/engine-$i.log
done
