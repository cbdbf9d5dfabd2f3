#!/usr/bin/env bash
# One device call (NVIDIA H200): GPU tests, LoftQ against PEFT's (CUDA only), a 7B trainer sanity run with the new
# adapter layer (zero and symmetric init), each output under $OUT. Run from the repo root with .whl (bitsandbytes
# 0.50.2 wheel) and .bench-data (bench/loftq_vs_peft.py --extract) carried.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 QTOOL_GPU_RECORD=$OUT/nf4_cuda_vs_bnb.json
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/versions.txt
python3 -c "import torch, triton, transformers, peft, bitsandbytes as b; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', b.__version__)" | tee -a $OUT/versions.txt
timeout 330 python3 -m pytest -q -rA -m gpu tests/test_kernels_cuda.py tests/test_fused_cuda.py tests/test_nf4_cuda.py -p no:cacheprovider -s 2>&1 | tee $OUT/gpu-tests.txt | grep -E "passed|failed|FAILED|rope|Error" | tail -25
timeout 120 python3 bench/loftq_vs_peft.py --tensors .bench-data/smollm2-tensors.safetensors --json $OUT/loftq_vs_peft.json 2>&1 | tee $OUT/loftq_vs_peft.md | tail -12
QTOOL_BENCH_STEPS=8 timeout 150 python3 bench/gpu_worker.py qtool llama-2-7b '[{"seq_len":512,"rank":16,"targets":"qkvo","gc":true},{"seq_len":2048,"rank":16,"targets":"qkvo","gc":true},{"seq_len":2048,"rank":16,"targets":"qkvo","gc":true,"init":"symmetric"}]' > $OUT/train_7b.jsonl 2> $OUT/train_7b.err
python3 - <<'PY'
import json, os
from qtool.plan.planner import plan_for_record
for line in open(os.path.join(os.environ["OUT"], "train_7b.jsonl")):
    r = json.loads(line)
    m = r.get("measured") or {}
    p = plan_for_record(r)
    print(f"{r['id']}: {m.get('tokens_per_second', 0):,.0f} tok/s, peak alloc {m.get('peak_allocated_bytes', 0)/2**30:.2f} GiB"
          f" (plan {p.peak_allocated_bytes/2**30:.2f}), graph {m.get('cuda_graph')}, err {r.get('error')}")
PY
tail -3 $OUT/train_7b.err
