#!/usr/bin/env bash
# One device call (NVIDIA H200): issue 11's paged-optimizer demonstration. bench/paged_oom.py at its default
# configuration (llama-3.2-1b, LoRA rank 512 on all-linear, seq 128, batch 1) under the plan's separating allocator
# cap, then both optimizers under a 100 GiB cap (their uncapped peaks, to set beside the plan). Carries
# bitsandbytes' wheel in .whl/.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 QTOOL_FIXTURES=/tmp/nofixtures
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
echo "== the plan's separating cap"
timeout 240 python3 bench/paged_oom.py --out $OUT/paged_oom.jsonl 2> $OUT/paged_oom.err | sed -n '/^$/,$p'
echo "== --cap 100GiB: the uncapped peaks"
timeout 240 python3 bench/paged_oom.py --cap 100GiB --out $OUT/paged_oom_uncapped.jsonl 2>> $OUT/paged_oom.err \
  | sed -n '/^$/,$p'
grep -v Warning $OUT/paged_oom.err | tail -5
