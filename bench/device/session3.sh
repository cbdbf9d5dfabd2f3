#!/usr/bin/env bash
# One device call (NVIDIA H200, < 8 min): tests/test_methods.py's GPU tests again (the graph-vs-eager test now checks
# that every trainable tensor moved rather than a held-out loss on random tokens), and the SmolLM2-shaped method
# comparison that session2's 210 s limit cut off, AdaLoRA with its matched ranks. Run with .whl carried.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
timeout 90 python3 -m pytest -q -rA -m gpu tests/test_methods.py -p no:cacheprovider 2>&1 | tee $OUT/methods-gpu-tests.txt | grep -E "passed|failed|FAILED|Error" | tail -12
timeout 330 python3 bench/methods_compare.py gpu --models smollm2-135m,llama-2-7b --out-dir $OUT > $OUT/methods_h200.txt 2> $OUT/methods_h200.err
rc=$?
[ $rc -ne 0 ] && { echo "methods_compare.py exited $rc; its stderr ends:"; tail -5 $OUT/methods_h200.err; }
grep -v "^round " $OUT/methods_h200.txt | tail -45
exit $rc
