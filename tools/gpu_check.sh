#!/usr/bin/env bash
# The GPU check of the CUDA expert backend: its tests, moe_layer_bench
# --backend=cuda and the PyTorch baseline, one JSON out, inside 10 minutes.
#
#   tools/gpu_check.sh bundle [DIR]
#       On a build machine with nvcc (no GPU needed): builds the CUDA targets in
#       build/ and copies them, with the libraries they need that a GPU machine
#       with PyTorch may lack (Abseil, oneDNN, OpenMP, the CUDA runtime; not
#       cuBLAS, which such a machine has), into DIR (default gpu_bundle/,
#       git-ignored; about 45 MB).
#
#   tools/gpu_check.sh run [--bundle DIR] [--out FILE] [--budget-s S]
#       On the GPU machine: runs the CUDA tests, the benchmark and the baseline
#       from DIR (or, without --bundle, builds them in build-gpu/ first, which
#       needs the packages of tools/setup.sh) and writes FILE (default
#       $OUT/gpu_check.json where $OUT is set, else gpu_check.json). Each step
#       has a timeout; the whole run stays inside S seconds (default 540).
#       Exit 0: every step passed; 1: a step failed (the JSON says which);
#       2: no NVIDIA GPU here (the JSON says so; nothing else runs).
#
# With the workplace's device tool (docs/testing.md, "GPU check"): bundle here,
# then `tools/gpu_check.sh run --bundle gpu_bundle` there, carrying gpu_bundle.
set -uo pipefail
cd "$(dirname "$0")/.."

die() {
  echo "gpu_check: $*" >&2
  exit 1
}

TARGETS=(moe_layer_bench cuda_expert_backend_test device_info_test)

cmd_bundle() {
  local dir=${1:-gpu_bundle}
  command -v nvcc >/dev/null || [[ -x /usr/local/cuda/bin/nvcc ]] ||
    die "bundle needs nvcc (the CUDA toolkit) on this machine"
  cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DDMOE_CUDA=ON >/dev/null ||
    die "cmake configure with -DDMOE_CUDA=ON failed"
  cmake --build build -j"$(nproc)" --target "${TARGETS[@]}" || die "build failed"
  rm -rf "$dir"
  mkdir -p "$dir/bin" "$dir/lib"
  local t path
  for t in "${TARGETS[@]}"; do
    path=$(find build -type f -name "$t" -perm -u+x | head -1)
    [[ -n "$path" ]] || die "built target $t not found under build/"
    cp "$path" "$dir/bin/" && strip --strip-unneeded "$dir/bin/$t"
  done
  # Libraries outside the C/C++ runtime, except cuBLAS (too large to carry;
  # PyTorch's GPU machines have it) and the driver.
  ldd "$dir"/bin/* | awk '$3 ~ /^\// {print $3}' | sort -u | while read -r lib; do
    case "$(basename "$lib")" in
      libc.so* | libm.so* | libdl.so* | librt.so* | libpthread.so* | ld-linux* | libstdc++.so* | \
        libgcc_s.so* | libcuda.so* | libcublas.so* | libcublasLt.so*) ;;
      *) cp -L "$lib" "$dir/lib/" ;;
    esac
  done
  echo "gpu_check: bundle in $dir ($(du -sh "$dir" | cut -f1)): $(ls "$dir/bin" | tr '\n' ' ')"
}

cmd_run() {
  local bundle="" out="${OUT:+$OUT/gpu_check.json}" budget=540
  out=${out:-gpu_check.json}
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --bundle) bundle=${2:-}; shift 2 || die "--bundle takes a directory" ;;
      --out) out=${2:-}; shift 2 || die "--out takes a file" ;;
      --budget-s) budget=${2:-}; shift 2 || die "--budget-s takes seconds" ;;
      *) die "unknown argument '$1' (run [--bundle DIR] [--out FILE] [--budget-s S])" ;;
    esac
  done
  [[ "$budget" =~ ^[0-9]+$ ]] || die "--budget-s takes whole seconds, not '$budget'"
  local work
  work=$(mktemp -d)
  local start=$SECONDS
  : >"$work/steps.tsv"

  # step NAME TIMEOUT CMD...: runs CMD with a timeout capped by what is left of
  # the budget; records rc, seconds and the log's tail.
  step() {
    local name=$1 limit=$2
    shift 2
    local left=$((budget - (SECONDS - start)))
    ((limit > left)) && limit=$left
    if ((limit <= 5)); then
      printf '%s\t%s\t%s\n' "$name" 124 0 >>"$work/steps.tsv"
      echo "budget spent before this step" >"$work/$name.log"
      return 124
    fi
    local t0=$SECONDS rc
    echo "== $name (timeout ${limit}s)"
    timeout "$limit" "$@" >"$work/$name.log" 2>&1
    rc=$?
    tail -n 40 "$work/$name.log"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$work/steps.tsv"
    return $rc
  }

  local gpu=""
  gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null |
    head -1)
  local status=ok
  if [[ -z "$gpu" ]]; then
    status=no_gpu
  else
    local bin tests
    if [[ -n "$bundle" ]]; then
      [[ -d "$bundle/bin" ]] || die "no bundle at $bundle (make one with: tools/gpu_check.sh bundle)"
      bin=$(cd "$bundle/bin" && pwd)
      tests=$bin
      # cuBLAS from the CUDA toolkit or from PyTorch's nvidia wheels.
      local libs d
      libs="$(cd "$bundle/lib" && pwd)"
      for d in /usr/local/cuda/lib64 /usr/local/cuda/lib \
        $(python3 -c 'import glob, os, nvidia; print(" ".join(sorted({os.path.dirname(p) for q in nvidia.__path__ for p in glob.glob(q + "/*/lib/libcu*.so*")})))' 2>/dev/null); do
        [[ -d "$d" ]] && libs="$libs:$d"
      done
      export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    else
      step build 400 bash -c "cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DDMOE_CUDA=ON && cmake --build build-gpu -j$(nproc) --target ${TARGETS[*]}" ||
        status=failed
      bin=$(pwd)/build-gpu/bin
      tests=$(pwd)/build-gpu/tests
    fi
    if [[ "$status" == ok ]]; then
      local t
      for t in device_info_test cuda_expert_backend_test; do
        step "$t" 120 "$tests/$t" --gtest_output="json:$work/$t.json" || status=failed
      done
      step moe_layer_bench 240 "$bin/moe_layer_bench" --backend=cuda --min_time=0.2 \
        --json="$work/moe_cuda.json" || status=failed
      if [[ -f "$work/moe_cuda.json" ]]; then
        step torch_baseline 120 python3 bench/torch_moe_baseline.py --min-time 0.2 \
          --ours "$work/moe_cuda.json" --json "$work/torch.json" || status=failed
      fi
    fi
  fi

  python3 - "$work" "$out" "$status" "$gpu" "$((SECONDS - start))" <<'EOF'
import json, os, sys, time
work, out, status, gpu, secs = sys.argv[1:6]
def load(name):
    try:
        with open(os.path.join(work, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
steps = []
with open(os.path.join(work, "steps.tsv")) as f:
    for line in f:
        name, rc, s = line.rstrip("\n").split("\t")
        try:
            with open(os.path.join(work, name + ".log"), errors="replace") as g:
                tail = g.read()[-4000:]
        except OSError:
            tail = ""
        steps.append({"name": name, "rc": int(rc), "seconds": int(s), "log_tail": tail})
tests = {}
for t in ("device_info_test", "cuda_expert_backend_test"):
    j = load(t + ".json")
    if j:
        tests[t] = {k: j.get(k) for k in ("tests", "failures", "disabled", "errors")}
if status == "ok" and any(s["rc"] != 0 for s in steps):
    status = "failed"
doc = {
    "check": "tools/gpu_check.sh",
    "status": status,
    "gpu": gpu or None,
    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "seconds": int(secs),
    "steps": steps,
    "tests": tests,
    "moe_layer_bench": load("moe_cuda.json"),
    "torch_baseline": load("torch.json"),
}
if status == "no_gpu":
    doc["reason"] = "nvidia-smi found no NVIDIA GPU on this machine; nothing ran"
with open(out, "w") as f:
    json.dump(doc, f, indent=1)
print(f"gpu_check: {status}, written to {out}")
EOF
  rm -rf "$work"
  case "$status" in
    ok) return 0 ;;
    no_gpu) return 2 ;;
    *) return 1 ;;
  esac
}

case "${1:-}" in
  bundle) shift; cmd_bundle "$@" ;;
  run) shift; cmd_run "$@" ;;
  *) die "usage: tools/gpu_check.sh bundle [DIR] | run [--bundle DIR] [--out FILE] [--budget-s S]" ;;
esac
