#!/usr/bin/env bash
# Issue 9 on one NVIDIA H200, < 3 minutes: AdaLoRA in the CUDA-graph trainer (masking in place between graph replays
# gives the eager path's losses and budget), and AdaLoRA's peak allocated memory beside `qtool plan` (goal: within 5%)
# with plain LoRA at the same initial rank as the reference row. Prints a short table last.
# Run from the repo root with .whl (the bitsandbytes 0.50.2 wheel) carried; outputs under $OUT (default ./out-adalora).
set -o pipefail
OUT=${OUT:-$PWD/out-adalora}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 QTOOL_BENCH_STEPS=6
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/versions.txt"
python3 -c "import torch, transformers, peft, bitsandbytes as b; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', b.__version__)" | tee -a "$OUT/versions.txt"
# 1. the CUDA-graph path against the eager path (SmolLM2 shape, 8 steps, init 6 -> target 2 over 210 modules)
timeout 60 python3 -m pytest -q -rA -m gpu tests/test_adalora.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.txt" | grep -E "passed|failed|FAILED|Error" | tail -5
# 2. peaks beside the plan: Llama-2-7B shape (random NF4 weights), seq 2048, GC, paged AdamW 32-bit, 6 steps
#    (the budget falls over steps 1-4 during the graph replays, mask fixed at step 5); peaks after 2 warm-up steps
timeout 100 python3 bench/gpu_worker.py qtool llama-2-7b '[{"seq_len":2048,"rank":12,"targets":"qkvo","gc":true},{"seq_len":2048,"rank":12,"targets":"qkvo","gc":true,"method":"adalora","target_rank":8},{"seq_len":2048,"rank":12,"targets":"all-linear","gc":true,"method":"adalora","target_rank":8}]' > "$OUT/adalora_7b.jsonl" 2> "$OUT/adalora_7b.err"
tail -3 "$OUT/adalora_7b.err"
python3 - "$OUT/adalora_7b.jsonl" <<'PY'
import json, sys
from qtool.plan.planner import carried_allocated_bytes, plan_for_record
print(f"{'run':52s} {'graph':6s} {'plan GiB':>8s} {'meas GiB':>8s} {'error':>7s}  budget")
for line in open(sys.argv[1]):
    r = json.loads(line)
    m = r.get("measured") or {}
    if r.get("error") or "peak_allocated_bytes" not in m:
        print(f"{r['id']:52s} error: {r.get('error')}"); continue
    p = plan_for_record(r)
    meas = m["peak_allocated_bytes"] - carried_allocated_bytes(r, p)
    err = f"{(p.peak_allocated_bytes - meas) / meas:+7.1%}" if meas > 0 else "-".rjust(7)
    ada = m.get("adalora")
    budget = f"{ada['init_budget']} -> {ada['final_budget']} (steps {ada['mask_steps']})" if ada else "-"
    print(f"{r['id']:52s} {str(m.get('cuda_graph'))[:6]:6s} {p.peak_allocated_bytes / 2**30:8.3f} "
          f"{meas / 2**30:8.3f} {err}  {budget}")
PY
