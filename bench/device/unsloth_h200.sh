#!/usr/bin/env bash
# Issue 11 in one device call (one NVIDIA H200, ~6-8 minutes): qtool, hf (transformers + PEFT as Trainer runs
# it), hf-prepare (the loop right after prepare_model_for_kbit_training) and Unsloth 2026.10.9 (FastLanguageModel,
# its "unsloth" checkpointing, bnb PagedAdamW32bit, plain loop) on Llama-2-7B at seq 512 and 2048 and Llama-3-8B at
# 2048: LoRA r16 on q,k,v,o, GC, batch 1, random NF4 weights, the same bytes for every profile (Unsloth loads them
# from a pre-quantised folder written to /tmp first, bench/random_folder.py). Each (profile, model) runs in its own
# process, Unsloth one process per configuration, each under a timeout. Per row: tokens/s, achieved TFLOP/s
# (bench/flops.py, the recompute counted) and its share of 790, peak allocated, reserved, NVML-used, and the pinned
# host memory Unsloth's checkpointing offloads to. Run from the repo root with .whl (the bitsandbytes 0.50.2 wheel)
# and .whl-u (Unsloth's six wheels: `bash ../shared/tools/unsloth_wheels.sh .whl-u`) carried. $OUT gets
# records.json and records.jsonl (the schema of data/memory/README.md), bench.txt (all tables), bench.err (the time
# of each process; a failed one's stderr tail) and versions.txt; the speed table is printed last.
set -o pipefail
OUT=${OUT:-$PWD/out-unsloth}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl .whl-u/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 QTOOL_FIXTURES=/tmp/nofixtures
# no statistics download and no hub look-ups from Unsloth or transformers (nothing outside the machine answers)
export UNSLOTH_DISABLE_STATISTICS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
# 10 steps: 2 warm-up, peaks over steps 2-9, times over steps 3-9 (the CUDA-graph capture or first timed step excluded)
export QTOOL_BENCH_STEPS=${QTOOL_BENCH_STEPS:-10} QTOOL_BENCH_FOLDERS=/tmp/qtool-bench-folders
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/versions.txt"
python3 -c "import sys, torch, triton, transformers, peft, bitsandbytes as b, importlib.metadata as md; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', b.__version__, 'unsloth', md.version('unsloth'), 'unsloth_zoo', md.version('unsloth_zoo'), 'trl', md.version('trl'))" | tee -a "$OUT/versions.txt"
df -h /tmp | tail -1 | tee -a "$OUT/versions.txt"
t0=$SECONDS
timeout 480 python3 bench/train_bench.py --suite unsloth --profiles qtool,hf,hf-prepare,unsloth --timeout 170 \
  --out "$OUT" > "$OUT/bench.txt" 2> "$OUT/bench.err"
rc=$?
echo "train_bench.py exited $rc after $((SECONDS - t0)) s; per process:"
grep -E "^\[ *[0-9.]+ s\]|^timeout" "$OUT/bench.err"
[ $rc -ne 0 ] && { echo "its stderr ends:"; tail -15 "$OUT/bench.err"; }
[ -s "$OUT/records.json" ] || exit 1
python3 -c "import json, sys; [print(json.dumps(r)) for r in json.load(open(sys.argv[1]))]" "$OUT/records.json" \
  > "$OUT/records.jsonl"
echo "what Unsloth set up (its checkpointing mode and offload buffers, attention back-ends, embeddings):"
python3 -c "import json, sys; [print(' ', r['id'], json.dumps(r['unsloth'])) for r in json.load(open(sys.argv[1])) if 'unsloth' in r]" \
  "$OUT/records.json"
# the table of what finished (also when the outer timeout cut the run short)
python3 bench/train_bench.py --report "$OUT/records.json" | sed -n '/^speed/,$p'
exit $rc
