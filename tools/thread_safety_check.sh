#!/usr/bin/env bash
# Clang's thread-safety analysis (-Wthread-safety) over every project translation
# unit: checks the ABSL_GUARDED_BY / ABSL_EXCLUSIVE_LOCKS_REQUIRED / ... annotations
# that gcc ignores. Configures build-tsa with clang-14 (CUDA off, services, tests and
# benchmarks on), generates only the protobuf/gRPC headers the sources include, then
# runs each project .cc from compile_commands.json with -fsyntax-only, nproc at a
# time (no code generation, no linking). Third-party and generated sources (anything
# under a build directory) and .cu files are skipped.
# Prints one "thread-safety: FILE:LINE:COL: MESSAGE" line per violation (and
# "compile error: ..." for a unit clang could not analyse) and exits non-zero when
# there is any. Usage: tools/thread_safety_check.sh [PATH_REGEX]  (only the units whose
# path, relative to the repository, matches; TSA_JOBS overrides nproc)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=build-tsa
JOBS=${TSA_JOBS:-$(nproc)}
FILTER=${1:-}

# CCACHE_PROGRAM=NOTFOUND: no compiler launcher in compile_commands.json (nothing is
# compiled to an object here, so ccache would not help).
CC=clang-14 CXX=clang++-14 cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Debug \
  -DDMOE_CUDA=OFF -DDMOE_BUILD_SERVICES=ON -DDMOE_BUILD_TESTS=ON -DDMOE_BUILD_BENCH=ON \
  -DDMOE_SANITIZE=OFF -DDMOE_FUZZ=OFF -DCCACHE_PROGRAM=CCACHE_PROGRAM-NOTFOUND \
  -DCMAKE_EXPORT_COMPILE_COMMANDS=ON \
  "-DCMAKE_CXX_FLAGS=-Wthread-safety -Werror=thread-safety" >/dev/null

# Only the generated headers (protoc / grpc_cpp_plugin outputs), not their objects.
mapfile -t GENERATED < <(ninja -C "$BUILD" -t targets all | sed -n 's/^\(.*\.pb\.h\): .*/\1/p')
if ((${#GENERATED[@]})); then
  ninja -C "$BUILD" "${GENERATED[@]}" >/dev/null
fi

LOGS=$BUILD/tsa-logs
rm -rf "$LOGS"
mkdir -p "$LOGS"

# One line per unit: the compile command, rewritten to -fsyntax-only.
python3 - "$ROOT" "$BUILD" "$LOGS" "$FILTER" >"$LOGS/commands" <<'EOF'
import json, os, re, shlex, sys
root, build, logs, pattern = sys.argv[1], os.path.abspath(sys.argv[2]), sys.argv[3], sys.argv[4]
seen = set()
for e in json.load(open(os.path.join(build, "compile_commands.json"))):
    src = os.path.normpath(os.path.join(e["directory"], e["file"]))
    rel = os.path.relpath(src, root)
    top = rel.split(os.sep)[0]
    if (rel.startswith("..") or top.startswith("build") or top in ("third_party", "external", "vendor")
            or not rel.endswith((".cc", ".cpp", ".cxx")) or src in seen
            or (pattern and not re.search(pattern, rel))):
        continue
    seen.add(src)
    args = e["arguments"] if "arguments" in e else shlex.split(e["command"])
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a in ("-o", "-MF", "-MT", "-MQ"):
            skip = True
            continue
        if a in ("-c", "-MD", "-MMD") or os.path.basename(a) == "ccache":
            continue
        out.append(a)
    out[1:1] = ["-fsyntax-only", "-ferror-limit=0"]
    log = os.path.join(logs, rel.replace(os.sep, "__") + ".log")
    # directory, log, source, command
    print("\t".join([e["directory"], log, rel, shlex.join(out)]))
EOF

N=$(wc -l <"$LOGS/commands")
if ((N == 0)); then
  echo "thread-safety: no project translation units in $BUILD/compile_commands.json" >&2
  exit 1
fi
echo "thread-safety: analysing $N translation units with clang-14, $JOBS at a time"

# Each job: run the unit, keep its diagnostics in its log, and mark a failure.
tr '\n' '\0' <"$LOGS/commands" | xargs -0 -P"$JOBS" -I{} bash -c '
  IFS=$'"'"'\t'"'"' read -r dir log rel cmd <<<"$1"
  if ! (cd "$dir" && eval "$cmd") >"$log" 2>&1; then
    echo "$rel" >"$log.failed"
  fi' _ {}

status=0
fails=0
for failed in "$LOGS"/*.failed; do
  [[ -e $failed ]] || continue
  status=1
  fails=$((fails + 1))
  rel=$(cat "$failed")
  log=${failed%.failed}
  if grep -q 'Wthread-safety' "$log"; then
    # "FILE:LINE:COL: error: MESSAGE [-Werror,-Wthread-safety-...]"; headers show
    # up once per unit that includes them (deduplicated below).
    grep -E '^[^ ]+:[0-9]+:[0-9]+: error: .*-Wthread-safety' "$log" |
      sed -E "s|^$ROOT/||; s/^/thread-safety: /" >>"$LOGS/violations"
  else
    echo "compile error: $rel (clang-14 could not analyse it; see $log):"
    grep -E ': (fatal )?error:' "$log" | head -5 | sed 's/^/  /'
  fi
done
if [[ -e $LOGS/violations ]]; then
  sort -u "$LOGS/violations"
  echo "thread-safety: FAILED: $(sort -u "$LOGS/violations" | wc -l) violation(s) of the thread-safety annotations in $fails unit(s) (clang-14 -Wthread-safety; logs in $LOGS)"
elif ((status)); then
  echo "thread-safety: FAILED: $fails unit(s) did not compile under clang-14 (logs in $LOGS)"
else
  echo "thread-safety: OK ($N translation units, no violations)"
fi
exit $status
