#!/usr/bin/env bash
# One device call (one NVIDIA H200, < 4 min): LoRA vs Houlsby adapters vs prefix tuning at equal trainable parameters
# (bench/methods_compare.py gpu) on a Llama-2-7B shape and on SmolLM2-135M's, random weights: qtool train's tokens/s
# and peak allocated vs qtool plan per method; batch-1 decode ms/token after a 512-token prompt and prefill tokens/s
# at 2048 for base, merged LoRA, unmerged LoRA, adapter and prefix. Run from the repo root with .whl (the
# bitsandbytes 0.50.2 wheel) carried. $OUT gets llama-2-7b.json and smollm2-135m.json (copy them to data/methods/:
# qtool plan shows their decode latency), the log and the versions; the summary table is printed last.
# With --with-tests it first runs tests/test_methods.py's GPU tests (prefix attention on SDPA/flash against the
# explicit mask; the three methods training under the CUDA graph), about a minute more.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/versions.txt
python3 -c "import torch, triton, transformers, peft, bitsandbytes as b; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', b.__version__)" | tee -a $OUT/versions.txt
if [ "$1" = "--with-tests" ]; then
  timeout 90 python3 -m pytest -q -rA -m gpu tests/test_methods.py -p no:cacheprovider 2>&1 | tee $OUT/methods-gpu-tests.txt | grep -E "passed|failed|FAILED|Error" | tail -12
fi
timeout 210 python3 bench/methods_compare.py gpu --out-dir $OUT > $OUT/methods_h200.txt 2> $OUT/methods_h200.err
rc=$?
[ $rc -ne 0 ] && { echo "methods_compare.py exited $rc; its stderr ends:"; tail -5 $OUT/methods_h200.err; }
grep -v "^round " $OUT/methods_h200.txt | tail -40
exit $rc
