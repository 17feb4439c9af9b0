#!/usr/bin/env bash
# Sets up, builds, writes a tiny DeepSeek-V2-Lite-shaped checkpoint and generates
# from it with the KV cache, printing the tokens and the per-expert load.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
bash tools/build.sh
MODEL=${MODEL:-/tmp/dmoe-demo/tiny-v2lite}
build/bin/dmoe make-model --preset tiny-v2lite --out "$MODEL" --seed 1
build/bin/dmoe generate --model "$MODEL" --tokens 1,2,3,4,5 --max-tokens 16 --ignore-eos --stats
