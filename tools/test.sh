#!/usr/bin/env bash
# Sets up, builds and runs every test: the unit and integration tests, the
# checkpoint/config parsers under AddressSanitizer + UBSan, and a smoke run of the
# MoE layer and wire benchmarks. The last lines are CTest's summary of the main suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
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

echo "== all tests"
ctest --test-dir build --output-on-failure
