#!/usr/bin/env bash
# Sets up, builds and runs every test: the unit and integration tests, the
# checkpoint/config parsers under AddressSanitizer + UBSan, and a smoke run of the
# MoE layer and wire benchmarks. The last lines are CTest's summary of the main suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh

echo "== format (clang-format-14, .clang-format)"
bash tools/format_check.sh

bash tools/build.sh

echo "== parsers (checkpoints, config, tokenizer, chat template) under ASan/UBSan"
ASAN_TESTS=(safetensors_test config_test bad_checkpoint_test tokenizer_test chat_template_test)
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DDMOE_SANITIZE=ON -DDMOE_CUDA=OFF \
  -DDMOE_BUILD_SERVICES=OFF -DDMOE_BUILD_BENCH=OFF >/dev/null
cmake --build build-asan -j"$(nproc)" --target dmoe "${ASAN_TESTS[@]}"
ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
  ctest --test-dir build-asan --output-on-failure -R "^($(IFS='|'; echo "${ASAN_TESTS[*]}"))\$"

echo "== MoE layer benchmark (smoke)"
build/bin/moe_layer_bench --quick

echo "== wire benchmark (smoke: 2 expert servers, 1 and 64 tokens, raw-TCP floor)"
build/bin/wire_bench --quick

echo "== balance benchmark (smoke: skewed routing, live re-placement)"
build/bin/balance_bench --quick

# Numerics at every instruction-set level this host has below its best (the
# main run below covers the best): DMOE_MAX_ISA caps every kernel, oneDNN and
# the wire codec, so an AVX-512 machine also proves the AVX2 and generic paths.
ISA_TESTS=(gemm_test linear_test mla_attend_test cpu_expert_backend_test compute_worker_test wire_test
           model_test remote_expert_backend_test cluster_test cluster_invariance_test)
read -r -a ISA_LEVELS <<<"$(build/bin/dmoe isa --levels)"
echo "== $(build/bin/dmoe isa); levels: ${ISA_LEVELS[*]}"
for level in "${ISA_LEVELS[@]:0:${#ISA_LEVELS[@]}-1}"; do
  echo "== numerics tests with DMOE_MAX_ISA=$level"
  DMOE_MAX_ISA=$level ctest --test-dir build --output-on-failure \
    -R "^($(IFS='|'; echo "${ISA_TESTS[*]}"))\$"
done

echo "== thread-safety analysis (clang-14 -Wthread-safety)"
bash tools/thread_safety_check.sh

echo "== fuzz targets (libFuzzer, ASan + UBSan), 60 s each"
bash tools/fuzz.sh 60

echo "== all tests"
ctest --test-dir build --output-on-failure
