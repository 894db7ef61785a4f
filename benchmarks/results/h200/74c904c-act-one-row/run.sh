#!/usr/bin/env bash
# from the repository root at 74c904c with the experiment switch (in kernels/gemm.py, ONE_ROW also
# required os.environ.get("APM_FAST_ACT_ONE_ROW", "1") != "0"), the Triton table only (no build):
# OUT=<folder> bash run.sh
set -u
ln -sfn ../kernels apm_fast/kernels
export PYTHONPATH=.
timeout 100 python3 -m pytest -q -m gpu tests/test_triton_kernels.py -k "primitives_match" > $OUT/gpu-tests.log 2>&1; tail -2 $OUT/gpu-tests.log
timeout 170 python3 benchmarks/results/h200/74c904c-act-one-row/act_ab.py $OUT/act_ab.jsonl > /dev/null 2> $OUT/ab.err; cat $OUT/act_ab.jsonl; tail -3 $OUT/ab.err
