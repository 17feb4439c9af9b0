#!/usr/bin/env bash
# CTest gpu_check_without_gpu: tools/gpu_check.sh on a machine without a GPU
# says so (exit 2, status no_gpu, nothing run); its argument errors are clear;
# and, with a stand-in nvidia-smi and a bundle of stand-in binaries, it runs
# every step, records each exit code and log, reads the gtest and benchmark
# JSON, and reports a failed step (exit 1, status failed).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
check=$root/tools/gpu_check.sh
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() {
  echo "FAIL: $*" >&2
  exit 1
}

if nvidia-smi -L >/dev/null 2>&1; then
  echo "this machine has an NVIDIA GPU: the no-GPU case cannot be checked here"
  exit 77
fi

# 1. No GPU.
"$check" run --out "$tmp/none.json" >"$tmp/none.log" 2>&1
rc=$?
[[ $rc == 2 ]] || fail "without a GPU: exit $rc, expected 2: $(cat "$tmp/none.log")"
python3 - "$tmp/none.json" <<'PY' || fail "no-GPU JSON"
import json, sys
d = json.load(open(sys.argv[1]))
assert d["status"] == "no_gpu", d
assert d["gpu"] is None and d["steps"] == [] and "no NVIDIA GPU" in d["reason"], d
PY

# 2. Argument errors.
"$check" run --budget-s soon >"$tmp/arg.log" 2>&1 && fail "--budget-s soon accepted"
grep -q "whole seconds" "$tmp/arg.log" || fail "unclear --budget-s error: $(cat "$tmp/arg.log")"
"$check" frobnicate >"$tmp/arg.log" 2>&1 && fail "unknown command accepted"
grep -q "usage" "$tmp/arg.log" || fail "no usage for an unknown command"

# 3. A stand-in GPU: every step runs, the failing one is named.
mkdir -p "$tmp/fakebin" "$tmp/bundle/bin" "$tmp/bundle/lib"
cat >"$tmp/fakebin/nvidia-smi" <<'SH'
#!/bin/sh
echo "Stand-in GPU, 1024 MiB, 0.0"
SH
cat >"$tmp/bundle/bin/device_info_test" <<'SH'
#!/bin/sh
out=${1#--gtest_output=json:}
echo '{"tests": 2, "failures": 0, "disabled": 0, "errors": 0}' >"$out"
echo "device info ok"
SH
cat >"$tmp/bundle/bin/cuda_expert_backend_test" <<'SH'
#!/bin/sh
out=${1#--gtest_output=json:}
echo '{"tests": 5, "failures": 1, "disabled": 0, "errors": 0}' >"$out"
echo "one CUDA test failed"
exit 1
SH
cat >"$tmp/bundle/bin/moe_layer_bench" <<'SH'
#!/bin/sh
for a in "$@"; do case "$a" in --json=*) out=${a#--json=} ;; esac; done
echo '{"dtype": "bf16", "device": "stand-in", "rows": []}' >"$out"
SH
chmod +x "$tmp"/fakebin/* "$tmp"/bundle/bin/*
PATH="$tmp/fakebin:$PATH" "$check" run --bundle "$tmp/bundle" --out "$tmp/fake.json" \
  --budget-s 120 >"$tmp/fake.log" 2>&1
rc=$?
[[ $rc == 1 ]] || fail "a failing step: exit $rc, expected 1: $(cat "$tmp/fake.log")"
python3 - "$tmp/fake.json" <<'PY' || fail "stand-in GPU JSON: $(cat "$tmp/fake.json")"
import json, sys
d = json.load(open(sys.argv[1]))
assert d["status"] == "failed", d["status"]
assert d["gpu"].startswith("Stand-in GPU"), d["gpu"]
rc = {s["name"]: s["rc"] for s in d["steps"]}
assert rc["device_info_test"] == 0 and rc["cuda_expert_backend_test"] == 1, rc
assert rc["moe_layer_bench"] == 0, rc
# torch_baseline runs (and fails or passes) wherever python3 is; it must be recorded.
assert "torch_baseline" in rc, rc
assert d["tests"]["cuda_expert_backend_test"]["failures"] == 1, d["tests"]
assert d["moe_layer_bench"]["device"] == "stand-in", d["moe_layer_bench"]
tail = {s["name"]: s["log_tail"] for s in d["steps"]}
assert "one CUDA test failed" in tail["cuda_expert_backend_test"], tail
PY
echo "gpu_check_test: PASS"
