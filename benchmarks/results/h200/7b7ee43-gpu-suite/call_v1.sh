#!/usr/bin/env bash
# build, the full GPU suite, then the engine's one-image rows and profiles of both kernel tables
set -u
C=${1:?commit}
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
T0=$(date +%s)
python3 -c "import apm_fast._C_cuda" 2>/dev/null || { echo building; OUT=$OUT bash benchmarks/gpu_check.sh env build > $OUT/build.log 2>&1; tail -2 $OUT/build.log; }
echo "build done at $(( $(date +%s) - T0 )) s"
APM_FAST_REQUIRE_CUDA_EXT=1 timeout 300 python3 -m pytest -q -m gpu tests -p no:cacheprovider -rfE --durations=5 > $OUT/gpu-tests.log 2>&1
tail -12 $OUT/gpu-tests.log
timeout 120 python3 .diag/adam_probe.py $OUT/adam_probe.json > $OUT/adam_probe.log 2>&1; cat $OUT/adam_probe.log | tail -12
echo "tests done at $(( $(date +%s) - T0 )) s"
LEFT=$(( 580 - ($(date +%s) - T0) ))
SKIP="torch reference authors compile"
for t in triton cuda; do
  SKIP="$SKIP profile/$t/S=64 latency/$t/eager latency/$t/graph/one-stream latency/$t/graph/wgrad-inline memory/$t"
  SKIP="$SKIP latency/$t/graph/trigger-written latency/$t/graph/trigger-factors latency/$t/graph/position-gemm latency/$t/graph/position-halves"
  SKIP="$SKIP latency/$t/graph/first-act-rebuilt latency/$t/graph/first-act-kept latency/$t/graph/pool-written latency/$t/graph/pool-factors"
  SKIP="$SKIP latency/$t/graph/adam-after-backward"
done
timeout $((LEFT - 5)) python3 -m apm_fast.bench --device cuda --commit $C --time-budget $((LEFT - 40)) --only engine --preset ttt-l14 --no-plots --out $OUT/suite --skip $SKIP > $OUT/bench.log 2>&1
tail -30 $OUT/bench.log
echo "all done at $(( $(date +%s) - T0 )) s"
