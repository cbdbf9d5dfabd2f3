#!/usr/bin/env bash
# One device call (NVIDIA H200), 2026-12-04: issue 11's --offload-activations. The GPU test (each training in a fresh
# process) and the 7B/8B measurements with and without offloading (bench/results/offload_h200_2026-12-04.*).
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 QTOOL_FIXTURES=/tmp/nofixtures
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu -s tests/test_offload.py > $OUT/gpu_test.txt 2>&1; tail -2 $OUT/gpu_test.txt
timeout 260 python3 bench/offload_memory.py --configs llama-2-7b:2048:1,llama-3-8b:2048:1,llama-2-7b:512:1,llama-2-7b:8192:1 \
  --out $OUT/offload.jsonl > $OUT/bench.txt 2> $OUT/bench.err; echo "bench rc=$?"
sed -n '/^model /,$p' $OUT/bench.txt
