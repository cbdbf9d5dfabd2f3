#!/usr/bin/env bash
# One device call (NVIDIA H200): issue 14 on the GPU — the GPU tests of the new architectures and of the embedding/head
# LoRA (graph trainer vs eager), then bench/long_seq_sweep.py (every architecture, seq 512..32k, batch 1..8,
# rank 8..64, graph vs eager, peak vs plan). Run with .whl carried.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 QTOOL_FIXTURES=/tmp/nofixtures
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__)"
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gemma_cuda.py tests/test_train_archs.py tests/test_fused_cuda.py tests/test_methods.py > $OUT/gpu_tests.txt 2>&1; echo "gpu tests rc=$?"
tail -4 $OUT/gpu_tests.txt
timeout 330 python3 bench/long_seq_sweep.py --out $OUT/sweep.jsonl > $OUT/sweep.txt 2> $OUT/sweep.err; echo "sweep rc=$?"
tail -3 $OUT/sweep.err
sed -n '/^model /,$p' $OUT/sweep.txt
