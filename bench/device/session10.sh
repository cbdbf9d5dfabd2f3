#!/usr/bin/env bash
# One device call (NVIDIA H200), 2026-12-04: the flat parameter/gradient buffer (qtool/train/flat.py) and the 64 MiB
# loss chunk on the GPU — the trainer's graph-path GPU tests, then qtool's speed rows of issue 11 (7B 512/2048,
# 8B 2048; r16 qkvo, GC, batch 1) with their plan errors. Run with .whl carried.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 QTOOL_FIXTURES=/tmp/nofixtures
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_cuda.py tests/test_train_archs.py \
  tests/test_gemma_cuda.py tests/test_methods.py tests/test_adalora.py > $OUT/gpu_tests.txt 2>&1; tail -1 $OUT/gpu_tests.txt
grep -E "^(FAILED|ERROR)" $OUT/gpu_tests.txt | head
timeout 300 python3 bench/train_bench.py --suite smoke --profiles qtool --models llama-2-7b,llama-3-8b \
  --out $OUT/smoke > $OUT/bench.txt 2>&1; echo "bench rc=$?"
python3 bench/train_bench.py --report $OUT/smoke/records.json
