#!/usr/bin/env bash
# Sets up and builds dmoe, then runs the whole system locally on a generated tiny
# DeepSeek-V2-Lite-shaped model: 3 expert servers, a router and the gateway on
# loopback. Sends one completion through the gateway's OpenAI-style HTTP API and
# prints the answer and the tokens each expert server computed, then stops.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
bash tools/build.sh
build/bin/dmoe up --demo --servers 3 --work-dir "${DMOE_DEMO_DIR:-/tmp/dmoe-demo}"
