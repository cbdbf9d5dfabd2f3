#!/usr/bin/env bash
# One device call (NVIDIA H200): does issue 14's NaN at seq 8192 reproduce on the code of 2026-11-29 (old4bd/, a
# `git archive 4bd0a58` of qtool/ and bench/), and does today's code stay finite over 8 steps, twice?
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 QTOOL_BENCH_STEPS=8
C='[{"seq_len": 8192, "rank": 16, "targets": "qkvo", "gc": true, "batch_size": 1}]'
for run in old new new; do
  if [ $run = old ]; then d=old4bd; else d=.; fi
  (cd $d && PYTHONPATH=/tmp/site:$PWD timeout 120 python3 bench/gpu_worker.py qtool llama-2-7b "$C") > $OUT/$run.txt 2>&1
  echo "$run rc=$?: $(grep -o '"losses": \[[^]]*\]' $OUT/$run.txt) $(grep -o 'loss became[^"]*' $OUT/$run.txt | head -1) $(grep -m1 -o 'Error.*' $OUT/$run.txt | head -c 200)"
done
