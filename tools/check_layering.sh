#!/usr/bin/env bash
# Checks the include rules of docs/design.md ("Code layout and libraries"):
# each folder includes only from the folders below it. Prints every include
# that breaks a rule (file:line: include) and exits 1; exits 0 when none does.
#   bash tools/check_layering.sh [REPO_ROOT]
set -uo pipefail
cd "${1:-$(dirname "$0")/..}"

# folder | the project folders its code may include (besides itself and proto's generated dmoe/)
RULES=(
  "core|core"
  "text|core/status.h"
  "placement|core"
  "common|core"
  "expert_service|core text placement common"
  "router_service|core text placement common"
  "gateway|core/status.h text common"
)
PROJECT_DIRS="core text placement common gateway router_service expert_service tools tests testing bench fuzz"

bad=0
for rule in "${RULES[@]}"; do
  dir=${rule%%|*}
  allowed="$dir ${rule#*|}"
  # Tests may also use the test helpers, the CLI's model generator and other services.
  while IFS= read -r -d '' f; do
    extra=""
    [[ $f == *_test.cc || $f == */testing/* ]] && extra="testing tools tests expert_service router_service gateway"
    while IFS=: read -r line inc; do
      path=${inc#*\"}; path=${path%\"*}
      top=${path%%/*}
      [[ " $PROJECT_DIRS " == *" $top "* ]] || continue
      ok=0
      for a in $allowed $extra; do
        if [[ $path == "$a" || $path == "$a"/* ]]; then ok=1; break; fi
      done
      if ((ok == 0)); then
        echo "$f:$line: includes \"$path\" ($dir/ may include only: $allowed)"
        bad=1
      fi
    done < <(grep -n '^#include "' "$f")
  done < <(find "$dir" -type f \( -name '*.h' -o -name '*.cc' -o -name '*.cu' -o -name '*.cuh' \) -print0)
done
if ((bad)); then
  echo "layering: FAILED (rules in tools/check_layering.sh and docs/design.md)"
  exit 1
fi
echo "layering: OK"
