#!/usr/bin/env bash
# bench/run.sh - `make bench`: thumbup-bench against the local stack.
#
# 1. starts the private stack (scripts/stack.sh up, idempotent),
# 2. builds the release binaries of thumbup-service, thumbup-job and
#    thumbup-bench,
# 3. writes bench-results/tenants.yaml (tenant "bench" with the local hot-key
#    cache on and "bench-cold" with it off, generous rate limits), empties
#    them (thumbup-bench --reset: schemas, Redis keys, AOF compacted), and
#    provisions and migrates them,
# 4. starts thumbup-service and thumbup-job (window 250 ms, the default)
#    on free ports, logs in bench-results/,
# 5. runs thumbup-bench --scenario all (a to h; extra arguments are passed on, e.g.
#    `bash bench/run.sh --duration-secs 5 --runs 3`), which writes
#    bench-results/report.md and bench-results/latency.svg,
# 6. stops service and job; the stack keeps running.
#
# Environment:
#   THUMBUP_BENCH_WINDOW_MS   job window in ms (default 250, the job's default)
#   THUMBUP_BENCH_HOT_TTL_MS  hot-key cache TTL in ms, 0 = off (default 1000)
#   THUMBUP_BENCH_REDIS       single (default: dc-a's Redis) or cluster (the
#                             stack's Redis Cluster, 3 masters with a replica
#                             each); the report then also gives the bench
#                             tenant's slot and key spread over the masters
#   THUMBUP_BENCH_REPLICA_ACKS replicas a like waits for (redis.replica_acks;
#                             default 1 on the cluster, 0 on a single Redis)
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
ROOT="$(dirname -- "$SCRIPT_DIR")"
cd "$ROOT"

OUT="$ROOT/bench-results"
WINDOW_MS="${THUMBUP_BENCH_WINDOW_MS:-250}"
REDIS_MODE="${THUMBUP_BENCH_REDIS:-single}"
HOT_TTL_MS="${THUMBUP_BENCH_HOT_TTL_MS:-1000}"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
case "$BIN" in /*) ;; *) BIN="$ROOT/$BIN" ;; esac

say() { printf 'bench/run.sh: %s\n' "$*" >&2; }
die() { printf 'bench/run.sh: error: %s\n' "$*" >&2; exit 1; }

port_open() {
  # shellcheck disable=SC2016 # $1 is expanded by the inner bash
  timeout 3 bash -c ': <>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
}

# Prints the first port from $1 upwards that nothing listens on.
free_port() {
  local p
  for ((p = $1; p < $1 + 200; p++)); do
    port_open "$p" || { echo "$p"; return 0; }
  done
  die "no free port from $1"
}

SERVICE_PID=""
JOB_PID=""
stop_proc() { # pid
  [[ -n "$1" ]] && kill -0 "$1" 2>/dev/null || return 0
  kill -TERM "$1" 2>/dev/null || true
  local i
  for ((i = 0; i < 150; i++)); do
    kill -0 "$1" 2>/dev/null || break
    sleep 0.1
  done
  kill -0 "$1" 2>/dev/null && kill -KILL "$1" 2>/dev/null
  wait "$1" 2>/dev/null || true
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if ((rc != 0)); then
    for log in "$OUT/service.log" "$OUT/job.log"; do
      [[ -s "$log" ]] && { say "---- last lines of $log ----"; tail -n 20 "$log" >&2; }
    done
  fi
  stop_proc "$SERVICE_PID"
  stop_proc "$JOB_PID"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

command -v cargo >/dev/null 2>&1 || die "cargo not found"
say "starting the MariaDB + Redis stack (scripts/stack.sh up)"
bash scripts/stack.sh up
eval "$(bash scripts/stack.sh env)"

say "building release binaries"
cargo build --release -p thumbup-service -p thumbup-job -p thumbup-bench

# The tenants' Redis (the YAML after `url: ...`) and the admin URL.
case "$REDIS_MODE" in
  single)
    ACKS="${THUMBUP_BENCH_REPLICA_ACKS:-0}"
    REDIS_NODE="redis://127.0.0.1:$THUMBUP_REDIS_PORT"
    REDIS_EXTRA="replica_acks: $ACKS"
    ADMIN_REDIS_URL="$THUMBUP_ADMIN_REDIS_URL"
    ;;
  cluster)
    ACKS="${THUMBUP_BENCH_REPLICA_ACKS:-1}"
    IFS=, read -r -a NODES <<<"$THUMBUP_REDIS_CLUSTER_NODES"
    REDIS_NODE="${NODES[0]}"
    SEEDS="$(printf '"%s", ' "${NODES[@]:1}")"
    REDIS_EXTRA="cluster: true, seeds: [${SEEDS%, }], replica_acks: $ACKS"
    ADMIN_REDIS_URL="$THUMBUP_ADMIN_REDIS_CLUSTER_URL"
    ;;
  *) die "THUMBUP_BENCH_REDIS must be single or cluster, not '$REDIS_MODE'" ;;
esac
say "Redis: $REDIS_MODE, a like waits for $ACKS replica(s)"

mkdir -p "$OUT"
TENANTS="$OUT/tenants.yaml"
cat >"$TENANTS" <<YAML
# Written by bench/run.sh: the tenants that thumbup-bench loads. They differ
# only in the local hot-key cache: on for bench (as a LikeTenant's default),
# off for bench-cold (the plain cache-aside read path).
tenants:
  - name: bench
    businesses: [{ name: video, id: 1 }]
    tokens: [bench-token-0001]
    redis: { url: "$REDIS_NODE", username: thumbup-bench, password: bench-redis-pw, $REDIS_EXTRA }
    db: { url: "mysql://127.0.0.1:$THUMBUP_DB_PORT", username: thumbup_bench, password: bench-db-pw, max_connections: 32 }
    limits: { per_mid_per_sec: 1000000, per_tenant_per_sec: 1000000, db_fallback_per_sec: 100000 }
    cache: { hot_ttl_ms: $HOT_TTL_MS }
    stream: { shards: 4 }
  - name: bench-cold
    businesses: [{ name: video, id: 1 }]
    tokens: [bench-cold-token-01]
    redis: { url: "$REDIS_NODE", username: thumbup-bench-cold, password: bench-cold-redis-pw, $REDIS_EXTRA }
    db: { url: "mysql://127.0.0.1:$THUMBUP_DB_PORT", username: thumbup_bench_cold, password: bench-cold-db-pw, max_connections: 32 }
    limits: { per_mid_per_sec: 1000000, per_tenant_per_sec: 1000000, db_fallback_per_sec: 100000 }
    cache: { hot_ttl_ms: 0 }
    stream: { shards: 4 }
YAML
say "emptying tenants bench and bench-cold, so the run starts from the same state"
"$BIN/thumbup-bench" --reset --tenant bench --cold-tenant bench-cold \
  --redis-url "$ADMIN_REDIS_URL" --db-url "$THUMBUP_ADMIN_DB_URL"
say "provisioning and migrating tenants bench and bench-cold"
"$BIN/thumbup-service" --config "$TENANTS" provision --admin-redis-url "$ADMIN_REDIS_URL"
"$BIN/thumbup-service" --config "$TENANTS" migrate

GRPC_PORT="$(free_port 50161)"
ADMIN_PORT="$(free_port 9290)"
JOB_ADMIN_PORT="$(free_port $((ADMIN_PORT + 1)))"
say "starting thumbup-service on 127.0.0.1:$GRPC_PORT and thumbup-job (window $WINDOW_MS ms)"
NO_COLOR=1 "$BIN/thumbup-service" --config "$TENANTS" --listen "127.0.0.1:$GRPC_PORT" \
  --admin-listen "127.0.0.1:$ADMIN_PORT" </dev/null >"$OUT/service.log" 2>&1 &
SERVICE_PID=$!
NO_COLOR=1 "$BIN/thumbup-job" --config "$TENANTS" --tenant bench --window-ms "$WINDOW_MS" \
  --admin-listen "127.0.0.1:$JOB_ADMIN_PORT" --consumer bench-job </dev/null >"$OUT/job.log" 2>&1 &
JOB_PID=$!

for ((i = 0; i < 120; i++)); do
  kill -0 "$SERVICE_PID" 2>/dev/null || die "thumbup-service exited during startup"
  kill -0 "$JOB_PID" 2>/dev/null || die "thumbup-job exited during startup"
  port_open "$GRPC_PORT" && break
  sleep 0.25
done
port_open "$GRPC_PORT" || die "thumbup-service not listening within 30 s"

"$BIN/thumbup-bench" --addr "http://127.0.0.1:$GRPC_PORT" --tenant bench --token bench-token-0001 \
  --cold-tenant bench-cold --cold-token bench-cold-token-01 --service-pid "$SERVICE_PID" --shards 4 \
  --redis-url "$ADMIN_REDIS_URL" --db-url "$THUMBUP_ADMIN_DB_URL" --job-window-ms "$WINDOW_MS" \
  --hot-ttl-ms "$HOT_TTL_MS" --out "$OUT" --scenario all "$@"
say "report: ${OUT#"$ROOT"/}/report.md, plot: ${OUT#"$ROOT"/}/latency.svg"
