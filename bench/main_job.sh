#!/usr/bin/env bash
# Times each step of README's main job after `pip install` (run from the repo root inside the venv); a first run
# also builds the fixtures. Prints one line per step: seconds, exit code, command.
set -u
steps=(
  "python tools/fixtures.py"
  "qtool convert .fixtures/smollm2-135m out/smollm2-nf4 --overwrite"
  "qtool verify out/smollm2-nf4 --source .fixtures/smollm2-135m"
  "qtool plan --params 65e9 --rank 16"
  "qtool train out/smollm2-nf4 --data .fixtures/shakespeare.txt --steps 12 --seq-len 128 --batch-size 2 --lr 2e-3 --targets all-linear --eval-blocks 8 --no-grad-checkpointing --out out/adapter --overwrite"
  "qtool merge out/smollm2-nf4 out/adapter out/smollm2-merged --overwrite"
)
total=0
for step in "${steps[@]}"; do
  s=$(date +%s.%N); bash -c "$step" > /tmp/qtool-main-job-step.log 2>&1; rc=$?; e=$(date +%s.%N)
  t=$(python3 -c "print(f'{$e - $s:.1f}')"); total=$(python3 -c "print(f'{$total + $t:.1f}')")
  printf "%6s s  rc=%s  %s\n" "$t" "$rc" "${step:0:70}"
  [ "$step" != "${steps[4]}" ] || grep -a "held-out loss" /tmp/qtool-main-job-step.log | tail -1
done
echo "total ${total} s"
