#!/usr/bin/env bash
# One device call (NVIDIA H200): issue 14's NaN at seq 8192. bench/long_seq_debug.py probes one forward+backward
# (fused vs torch kernels, each SDPA backend, GC on/off) at 2048 and 8192, then the failing bench row is replayed.
# Run with .whl carried.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
timeout 240 python3 bench/long_seq_debug.py --model llama-2-7b --seqs 2048,8192 > $OUT/debug.txt 2>&1; echo "debug rc=$?"
QTOOL_BENCH_STEPS=4 timeout 150 python3 bench/gpu_worker.py qtool llama-2-7b '[{"seq_len": 8192, "rank": 16, "targets": "qkvo", "gc": true, "batch_size": 1}]' > $OUT/worker.txt 2>&1; echo "worker rc=$?"
tail -c 1500 $OUT/worker.txt
tail -20 $OUT/debug.txt
