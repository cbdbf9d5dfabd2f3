#!/usr/bin/env bash
# Issue 11's comparison in one device call (one NVIDIA H200, ~6 minutes): qtool as `qtool train` runs it now
# (trainer revision 2026-12-04b, expandable segments, flat buffers, 64 MiB loss chunks), with and without
# --offload-activations, each row a fresh process with its last two steps profiled (QTOOL_PROFILE=replay), beside
# Unsloth 2026.10.9 (FastLanguageModel, its "unsloth" checkpointing, bnb PagedAdamW32bit, a plain loop; one process
# per row) on Llama-2-7B at 512 and 2048 and Llama-3-8B at 2048: LoRA r16 q,k,v,o, GC, batch 1, the same random NF4
# bytes. Carry .whl (bitsandbytes 0.50.2) and .whl-u (`bash ../shared/tools/unsloth_wheels.sh .whl-u`).
# $OUT: records.json / records.jsonl (both sides), qtool.err (the kernel profiles), unsloth.err, bench.txt (tables).
set -o pipefail
OUT=${OUT:-$PWD/out-issue11}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl .whl-u/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 QTOOL_FIXTURES=/tmp/nofixtures QTOOL_BENCH_STEPS=10
export UNSLOTH_DISABLE_STATISTICS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export QTOOL_BENCH_FOLDERS=/tmp/qtool-bench-folders
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/versions.txt"
python3 -c "import sys, torch, triton, transformers, peft, bitsandbytes as b, importlib.metadata as md; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', b.__version__, 'unsloth', md.version('unsloth'))" | tee -a "$OUT/versions.txt"
t0=$SECONDS
C='"rank": 16, "targets": "qkvo", "gc": true'
for row in "llama-2-7b 512" "llama-2-7b 2048" "llama-3-8b 2048"; do
  set -- $row
  for off in false true; do
    QTOOL_PROFILE=replay timeout 60 python3 bench/gpu_worker.py qtool $1 "[{\"seq_len\": $2, $C, \"offload\": $off}]" \
      >> "$OUT/qtool.jsonl" 2>> "$OUT/qtool.err"; echo "qtool $1 $2 offload=$off rc=$? at $((SECONDS - t0)) s"
  done
done
timeout 330 python3 bench/train_bench.py --suite unsloth --profiles unsloth --timeout 150 --out "$OUT/u" \
  > "$OUT/unsloth.txt" 2> "$OUT/unsloth.err"; echo "unsloth rc=$? at $((SECONDS - t0)) s"
grep -E "^\[ *[0-9.]+ s\]|^timeout" "$OUT/unsloth.err"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
recs = [json.loads(l) for l in open(f"{out}/qtool.jsonl") if l.startswith("{")]
try:
    recs += json.load(open(f"{out}/u/records.json"))
except OSError as exc:
    print("no Unsloth records:", exc)
json.dump(recs, open(f"{out}/records.json", "w"), indent=1)
open(f"{out}/records.jsonl", "w").write("".join(json.dumps(r) + "\n" for r in recs))
PY
grep -h "^###\|^  " "$OUT/qtool.err" | grep -v -i warn | head -100
python3 bench/train_bench.py --report "$OUT/records.json" > "$OUT/bench.txt" 2>&1
sed -n '/^speed/,$p' "$OUT/bench.txt"
