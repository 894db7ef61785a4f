#!/usr/bin/env bash
# one call, from the repository root: OUT=<folder> bash call_final.sh <commit>
# the build, then the targets run (call_targets.sh, beside this file) with what the call has left
set -u
C=${1:?commit}
T0=$(date +%s)
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
python3 -c "import apm_fast._C_cuda" 2>/dev/null || { echo building; OUT=$OUT bash benchmarks/gpu_check.sh env build > $OUT/build.log 2>&1; tail -2 $OUT/build.log; }
LEFT=$(( 590 - ($(date +%s) - T0) ))
echo "build done at $(( $(date +%s) - T0 )) s; the bench gets $LEFT s"
OUT=$OUT bash "$(dirname "$0")/call_targets.sh" $C $LEFT
echo "all done at $(( $(date +%s) - T0 )) s"
