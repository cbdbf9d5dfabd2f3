#!/usr/bin/env bash
# One device call (NVIDIA H200), 2026-12-04: issue 14's NaN. The warm-up before the CUDA-graph capture ran the
# optimizer on a side stream, but bitsandbytes launches its update on the legacy default stream, which PyTorch's side
# streams do not wait for. Before the fix (old_recipe.py, shipped for this call only): the new test and sweep row 8
# (qwen2.5-0.5b at 32k, the deterministic failure); after it: the GPU tests of the trainer and the whole sweep.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 QTOOL_FIXTURES=/tmp/nofixtures
NEW="tests/test_kernels_cuda.py::test_warm_up_update_waits_for_the_side_stream_backward"
if [ -f old_recipe.py ]; then
  cp qtool/train/recipe.py /tmp/fixed.py; cp old_recipe.py qtool/train/recipe.py
  echo "== before the fix: the new test"; timeout 100 python3 -m pytest -q -p no:cacheprovider $NEW 2>&1 | grep -E "assert|passed|failed" | tail -3
  echo "== before the fix: sweep row 8"; timeout 100 python3 bench/long_seq_sweep.py --rows 8 2>/dev/null | tail -3
  cp /tmp/fixed.py qtool/train/recipe.py
fi
echo "== after the fix: GPU tests"
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_cuda.py tests/test_train_archs.py \
  tests/test_gemma_cuda.py > $OUT/gpu_tests.txt 2>&1; tail -2 $OUT/gpu_tests.txt
timeout 240 python3 bench/long_seq_sweep.py --out $OUT/sweep.jsonl > $OUT/sweep.txt 2> $OUT/sweep.err; echo "sweep rc=$?"
sed -n '/^model /,$p' $OUT/sweep.txt
