#!/usr/bin/env bash
# from the repository root, with .whl there: OUT=<folder> bash call_targets.sh <commit> [seconds for the bench]
# the targets run: every row of the targets, the tables' other ways left out (--skip patterns)
set -u
C=${1:?commit}
B=${2:-430}
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
python3 -c "import torch, apm_fast._C_cuda" 2>/dev/null || { echo "building"; OUT=$OUT bash benchmarks/gpu_check.sh env build > $OUT/build.log 2>&1; tail -2 $OUT/build.log; }
SKIP="authors compile profile/* memory/* latency/*/eager latency/*/graph/one-stream latency/*/graph/wgrad-inline"
SKIP="$SKIP latency/*/graph/trigger-* latency/*/graph/position-* latency/*/graph/first-act-* latency/*/graph/pool-*"
SKIP="$SKIP latency/torch/graph/adam-* side-by-side/torch/* side-by-side/*/S=64/position-* side-by-side/*/S=64/first-act-*"
SKIP="$SKIP side-by-side/*/S=64/pool-* side-by-side/*/S=64/adam-*"
BENCH_BUDGET=$((B - 60)) BENCH_TIMEOUT=$B APM_FAST_COMMIT=$C BENCH_ARGS="--only step engine throughput scaling --preset ttt-l14 --skip $SKIP --students-list 64 --e2e-images 256 --scaling-grids 56 224 --engine-presets ttt-b16 ttt-l14 ttt-h14" OUT=$OUT bash benchmarks/gpu_check.sh bench > $OUT/bench-stage.log 2>&1
tail -45 $OUT/bench-stage.log
