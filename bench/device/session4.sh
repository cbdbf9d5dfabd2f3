#!/usr/bin/env bash
# One device call (NVIDIA H200, < 6 min): bench/methods_compare.py gpu again, now that it subtracts what earlier
# runs in the process keep allocated, for the plan-vs-measured column of every method. Run with .whl carried.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
timeout 330 python3 bench/methods_compare.py gpu --models smollm2-135m,llama-2-7b --out-dir $OUT > $OUT/methods_h200.txt 2> $OUT/methods_h200.err
rc=$?
[ $rc -ne 0 ] && { echo "methods_compare.py exited $rc; its stderr ends:"; tail -5 $OUT/methods_h200.err; }
grep -v "^round " $OUT/methods_h200.txt | tail -45
exit $rc
