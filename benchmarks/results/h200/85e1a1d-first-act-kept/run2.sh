#!/usr/bin/env bash
# call 2 (warm machine): 64 students side by side, the cuda table's ways against its default
# from the repository root, with the wheels folder .whl there: OUT=<folder> bash <this file> <commit>
set -u
C=${1:?commit}
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
python3 -c "import torch, apm_fast._C_cuda" || { echo "no build here"; OUT=$OUT bash benchmarks/gpu_check.sh build; }
S="alone/triton alone/cuda side-by-side/triton/S=64/bf16-moments side-by-side/cuda/S=64/bf16-moments side-by-side/triton/S=64/adam-after-backward side-by-side/cuda/S=64/adam-beside-backward side-by-side/triton/S=64/position-gemm side-by-side/triton/S=64/first-act-kept"
timeout 400 python3 -m apm_fast.bench --device cuda --commit $C --time-budget 330 --only throughput --preset ttt-l14 --no-plots --students-list 64 --e2e-images 0 --skip torch reference authors compile $S --out $OUT/tp > $OUT/throughput.log 2>&1
grep -E "side-by-side|alone" $OUT/throughput.log | head -30
cp $OUT/tp/*.json $OUT/ 2>/dev/null; ls $OUT
