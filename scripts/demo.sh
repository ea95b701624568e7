#!/usr/bin/env bash
# scripts/demo.sh - thumbup end to end on one machine, in about a minute
# (plus the first build).
#
# Usage: bash scripts/demo.sh
#
# 1. starts the private two-datacenter stack (scripts/stack.sh up: MariaDB
#    and Redis for dc-a and dc-b, dc-b's MariaDB a replica of dc-a's; installs
#    the Debian packages on first use), builds the binaries,
# 2. provisions and migrates the tenants of config/local.yaml,
# 3. starts the failover controller (thumbup-operator failover, admin
#    127.0.0.1:9194) with a route file, a thumbup-db-proxy following it
#    (127.0.0.1:23336, admin 127.0.0.1:9193), and thumbup-service (gRPC
#    127.0.0.1:50151, admin 127.0.0.1:9190) and a thumbup-job per tenant
#    (demo: admin 127.0.0.1:9191, shop: 127.0.0.1:9195) reaching the DB
#    through the proxy; logs and the generated configs in .stack/demo/,
# 4. walks through the API with thumbupctl: likes, a double click, a switch to
#    dislike, an unlike, the job's window, the read calls, refused requests,
#    and the service's request metrics,
# 5. runs a planned switchover to dc-b while serving, rebuilds dc-a as a
#    replica of dc-b, and switches back: counts stay exact throughout.
#
# Everything it started is stopped when the script ends; the stack keeps
# running (stop it with `scripts/stack.sh down`), with dc-a the primary again.
# Every run uses fresh user and item ids derived from the clock, so runs do
# not see each other's data.
#
# Needs: Debian (or derivative) with sudo or root for the packages, and a Rust
# toolchain (https://rustup.rs) with a C linker (build-essential).
#
# Environment:
#   THUMBUP_DEMO_PROFILE   cargo profile to build and run: dev (default) or release
#   THUMBUP_DEMO_KEEP=1    keep service and job running after the demo, until Ctrl-C
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
ROOT="$(dirname -- "$SCRIPT_DIR")"
cd "$ROOT"

CONFIG="config/local.yaml"
GRPC_ADDR="127.0.0.1:50151"
SERVICE_ADMIN_PORT=9190
JOB_ADMIN_PORT=9191
SHOP_JOB_ADMIN_PORT=9195
PROXY_PORT=23336
PROXY_ADMIN_PORT=9193
FAILOVER_ADMIN_PORT=9194
WINDOW_MS=250
LOGS="$ROOT/.stack/demo"
PROFILE="${THUMBUP_DEMO_PROFILE:-dev}"
case "$PROFILE" in
  dev) BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug" ;;
  release) BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release" ;;
  *) echo "demo.sh: THUMBUP_DEMO_PROFILE must be dev or release, not '$PROFILE'" >&2; exit 2 ;;
esac
case "$BIN" in /*) ;; *) BIN="$ROOT/$BIN" ;; esac

say() { printf 'demo.sh: %s\n' "$*" >&2; }
die() { printf 'demo.sh: error: %s\n' "$*" >&2; exit 1; }
step() { printf '\n== %s ==\n' "$*"; }

# True if something accepts TCP connections on 127.0.0.1:port.
port_open() {
  # shellcheck disable=SC2016 # $1 is expanded by the inner bash
  timeout 3 bash -c ': <>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
}

# GET http://127.0.0.1:port/path with bash's /dev/tcp (curl may be missing on
# a fresh machine); prints the body, fails unless the status is 200. HTTP/1.0
# so the body is never chunked and the server closes the connection.
http_get() { # port path
  local resp
  # shellcheck disable=SC2016 # $1 and $2 are expanded by the inner bash
  resp="$(timeout 5 bash -c '
    exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf "GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n" "$2" >&3
    cat <&3' _ "$1" "$2" 2>/dev/null)" || return 1
  [[ "${resp%%$'\r'*}" == "HTTP/1."?" 200"* ]] || return 1
  printf '%s\n' "${resp#*$'\r\n\r\n'}"
}

# ------------------------------------------------------------------ cleanup

SERVICE_PID=""
JOB_PID=""
SHOP_JOB_PID=""
FAILOVER_PID=""
PROXY_PID=""

show_log() { # name file
  [[ -s "$2" ]] || return 0
  printf 'demo.sh: ---- last lines of %s ----\n' "$2" >&2
  tail -n 20 "$2" >&2
}

stop_proc() { # name pid
  [[ -n "$2" ]] && kill -0 "$2" 2>/dev/null || return 0
  kill -TERM "$2" 2>/dev/null || true
  # Both drain on SIGTERM (the job commits its open window); wait for that.
  local i
  for ((i = 0; i < 100; i++)); do
    kill -0 "$2" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$2" 2>/dev/null; then
    say "$1 (pid $2) did not stop within 10 s; sending SIGKILL"
    kill -KILL "$2" 2>/dev/null || true
  fi
  wait "$2" 2>/dev/null || true
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if ((rc != 0)); then
    [[ -z "$SERVICE_PID" ]] || show_log thumbup-service "$LOGS/service.log"
    [[ -z "$JOB_PID" ]] || show_log thumbup-job "$LOGS/job.log"
    [[ -z "$SHOP_JOB_PID" ]] || show_log "thumbup-job (shop)" "$LOGS/job-shop.log"
  fi
  if ((rc != 0)); then
    [[ -z "$FAILOVER_PID" ]] || show_log "thumbup-operator failover" "$LOGS/failover.log"
    [[ -z "$PROXY_PID" ]] || show_log thumbup-db-proxy "$LOGS/db-proxy.log"
  fi
  if [[ -n "$SERVICE_PID$JOB_PID$SHOP_JOB_PID$FAILOVER_PID$PROXY_PID" ]]; then
    echo
    say "stopping thumbup-service, the jobs, the db-proxy and the failover controller (logs in ${LOGS#"$ROOT"/})"
    stop_proc thumbup-service "$SERVICE_PID"
    stop_proc thumbup-job "$JOB_PID"
    stop_proc "thumbup-job (shop)" "$SHOP_JOB_PID"
    stop_proc thumbup-db-proxy "$PROXY_PID"
    stop_proc "thumbup-operator failover" "$FAILOVER_PID"
  fi
  say "the MariaDB + Redis stack keeps running; stop it with: scripts/stack.sh down"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------ setup

command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (https://rustup.rs) and build-essential"

say "starting the MariaDB + Redis stack (scripts/stack.sh up)"
scripts/stack.sh up
eval "$(scripts/stack.sh env)"

say "building thumbup-service, thumbup-job, thumbupctl, thumbup-db-proxy and thumbup-operator (cargo profile $PROFILE)"
cargo build --profile "$PROFILE" -p thumbup-service -p thumbup-job -p thumbup-db-proxy -p thumbup-operator

for port in "${GRPC_ADDR##*:}" "$SERVICE_ADMIN_PORT" "$JOB_ADMIN_PORT" "$SHOP_JOB_ADMIN_PORT" "$PROXY_PORT" \
  "$PROXY_ADMIN_PORT" "$FAILOVER_ADMIN_PORT"; do
  port_open "$port" && die "port $port is in use (an earlier demo still running?)"
done

say "provisioning and migrating the tenants of $CONFIG"
"$BIN/thumbup-service" --config "$CONFIG" provision
"$BIN/thumbup-service" --config "$CONFIG" migrate

mkdir -p "$LOGS"
# The failover controller's config: both datacenters of the stack. It writes
# the route file; the db-proxy follows it; service and job reach the DB
# through the proxy (their config is config/local.yaml with the proxy's
# address as the DB URL).
OPERATOR_CONFIG="$LOGS/operator.yaml"
ROUTE="$LOGS/route.yaml"
TENANTS="$LOGS/tenants.yaml"
write_operator_config() { # active datacenter
  local dbpw="${THUMBUP_DB_ADMIN_PASSWORD:-thumbup-admin}" rpw="${THUMBUP_REDIS_ADMIN_PASSWORD:-thumbup-admin}"
  cat >"$OPERATOR_CONFIG.tmp" <<YAML
active_datacenter: $1
datacenters:
  - name: dc-a
    db: { url: "mysql://127.0.0.1:$THUMBUP_DB_PORT", admin_username: thumbup_admin, admin_password: "$dbpw" }
    redis: { url: "redis://127.0.0.1:$THUMBUP_REDIS_PORT", admin_username: default, admin_password: "$rpw" }
  - name: dc-b
    db: { url: "mysql://127.0.0.1:$THUMBUP_DB_PORT_B", admin_username: thumbup_admin, admin_password: "$dbpw" }
    redis: { url: "redis://127.0.0.1:$THUMBUP_REDIS_PORT_B", admin_username: default, admin_password: "$rpw" }
failover: { probe_period_ms: 500 }
YAML
  mv "$OPERATOR_CONFIG.tmp" "$OPERATOR_CONFIG"
}
write_operator_config dc-a
rm -f "$ROUTE"
sed "s|mysql://127.0.0.1:$THUMBUP_DB_PORT|mysql://127.0.0.1:$PROXY_PORT|" "$CONFIG" >"$TENANTS"

say "starting the failover controller, the db-proxy, thumbup-service on $GRPC_ADDR and a thumbup-job for each tenant"
NO_COLOR=1 "$BIN/thumbup-operator" failover --config "$OPERATOR_CONFIG" --route-file "$ROUTE" --tenants "$TENANTS" \
  --admin-listen "127.0.0.1:$FAILOVER_ADMIN_PORT" </dev/null >"$LOGS/failover.log" 2>&1 &
FAILOVER_PID=$!
for ((i = 0; i < 40; i++)); do [[ -s "$ROUTE" ]] && break; sleep 0.25; done
[[ -s "$ROUTE" ]] || die "the failover controller wrote no route (see ${LOGS#"$ROOT"/}/failover.log)"
NO_COLOR=1 "$BIN/thumbup-db-proxy" --listen "127.0.0.1:$PROXY_PORT" --admin-listen "127.0.0.1:$PROXY_ADMIN_PORT" \
  --route-file "$ROUTE" </dev/null >"$LOGS/db-proxy.log" 2>&1 &
PROXY_PID=$!
NO_COLOR=1 "$BIN/thumbup-service" --config "$TENANTS" --listen "$GRPC_ADDR" --admin-listen "127.0.0.1:$SERVICE_ADMIN_PORT" \
  </dev/null >"$LOGS/service.log" 2>&1 &
SERVICE_PID=$!
NO_COLOR=1 "$BIN/thumbup-job" --config "$TENANTS" --tenant demo --window-ms "$WINDOW_MS" \
  --admin-listen "127.0.0.1:$JOB_ADMIN_PORT" --consumer demo-job \
  </dev/null >"$LOGS/job.log" 2>&1 &
JOB_PID=$!
# Every tenant needs its job: without one its likes are acknowledged and
# never counted.
NO_COLOR=1 "$BIN/thumbup-job" --config "$TENANTS" --tenant shop --window-ms "$WINDOW_MS" \
  --admin-listen "127.0.0.1:$SHOP_JOB_ADMIN_PORT" --consumer shop-job \
  </dev/null >"$LOGS/job-shop.log" 2>&1 &
SHOP_JOB_PID=$!

wait_ready() { # name pid admin-port [grpc-port]
  local i
  for ((i = 0; i < 120; i++)); do
    kill -0 "$2" 2>/dev/null || die "$1 exited during startup (see ${LOGS#"$ROOT"/})"
    if http_get "$3" /readyz >/dev/null && { [[ -z "${4:-}" ]] || port_open "$4"; }; then
      return 0
    fi
    sleep 0.25
  done
  die "$1 not ready within 30 s (see ${LOGS#"$ROOT"/})"
}
wait_ready thumbup-db-proxy "$PROXY_PID" "$PROXY_ADMIN_PORT" "$PROXY_PORT"
wait_ready thumbup-service "$SERVICE_PID" "$SERVICE_ADMIN_PORT" "${GRPC_ADDR##*:}"
wait_ready thumbup-job "$JOB_PID" "$JOB_ADMIN_PORT"
wait_ready "thumbup-job (shop)" "$SHOP_JOB_PID" "$SHOP_JOB_ADMIN_PORT"
say "failover controller, db-proxy, service and both jobs are up"

# ------------------------------------------------------------------ the demo

export THUMBUP_ADDR="http://$GRPC_ADDR" THUMBUP_TENANT=demo THUMBUP_TOKEN=demo-token-0001 THUMBUP_BUSINESS=1
ctl() { "$BIN/thumbupctl" "$@"; }

# Fresh ids per run (unix seconds and a role suffix), so runs never share data.
RUN="$(date +%s)"
ALICE="${RUN}01" BOB="${RUN}02" CAROL="${RUN}09"
VIDEO="${RUN}71" VIDEO2="${RUN}72"

echo
echo "thumbup demo: tenant demo, business 1 (video), service $GRPC_ADDR"
echo "  users:  alice=$ALICE bob=$BOB"
echo "  owner:  carol=$CAROL (uploaded both videos)"
echo "  videos: $VIDEO $VIDEO2"

step "1. alice and bob like video $VIDEO; alice also likes video $VIDEO2"
echo "   (a reply's counts are the applied counts plus this action)"
ctl like --mid "$ALICE" --message "$VIDEO" --up "$CAROL"
ctl like --mid "$BOB" --message "$VIDEO" --up "$CAROL"
ctl like --mid "$ALICE" --message "$VIDEO2" --up "$CAROL"

step "2. alice double-clicks: the second like is refused and counts nothing"
ctl like --mid "$ALICE" --message "$VIDEO" --up "$CAROL" || true

step "3. bob changes his mind: like -> dislike"
ctl dislike --mid "$BOB" --message "$VIDEO" --up "$CAROL"

step "4. alice withdraws her like of video $VIDEO2"
ctl unlike --mid "$ALICE" --message "$VIDEO2" --up "$CAROL"

step "5. counts right away: not applied yet (the job applies writes once per window)"
ctl counts "$VIDEO" "$VIDEO2"

step "6. after the job's ${WINDOW_MS} ms window: counts, states, lists, received likes"
sleep 1.5
ctl counts "$VIDEO" "$VIDEO2"
ctl states --mid "$ALICE" "$VIDEO" "$VIDEO2"
ctl states --mid "$BOB" "$VIDEO" "$VIDEO2"
ctl list --mid "$ALICE" --all
ctl likers --message "$VIDEO" --all
ctl received --up "$CAROL"

step "7. tenants are isolated: shop's token is refused for demo; shop has its own counts"
ctl --token shop-token-0001 counts "$VIDEO" || true
echo "   a shopper likes product $VIDEO of tenant shop (same id, another tenant):"
shop() { ctl --tenant shop --token shop-token-0001 "$@"; }
shop like --mid "$ALICE" --message "$VIDEO" --up "$CAROL"
echo "   after shop's job applied its window: shop's count is 1, demo's is unchanged"
for ((i = 0; i < 20; i++)); do
  shop_counts="$(shop counts "$VIDEO" 2>/dev/null)" || shop_counts=""
  grep -q "message=$VIDEO likes=1 " <<<"$shop_counts" && break
  sleep 0.5
done
shop counts "$VIDEO"
grep -q "message=$VIDEO likes=1 " <<<"$shop_counts" \
  || die "shop's like was never counted (see ${LOGS#"$ROOT"/}/job-shop.log)"
ctl counts "$VIDEO"

step "8. refused: business 9, which tenant demo does not have"
ctl --business 9 counts "$VIDEO" || true

step "9. the service's request counter, by RPC and gRPC code"
echo "> GET http://127.0.0.1:$SERVICE_ADMIN_PORT/metrics | grep thumbup_service_requests_total"
metrics="$(http_get "$SERVICE_ADMIN_PORT" /metrics)" || die "could not read the service's /metrics"
grep '^thumbup_service_requests_total' <<<"$metrics" | sort | sed 's/^/  /' || echo "  (no samples)"

# The route as the proxy holds it, as "<datacenter>@<epoch>".
proxy_route() {
  local json epoch dc
  json="$(http_get "$PROXY_ADMIN_PORT" /route)" || return 0
  epoch="$(grep -o '"epoch":[0-9]*' <<<"$json" | head -n 1)"
  dc="$(grep -o '"activeDatacenter":"[^"]*"' <<<"$json" | head -n 1)"
  dc="${dc#*:\"}"
  printf '%s@%s\n' "${dc%\"}" "${epoch#*:}"
}
switch_to() { # datacenter epoch
  local i started=$SECONDS
  echo "> active_datacenter: $1 in ${OPERATOR_CONFIG#"$ROOT"/} (the controller re-reads it every 0.5 s)"
  write_operator_config "$1"
  for ((i = 0; i < 120; i++)); do
    [[ "$(proxy_route)" == "$1@$2" ]] && break
    sleep 0.25
  done
  [[ "$(proxy_route)" == "$1@$2" ]] || die "the route never reached $1 at epoch $2 (see ${LOGS#"$ROOT"/}/failover.log)"
  echo "  the db-proxy routes to $1 at epoch $2 (after about $((SECONDS - started)) s); from the route file:"
  grep -E '^(epoch|activeDatacenter):|^    (kind|reason):' "$ROUTE" | sed 's/^ */    /'
}

step "10. planned switchover to dc-b while serving: fence dc-a, catch up, flip, promote"
switch_to dc-b 2
scripts/stack.sh status 2>&1 | grep mariadb | sed 's/^/  /'
echo "  a like after the switchover, applied on dc-b by the job:"
ctl like --mid "$ALICE" --message "$VIDEO2" --up "$CAROL"
sleep 1.5
ctl counts "$VIDEO" "$VIDEO2"

step "11. dc-a rejoins as a replica of dc-b (scripts/stack.sh reseed b a); switch back to dc-a"
scripts/stack.sh reseed b a 2>&1 | tail -n 1 | sed 's/^/  /'
switch_to dc-a 3
ctl counts "$VIDEO" "$VIDEO2"
# Leave the stack as the tests expect it: dc-b a fresh replica of dc-a.
scripts/stack.sh reseed a b 2>&1 | tail -n 1 | sed 's/^/  /'

echo
if [[ "${THUMBUP_DEMO_KEEP:-0}" == 1 ]]; then
  echo "demo finished; service and job keep running until Ctrl-C. In another shell:"
  echo "  export THUMBUP_ADDR=http://$GRPC_ADDR THUMBUP_TENANT=demo THUMBUP_TOKEN=demo-token-0001"
  echo "  ${BIN#"$ROOT"/}/thumbupctl counts $VIDEO $VIDEO2"
  trap 'exit 0' INT TERM
  wait "$SERVICE_PID" "$JOB_PID"
  die "thumbup-service or thumbup-job exited"
fi
echo "demo finished; to keep service and job running and try thumbupctl yourself:"
echo "  THUMBUP_DEMO_KEEP=1 bash scripts/demo.sh"
