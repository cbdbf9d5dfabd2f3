#!/usr/bin/env bash
# One device call (NVIDIA H200), 2026-12-04 (second session): issue 11 on the trainer that captures its CUDA graph
# on the warm-up's stream and gives the held-out pass's cuBLAS workspace back (qtool.train.recipe REVISION
# 2026-12-04b). qtool alone, each row in a fresh process: Llama-2-7B at 512 and 2048 and Llama-3-8B at 2048, r16
# q,k,v,o, GC, batch 1, with and without --offload-activations, the last two steps profiled (QTOOL_PROFILE=replay:
# GPU time per kernel kind inside the graph replays); the reserved probe (default vs expandable segments) on the
# 7B 2048 row; the paged-optimizer demonstration under the plan's cap; the GPU tests of the trainer's kernels and
# graphs. Run with .whl carried. $OUT: rows.jsonl, rows.err, probe.jsonl, paged_oom.jsonl, gpu_tests.txt.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 QTOOL_FIXTURES=/tmp/nofixtures QTOOL_BENCH_STEPS=10
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/versions.txt
python3 -c "import sys, torch, triton, bitsandbytes as b; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'bitsandbytes', b.__version__)" | tee -a $OUT/versions.txt
C='"rank": 16, "targets": "qkvo", "gc": true'
t0=$SECONDS
for row in "llama-2-7b 512" "llama-2-7b 2048" "llama-3-8b 2048"; do
  set -- $row
  for off in false true; do
    QTOOL_PROFILE=replay timeout 60 python3 bench/gpu_worker.py qtool $1 "[{\"seq_len\": $2, $C, \"offload\": $off}]" \
      >> $OUT/rows.jsonl 2>> $OUT/rows.err; echo "$1 $2 offload=$off rc=$? at $((SECONDS - t0)) s"
  done
done
timeout 100 python3 bench/reserved_probe.py --rows 3 --alloc both --out $OUT/probe.jsonl > $OUT/probe.txt 2>&1
echo "probe rc=$?"; tail -8 $OUT/probe.txt
timeout 100 python3 bench/paged_oom.py --out $OUT/paged_oom.jsonl 2> $OUT/paged_oom.err | sed -n '/^$/,$p'
timeout 80 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py > $OUT/gpu_tests.txt 2>&1
tail -1 $OUT/gpu_tests.txt; grep -E "^(FAILED|ERROR)" $OUT/gpu_tests.txt | head -5
grep -h "^###\|^  " $OUT/rows.err | grep -v Warning | head -80
python3 -c "
import json
for l in open('$OUT/rows.jsonl'):
    if not l.startswith('{'): continue
    r=json.loads(l); m=r['measured']
    print('%-44s tok/s %6.0f TFLOP/s %5.0f alloc %.3f reserved %.3f nvml %.3f paged %.3f GiB %s' % (r['id'], m.get('tokens_per_second',0), m.get('achieved_tflops',0), *(m.get(k,0)/2**30 for k in ('peak_allocated_bytes','peak_reserved_bytes','nvml_used_bytes','paged_state_bytes')), r.get('error') or m.get('cuda_graph')))
"
