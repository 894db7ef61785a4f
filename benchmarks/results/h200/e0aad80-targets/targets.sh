#!/usr/bin/env bash
# from the repository root, with .whl there: OUT=<folder> bash targets.sh <commit> (run.sh calls it)
# the targets run: every row of the targets, the tables' other ways left out
set -u
C=${1:?commit}
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
python3 -c "import torch, apm_fast._C_cuda" 2>/dev/null || { echo "building"; OUT=$OUT bash benchmarks/gpu_check.sh env build > $OUT/build.log 2>&1; tail -2 $OUT/build.log; }
SKIP="authors compile"
for t in torch triton cuda; do
  SKIP="$SKIP profile/$t/S=64 profile/$t/S=1 latency/$t/eager latency/$t/graph/one-stream latency/$t/graph/wgrad-inline memory/$t"
  SKIP="$SKIP latency/$t/graph/trigger-written latency/$t/graph/trigger-factors latency/$t/graph/position-gemm latency/$t/graph/position-halves"
  SKIP="$SKIP latency/$t/graph/first-act-rebuilt latency/$t/graph/first-act-kept latency/$t/graph/pool-written latency/$t/graph/pool-factors"
  SKIP="$SKIP side-by-side/$t/S=64/position-gemm side-by-side/$t/S=64/position-halves side-by-side/$t/S=64/first-act-rebuilt"
  SKIP="$SKIP side-by-side/$t/S=64/first-act-kept side-by-side/$t/S=64/pool-written side-by-side/$t/S=64/pool-factors"
  SKIP="$SKIP side-by-side/$t/S=64/adam-after-backward side-by-side/$t/S=64/adam-beside-backward"
done
SKIP="$SKIP side-by-side/torch/S=64 side-by-side/torch/S=64/bf16-moments latency/torch/graph/adam-beside-backward"
BENCH_BUDGET=363 BENCH_TIMEOUT=423 APM_FAST_COMMIT=$C BENCH_ARGS="--only step engine throughput scaling --preset ttt-l14 --skip $SKIP --students-list 64 --e2e-images 256 --scaling-grids 56 224" OUT=$OUT bash benchmarks/gpu_check.sh bench > $OUT/bench-stage.log 2>&1
tail -45 $OUT/bench-stage.log
