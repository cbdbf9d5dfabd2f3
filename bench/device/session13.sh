#!/usr/bin/env bash
# One device call (NVIDIA H200), 2026-12-04 (second session), after bench/device/issue11_h200.sh: the GPU tests of
# the trainer's kernels and graphs and of the allocator set-up (expandable segments); the reserved probe on
# bench/paged_oom.py's configuration (rows 1, 2: paged and device optimizer state; default vs expandable); the
# paged-optimizer demonstration as qtool train runs now; LLaMA-65B at 512 against transformers + PEFT +
# bitsandbytes (issue 11's 2x target). Carry .whl. $OUT: gpu_tests.txt, probe.jsonl, paged_oom.jsonl, 65b.jsonl.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 QTOOL_FIXTURES=/tmp/nofixtures QTOOL_BENCH_STEPS=10
t0=$SECONDS
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py tests/test_train_allocator.py \
  > $OUT/gpu_tests.txt 2>&1; echo "tests rc=$? at $((SECONDS - t0)) s"
tail -1 $OUT/gpu_tests.txt; grep -E "^(FAILED|ERROR)" $OUT/gpu_tests.txt | head -5
timeout 130 python3 bench/reserved_probe.py --rows 1,2 --alloc both --out $OUT/probe.jsonl > $OUT/probe.txt 2>&1
echo "probe rc=$? at $((SECONDS - t0)) s"; sed -n '/^row/,$p' $OUT/probe.txt
timeout 80 python3 bench/paged_oom.py --out $OUT/paged_oom.jsonl 2> $OUT/paged_oom.err | sed -n '/^$/,$p'
echo "paged_oom at $((SECONDS - t0)) s"
C='[{"seq_len": 512, "rank": 16, "targets": "qkvo", "gc": true}]'
timeout 100 python3 bench/gpu_worker.py qtool llama-1-65b "$C" >> $OUT/65b.jsonl 2> $OUT/65b.err; echo "65b qtool rc=$? at $((SECONDS - t0)) s"
timeout 150 python3 bench/gpu_worker.py hf llama-1-65b "$C" >> $OUT/65b.jsonl 2>> $OUT/65b.err; echo "65b hf rc=$? at $((SECONDS - t0)) s"
python3 -c "
import json
for l in open('$OUT/65b.jsonl'):
    if not l.startswith('{'): continue
    r=json.loads(l); m=r['measured']
    print('%-44s tok/s %6.0f TFLOP/s %5.0f alloc %.3f reserved %.3f nvml %.3f GiB %s' % (r['id'], m.get('tokens_per_second',0), m.get('achieved_tflops',0), *(m.get(k,0)/2**30 for k in ('peak_allocated_bytes','peak_reserved_bytes','nvml_used_bytes')), r.get('error') or m.get('cuda_graph')))
"
