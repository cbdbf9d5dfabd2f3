#!/usr/bin/env bash
# One device call (NVIDIA H200): issue 14's fix (the warm-up loss read on the default stream before the side stream
# wrote it). The new GPU test fails on the code before the fix (old_recipe.py, shipped for this call only) and passes
# after it; then the whole sweep again. Run with .whl carried.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 QTOOL_FIXTURES=/tmp/nofixtures
T="tests/test_train_archs.py -m gpu"
if [ -f old_recipe.py ]; then
  cp qtool/train/recipe.py /tmp/fixed.py; cp old_recipe.py qtool/train/recipe.py
  echo "before the fix:"; timeout 100 python3 -m pytest -q -p no:cacheprovider $T -k side_stream 2>&1 | tail -2
  cp /tmp/fixed.py qtool/train/recipe.py
fi
echo "after the fix:"; timeout 150 python3 -m pytest -q -p no:cacheprovider $T > $OUT/gpu_tests.txt 2>&1; tail -2 $OUT/gpu_tests.txt
timeout 330 python3 bench/long_seq_sweep.py --out $OUT/sweep.jsonl > $OUT/sweep.txt 2> $OUT/sweep.err; echo "sweep rc=$?"
sed -n '/^model /,$p' $OUT/sweep.txt
