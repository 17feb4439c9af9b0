#!/bin/sh
# Container health check of the dmoe images (Docker HEALTHCHECK, docker-compose):
#   DMOE_HEALTH_CHECK=grpc:PORT       grpc.health.v1 Check of 127.0.0.1:PORT is SERVING
#                                     (dmoe-router 50051, dmoe-expert 50061)
#   DMOE_HEALTH_CHECK=http:PORT/PATH  GET answers 2xx (dmoe-gateway: http:8000/health)
#   DMOE_HEALTH_CHECK=none            always healthy (one-shot commands)
set -eu
check="${DMOE_HEALTH_CHECK:-grpc:50061}"
case "$check" in
  grpc:*) exec dmoe-grpc-health-probe "127.0.0.1:${check#grpc:}" --timeout-s 4 ;;
  http:*) exec curl -fsS -o /dev/null --max-time 4 "http://127.0.0.1:${check#http:}" ;;
  none) exit 0 ;;
  *) echo "DMOE_HEALTH_CHECK must be grpc:PORT, http:PORT/PATH or none, got '$check'" >&2
     exit 2 ;;
esac
