#!/bin/sh
# dmoe-expert-entrypoint [dmoe-expert flags...]
#
# Starts dmoe-expert as one member of a deployment whose expert servers have
# stable names (a Kubernetes StatefulSet behind a headless Service, or
# docker-compose services), choosing how it gets its routed-expert slots:
#
#   DMOE_EXPERTS    the router's --experts list (the initial servers, in order)
#   DMOE_ADVERTISE  this server's address as routers reach it (HOST:PORT)
#   DMOE_ROUTER     the router running the placement controller (HOST:PORT)
#
#   1. The router answers and counts this address among its servers with slots
#      (a restart: crash, OOM, node failure shorter than the router's
#      --server-lost-after-s): resume its place in the router's current
#      placement (--placement FILE --server-index I).
#   2. The router does not answer and the address is initial server I of
#      DMOE_EXPERTS (the deployment is starting, or the router restarted):
#      the router's starting placement, --server-index I --num-servers N.
#   3. Otherwise (a scale-out server, or a server whose slots the controller
#      moved away): --join DMOE_ROUTER --advertise DMOE_ADVERTISE, i.e. start
#      without slots and ask the controller for some.
#
# The remaining flags (--model, --host, --port, --leave-timeout-s, ...) pass
# through; the script then execs dmoe-expert, which receives SIGTERM itself.
# Needs: dmoe (the CLI, for `dmoe ctl placement`), jq, sed.
set -eu

log() { echo "dmoe-expert-entrypoint: $*" >&2; }
: "${DMOE_ADVERTISE:?must be this server address, HOST:PORT}"
: "${DMOE_ROUTER:?must be the controller router address, HOST:PORT}"
experts="${DMOE_EXPERTS:-}"
expert_bin="${DMOE_EXPERT_BIN:-dmoe-expert}"
cli_bin="${DMOE_CLI_BIN:-dmoe}"
state_dir="${DMOE_STATE_DIR:-${TMPDIR:-/tmp}}"

# Position of this address in DMOE_EXPERTS (-1: not an initial server).
initial=-1
count=0
set -f
old_ifs=$IFS
IFS=','
for a in $experts; do
  [ "$a" = "$DMOE_ADVERTISE" ] && initial=$count
  count=$((count + 1))
done
IFS=$old_ifs
set +f

placement_json=$("$cli_bin" ctl placement --router "$DMOE_ROUTER" --json 2>/dev/null) || placement_json=""
if [ -n "$placement_json" ]; then
  version=$(printf '%s' "$placement_json" | jq -r '.version')
  index=$(printf '%s' "$placement_json" |
    jq -r --arg a "$DMOE_ADVERTISE" '.servers | index($a) // -1')
  slots=0
  if [ "$index" -ge 0 ]; then
    slots=$(printf '%s' "$placement_json" |
      jq -r --argjson s "$index" '[.placement.layers[].servers[$s] | length] | add // 0')
  fi
  if [ "$index" -ge 0 ] && [ "$slots" -gt 0 ]; then
    file="$state_dir/dmoe-placement-v$version.json"
    printf '%s' "$placement_json" | jq '.placement' >"$file"
    log "router $DMOE_ROUTER counts $DMOE_ADVERTISE as server $index with $slots slots:" \
      "resuming placement version $version"
    exec "$expert_bin" --placement "$file" --server-index "$index" "$@"
  fi
  log "router $DMOE_ROUTER (placement version $version) gives $DMOE_ADVERTISE no slots: joining"
elif [ "$initial" -ge 0 ]; then
  log "router $DMOE_ROUTER not answering: initial server $initial of $count"
  exec "$expert_bin" --server-index "$initial" --num-servers "$count" "$@"
else
  log "router $DMOE_ROUTER not answering: joining (retries until it answers)"
fi
exec "$expert_bin" --join "$DMOE_ROUTER" --advertise "$DMOE_ADVERTISE" "$@"
