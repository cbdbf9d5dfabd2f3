#!/usr/bin/env bash
# One device call (NVIDIA H200, < 9 min): issue 9's AdaLoRA checks (bench/device/adalora_h200.sh) and issue 10's
# method comparison with its GPU tests (bench/device/methods_h200.sh --with-tests); everything they write is packed
# into $OUT/session2.tgz (the device returns at most 8 files). Run from the repo root with .whl carried.
set -o pipefail
root=$OUT
mkdir -p "$root/adalora" "$root/methods"
echo "=== AdaLoRA"
OUT=$root/adalora bash bench/device/adalora_h200.sh
echo "=== methods"
OUT=$root/methods bash bench/device/methods_h200.sh --with-tests
rc=$?
tar -C "$root" -czf "$root/session2.tgz" adalora methods && rm -rf "$root/adalora" "$root/methods"
exit $rc
