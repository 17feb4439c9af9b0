#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/, clang-14 with ASan + UBSan, in build-fuzz)
# and runs each for SECONDS_PER_TARGET seconds (default 60), FUZZ_JOBS (default 2)
# at a time, from a scratch copy of its seed corpus (fuzz/corpus/<name>; the repo's
# corpus never grows) with its dictionary (fuzz/dict/<name>.dict). Prints per
# target the executions and the coverage (libFuzzer's cov: edges and ft: features)
# and exits non-zero when any target found a crash, leak, timeout or OOM, naming
# the reproducer. Usage: tools/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-60}
shift || true
JOBS=${FUZZ_JOBS:-2}

CC=clang-14 CXX=clang++-14 cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DDMOE_FUZZ=ON -DDMOE_CUDA=OFF -DDMOE_BUILD_SERVICES=OFF -DDMOE_BUILD_BENCH=OFF \
  -DDMOE_BUILD_TESTS=OFF >/dev/null
cmake --build build-fuzz -j"$(nproc)" --target dmoe_fuzz

if (($#)); then
  TARGETS=("$@")
else
  TARGETS=()
  for src in fuzz/*_fuzz.cc; do
    n=$(basename "$src" .cc)
    TARGETS+=("${n%_fuzz}")
  done
fi

for name in "${TARGETS[@]}"; do
  if [[ ! -x build-fuzz/fuzz/${name}_fuzz ]]; then
    echo "fuzz: no target ${name}_fuzz in build-fuzz (fuzz/CMakeLists.txt must declare every fuzz/*_fuzz.cc)" >&2
    exit 1
  fi
done

RUN_DIR=build-fuzz/runs/$(date +%Y%m%d-%H%M%S)
mkdir -p "$RUN_DIR"
# Keep the last 3 runs (their corpora and reproducers), not every CI run's.
ls -dt build-fuzz/runs/*/ | tail -n +4 | xargs -r rm -rf
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
if [[ -z ${ASAN_SYMBOLIZER_PATH:-} ]] && command -v llvm-symbolizer-14 >/dev/null; then
  export ASAN_SYMBOLIZER_PATH=$(command -v llvm-symbolizer-14)
fi

run_target() {
  local name=$1 dir=$RUN_DIR/$1
  mkdir -p "$dir/corpus" "$dir/artifacts"
  if [[ -d fuzz/corpus/$name ]]; then cp -r "fuzz/corpus/$name/." "$dir/corpus/"; fi
  local args=(-max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
              -artifact_prefix="$dir/artifacts/")
  if [[ -f fuzz/dict/$name.dict ]]; then args+=(-dict="fuzz/dict/$name.dict"); fi
  local rc=0
  "build-fuzz/fuzz/${name}_fuzz" "${args[@]}" "$dir/corpus" >"$dir/log" 2>&1 || rc=$?
  echo "$rc" >"$dir/rc"
}

echo "== fuzzing ${#TARGETS[@]} targets, ${SECS}s each, $JOBS at a time (logs: $RUN_DIR)"
for name in "${TARGETS[@]}"; do
  while (($(jobs -rp | wc -l) >= JOBS)); do wait -n || true; done
  run_target "$name" &
done
wait

failed=0
printf '%-20s %12s %8s %8s %8s  %s\n' target executions cov ft corpus result
for name in "${TARGETS[@]}"; do
  dir=$RUN_DIR/$name log=$RUN_DIR/$name/log
  rc=$(cat "$dir/rc" 2>/dev/null || echo 255)
  execs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | tail -1 | awk '{print $2}' || true)
  last=$(grep -E '^#[0-9]+.*cov: ' "$log" | tail -1 || true)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corp=$(sed -n 's/.* corp: \([0-9]*\/[0-9a-zA-Z]*\).*/\1/p' <<<"$last")
  result=ok
  if [[ $rc != 0 ]]; then
    failed=1
    result="FAILED (exit $rc)"
    repro=$(grep -o 'Test unit written to .*' "$log" | tail -1 | sed 's/Test unit written to //' || true)
    [[ -n $repro ]] && result+=" reproducer: $repro"
  fi
  printf '%-20s %12s %8s %8s %8s  %s\n' "$name" "${execs:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$result"
done
if ((failed)); then
  for name in "${TARGETS[@]}"; do
    if [[ $(cat "$RUN_DIR/$name/rc") != 0 ]]; then
      echo "== $name: $RUN_DIR/$name/log (tail)"
      grep -v '^#[0-9]' "$RUN_DIR/$name/log" | tail -40
    fi
  done
  echo "fuzz: a target failed; reproduce with build-fuzz/fuzz/<target>_fuzz <reproducer>"
  exit 1
fi
