#!/usr/bin/env bash
# One device call (NVIDIA H200), 2026-12-04, the session's last ~3 minutes of device time: qtool with the flat
# buffer, the 64 MiB loss chunk and --offload-activations on issue 11's rows; the paged-optimizer demo under the
# plan's cap; the trainer's CUDA-graph tests (graph vs eager, the stream test). Run with .whl carried.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 QTOOL_FIXTURES=/tmp/nofixtures QTOOL_BENCH_STEPS=8
O='"rank": 16, "targets": "qkvo", "gc": true, "offload": true'
timeout 55 python3 bench/gpu_worker.py qtool llama-2-7b "[{\"seq_len\": 2048, $O}, {\"seq_len\": 512, $O}]" \
  > $OUT/offload.jsonl 2> $OUT/offload.err; echo "7b rc=$?"
timeout 40 python3 bench/gpu_worker.py qtool llama-3-8b "[{\"seq_len\": 2048, $O}]" >> $OUT/offload.jsonl \
  2>> $OUT/offload.err; echo "8b rc=$?"
timeout 60 python3 bench/paged_oom.py --out $OUT/paged_oom.jsonl 2> $OUT/paged_oom.err | sed -n '/^$/,$p'
timeout 45 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py > $OUT/gpu_tests.txt 2>&1
tail -1 $OUT/gpu_tests.txt; grep -E "^(FAILED|ERROR)" $OUT/gpu_tests.txt | head -5
python3 -c "
import json,sys
for l in open('$OUT/offload.jsonl'):
    if not l.startswith('{'): continue
    r=json.loads(l); m=r['measured']
    print(r['id'], 'tok/s %.0f'%m.get('tokens_per_second',0), 'alloc %.3f reserved %.3f nvml %.3f GiB'%tuple(m.get(k,0)/2**30 for k in ('peak_allocated_bytes','peak_reserved_bytes','nvml_used_bytes')), r.get('error') or '')
"
