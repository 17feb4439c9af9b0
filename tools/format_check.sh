#!/usr/bin/env bash
# Checks that every C++ / CUDA source git tracks is formatted as .clang-format
# says (clang-format-14: Google style, 100 columns). Prints each file that is
# not, with the first differences, and exits 1; exits 0 when all are.
#   bash tools/format_check.sh          # check
#   bash tools/format_check.sh --fix    # reformat in place
set -euo pipefail
cd "$(dirname "$0")/.."
FMT=${CLANG_FORMAT:-clang-format-14}
command -v "$FMT" >/dev/null || { echo "format: $FMT not found (bash tools/setup.sh installs it)"; exit 2; }
mapfile -t FILES < <(git ls-files '*.h' '*.cc' '*.cu' '*.cuh')
if [[ ${1:-} == --fix ]]; then
  "$FMT" -i "${FILES[@]}"
  echo "format: reformatted ${#FILES[@]} files"
  exit 0
fi
bad=()
for f in "${FILES[@]}"; do
  if ! "$FMT" --dry-run --Werror "$f" >/dev/null 2>&1; then bad+=("$f"); fi
done
if ((${#bad[@]})); then
  for f in "${bad[@]}"; do
    echo "format: $f is not formatted; first differences:"
    diff <("$FMT" "$f") "$f" | head -n 8 | sed 's/^/    /'
  done
  echo "format: FAILED: ${#bad[@]} of ${#FILES[@]} files (fix with: bash tools/format_check.sh --fix)"
  exit 1
fi
echo "format: OK (${#FILES[@]} files, $FMT)"
