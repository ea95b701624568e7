#!/usr/bin/env bash
# scripts/stack.sh - private MariaDB + Redis instances for thumbup development and tests.
#
# Usage: scripts/stack.sh COMMAND [ARGS]
#   install                    install server/client packages (and protoc) if missing
#   up                         install, initialise (first time) and start every instance and the
#                              Redis Cluster (cluster-up); idempotent
#   down                       stop every instance and cluster node gracefully (data is kept); idempotent
#   start  redis|mariadb [I]   start one server of instance I (default a) and wait until ready
#   stop   redis|mariadb [I]   gracefully stop one server, wait until its port is closed
#   kill   redis|mariadb [I]   SIGKILL one server (crash simulation), wait until it is gone
#                              (start|stop|kill redis cluster: every node of the Redis Cluster)
#   reseed PRIMARY REPLICA     make MariaDB PRIMARY (a|b) the writable primary and rebuild
#                              REPLICA as its read-only GTID replica from a fresh dump
#                              (starting either if stopped); DISCARDS the replica's data,
#                              binlog and sessions (tests use it between scenarios)
#   redis-follow REPLICA MASTER   make Redis REPLICA (a|b) a replica of Redis MASTER (the two
#                              datacenters' Redis tier, failover.redis_tier); waits until its link
#                              is up. REPLICA's own data is replaced by MASTER's.
#   redis-follow REPLICA none  make Redis REPLICA a master again (keeps its data)
#   wipe redis|mariadb I       delete a stopped server's data for good (a datacenter lost with its
#                              disks): Redis keeps only its ACL file, MariaDB is initialised empty
#                              and marked a replica, so that it never starts writable
#   rejoin OLD NEW [cluster]   the old datacenter OLD (a|b, wiped or not) rejoins as the standby of
#                              both tiers of NEW: MariaDB reseeded from NEW, Redis a replica of NEW's
#                              (with `cluster`: OLD's half of the Redis Cluster, see cluster-split,
#                              started again, each node a replica of a node of NEW)
#   status                     one line per server: running/stopped, port, writable or read-only, replication
#                              (and per cluster node, as cluster-status)
#   env                        print `export` lines for the admin URLs, ports (b: *_B), TLS files
#                              and the Redis Cluster (seed URLs, admin URL, base port)
#   reset                      down, then delete the whole stack directory (cluster nodes included)
#
# Redis Cluster (6 nodes: 3 masters with 1 replica each, ports BASE..BASE+5):
#   cluster-up                 initialise and start the nodes (running ones are left alone),
#                              create the cluster once, join nodes that lost their state,
#                              wait until it is ok (`up` does this too)
#   cluster-down               gracefully stop the cluster nodes only (replicas first)
#   cluster-status             one line per node: pid or stopped, master (slots) or replica (of port)
#   cluster-kill  PORT         SIGKILL one node (crash simulation), wait until it is gone
#   cluster-wipe  PORT         delete a stopped node's data and nodes.conf (users.acl is kept):
#                              it starts again as an empty node unknown to the cluster
#   cluster-start PORT         start one node; a wiped one rejoins (its old id forgotten) as the
#                              replica of a master without one; waits until the cluster is ok
#   cluster-add PORT           start a new node on PORT (outside BASE..BASE+5, its data in .stack/
#                              too) and join it as one more replica of the master with the fewest
#                              (a node added to a running cluster; tenants' ACL users reach it at
#                              their next provisioning)
#   cluster-remove PORT        stop a node that cluster-add started, make every other node forget
#                              it, delete its directory
#   cluster-wait-ok            wait until every running node has cluster_state:ok, every slot is
#                              served by a live master and every replica's link is up
#   cluster-masters            print the ports of the masters that serve slots, one per line
#   cluster-split  a|b         the cluster as if it spanned two datacenters: nodes BASE..BASE+2
#                              are datacenter a's, BASE+3..BASE+5 b's; the named half becomes the
#                              masters of every slot (coordinated CLUSTER FAILOVER, nothing lost),
#                              each with one replica in the other half (failover.redis_tier on a
#                              cluster; the nodes of a lost datacenter rejoin with cluster-start)
#   cluster-rebalance          spread the slots evenly over the masters (`redis-cli --cluster
#                              rebalance`, retried until the nodes agree), then wait until
#                              every node agrees on the slots again
#
# Environment:
#   THUMBUP_STACK_DIR            data directory (default: <repo>/.stack)
#   THUMBUP_DB_PORT              MariaDB port of instance a (default 23306; b: THUMBUP_DB_PORT_B, 23307)
#   THUMBUP_REDIS_PORT           Redis port of instance a (default 26379; b: THUMBUP_REDIS_PORT_B, 26380)
#   THUMBUP_REDIS_TLS_PORT       Redis TLS port of instance a (default: its port + 10; b: THUMBUP_REDIS_TLS_PORT_B)
#   THUMBUP_REDIS_CLUSTER_PORT   first port (BASE) of the Redis Cluster nodes (default 27001; the
#                                nodes' cluster bus ports are their ports + 10000)
#   THUMBUP_DB_ADMIN_PASSWORD    password of MariaDB user thumbup_admin (default thumbup-admin)
#   THUMBUP_REDIS_ADMIN_PASSWORD password of the Redis `default` user (default thumbup-admin)
#   THUMBUP_DB_REPL_PASSWORD     password of the MariaDB replication user thumbup_repl (default thumbup-repl)
#   THUMBUP_STACK_TIMEOUT        seconds to wait for a server to start/stop (default 60)
#
# Two datacenters, "a" and "b", each with a MariaDB and a Redis; all server
# functions take the instance name and port as parameters.  `up` starts all
# four; MariaDB a is the primary (binlog, GTID) and b its read-only replica
# (rebuilt from a dump when it is not replicating).  A server's role is kept
# in mariadb-<i>/role (written by reseed): a replica starts with
# read_only=ON and resumes replicating; `up` keeps swapped roles.
#
# TLS beside plaintext: `up` makes a CA and a server certificate (for
# 127.0.0.1 and localhost) with openssl under <stack>/tls, once.  Each Redis
# also serves TLS on its TLS port; each MariaDB offers TLS on its port
# (in-band).  `env` prints THUMBUP_STACK_TLS_CA (the CA file) and
# THUMBUP_STACK_TLS_CERT / THUMBUP_STACK_TLS_KEY (the server certificate,
# which the tests also give the gRPC service).
#
# Redis Cluster beside the two single Redis servers (plaintext only): node
# <port> keeps its AOF, nodes.conf, users.acl (`default` user with the admin
# password, also used by replicas to sync), log and pid in
# <stack>/redis-cluster-<port>.  cluster-node-timeout is 2000 ms and a replica
# may always be promoted (cluster-replica-validity-factor 0), so a killed
# master's replica takes over within a few seconds.
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
ROOT="$(dirname -- "$SCRIPT_DIR")"
STACK="${THUMBUP_STACK_DIR:-$ROOT/.stack}"
case "$STACK" in /*) ;; *) STACK="$PWD/$STACK" ;; esac
STACK="${STACK%/}"

DB_ADMIN_USER="thumbup_admin"
DB_ADMIN_PW="${THUMBUP_DB_ADMIN_PASSWORD:-thumbup-admin}"
REDIS_ADMIN_PW="${THUMBUP_REDIS_ADMIN_PASSWORD:-thumbup-admin}"
TIMEOUT="${THUMBUP_STACK_TIMEOUT:-60}"
OS_USER="$(id -un)"

# Instances started by `up`.
INSTANCES=(a b)
REDIS_INSTANCES=(a b)
REPL_USER="thumbup_repl"
REPL_PW="${THUMBUP_DB_REPL_PASSWORD:-thumbup-repl}"
# Redis Cluster: CLUSTER_NODES nodes on CLUSTER_BASE.., one replica per master.
CLUSTER_BASE="${THUMBUP_REDIS_CLUSTER_PORT:-27001}"
CLUSTER_NODES=6
CLUSTER_SLOTS=16384

db_port_of() {
  case "$1" in
    a) echo "${THUMBUP_DB_PORT:-23306}" ;;
    b) echo "${THUMBUP_DB_PORT_B:-23307}" ;;
    *) die "unknown instance '$1'" ;;
  esac
}
redis_port_of() {
  case "$1" in
    a) echo "${THUMBUP_REDIS_PORT:-26379}" ;;
    b) echo "${THUMBUP_REDIS_PORT_B:-26380}" ;;
    *) die "unknown instance '$1'" ;;
  esac
}
redis_tls_port_of() {
  case "$1" in
    a) echo "${THUMBUP_REDIS_TLS_PORT:-$(($(redis_port_of a) + 10))}" ;;
    b) echo "${THUMBUP_REDIS_TLS_PORT_B:-$(($(redis_port_of b) + 10))}" ;;
    *) die "unknown instance '$1'" ;;
  esac
}
server_id_of() {
  case "$1" in
    a) echo 1 ;;
    b) echo 2 ;;
    *) die "unknown instance '$1'" ;;
  esac
}

# ---------------------------------------------------------------- helpers

log() { printf 'stack.sh: %s\n' "$*" >&2; }
die() { printf 'stack.sh: error: %s\n' "$*" >&2; exit 1; }

# Print the log written since the last "==== stack.sh: starting" marker (max 40 lines).
show_log_tail() { # file
  if [[ -s "$1" ]]; then
    printf 'stack.sh: ---- last lines of %s ----\n' "$1" >&2
    awk '/^==== stack\.sh: starting/ { n = 0 } { buf[n++] = $0 } END { for (i = (n > 40 ? n - 40 : 0); i < n; i++) print buf[i] }' \
      "$1" >&2 || true
    printf 'stack.sh: ----\n' >&2
  else
    printf 'stack.sh: (log %s is empty or missing)\n' "$1" >&2
  fi
}

# True if something accepts TCP connections on 127.0.0.1:port.
port_open() {
  # shellcheck disable=SC2016 # $1 is expanded by the inner bash
  timeout 3 bash -c ': <>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
}

# Prints the pid stored in pidfile if that process is alive and is `comm`.
live_pid() { # pidfile comm
  local pid
  [[ -r "$1" ]] || return 1
  pid="$(tr -dc '0-9' <"$1" 2>/dev/null || true)"
  [[ -n "$pid" ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  [[ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" == "$2" ]] || return 1
  echo "$pid"
}

wait_pid_gone() { # pid seconds
  local i
  for ((i = 0; i < $2 * 4; i++)); do
    kill -0 "$1" 2>/dev/null || return 0
    sleep 0.25
  done
  ! kill -0 "$1" 2>/dev/null
}

wait_port_closed() { # port seconds
  local i
  for ((i = 0; i < $2 * 4; i++)); do
    port_open "$1" || return 0
    sleep 0.25
  done
  ! port_open "$1"
}

# Serialise mutating commands (tests may call `up` concurrently).  Daemons are
# started with fd 9 closed so they never inherit the lock.
lock_stack() {
  mkdir -p "$STACK"
  exec 9>"$STACK/.lock"
  flock -w 300 9 || die "could not lock $STACK/.lock (another stack.sh still running?)"
}

sql_str() { # quote a value as a SQL string literal
  local s="$1"
  s="${s//\\/\\\\}"
  s="${s//\'/\\\'}"
  printf "'%s'" "$s"
}

urlencode() {
  local LC_ALL=C s="$1" out="" c hex i
  for ((i = 0; i < ${#s}; i++)); do
    c="${s:i:1}"
    case "$c" in
      [a-zA-Z0-9._~-]) out+="$c" ;;
      *) printf -v hex '%%%02X' "'$c"; out+="$hex" ;;
    esac
  done
  printf '%s' "$out"
}

find_mariadbd() {
  if command -v mariadbd >/dev/null 2>&1; then command -v mariadbd
  elif [[ -x /usr/sbin/mariadbd ]]; then echo /usr/sbin/mariadbd
  else return 1
  fi
}

# ---------------------------------------------------------------- install

cmd_install() {
  local missing=() tool
  find_mariadbd >/dev/null || missing+=(mariadbd)
  for tool in mariadb-install-db mariadb mariadb-admin redis-server redis-cli protoc openssl; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
  done
  if ((${#missing[@]} == 0)); then
    return 0
  fi
  log "missing: ${missing[*]} - installing Debian packages"
  local sudo=()
  if [[ "$(id -u)" != 0 ]]; then
    command -v sudo >/dev/null 2>&1 || die "not root and sudo is not available; install: mariadb-server mariadb-client redis-server redis-tools protobuf-compiler openssl"
    sudo=(sudo)
  fi
  # The packages' postinst may start the system-wide services on 3306/6379;
  # our instances use other ports and never talk to them.
  "${sudo[@]}" apt-get update 9>&- || die "apt-get update failed"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    mariadb-server mariadb-client redis-server redis-tools protobuf-compiler openssl 9>&- \
    || die "apt-get install failed"
  find_mariadbd >/dev/null || die "mariadbd still missing after install"
  for tool in mariadb-install-db mariadb mariadb-admin redis-server redis-cli protoc openssl; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool still missing after install"
  done
}

# The cluster commands need only redis-server and redis-cli.
install_redis() {
  if command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; then
    return 0
  fi
  cmd_install
}

# ---------------------------------------------------------------- tls

tls_dir() { echo "$STACK/tls"; }

# A self-made CA and one server certificate signed by it, for 127.0.0.1 and
# localhost, used by every server of the stack (and the tests' gRPC
# service).  Made once; remade only when the certificate no longer verifies
# against the CA or expires within a day.
ensure_certs() {
  local dir
  dir="$(tls_dir)"
  if [[ -r "$dir/ca.crt" && -r "$dir/server.crt" && -r "$dir/server.key" ]] \
    && openssl verify -CAfile "$dir/ca.crt" "$dir/server.crt" >/dev/null 2>&1 \
    && openssl x509 -checkend 86400 -noout -in "$dir/server.crt" >/dev/null 2>&1; then
    return 0
  fi
  log "making a CA and a server certificate in $dir"
  mkdir -p "$dir"
  (
    umask 077
    cd "$dir"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
      -subj "/CN=thumbup local stack CA" -keyout ca.key -out ca.crt \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
      -subj "/CN=localhost" -keyout server.key -out server.csr 2>/dev/null
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
      "extendedKeyUsage=serverAuth" "subjectAltName=DNS:localhost,IP:127.0.0.1" >server.ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 \
      -extfile server.ext -out server.crt 2>/dev/null
    rm -f server.csr server.ext ca.srl
  ) 9>&- || die "openssl could not make the stack's certificates in $dir"
  # The CA and the certificate are public; the keys stay the owner's.
  chmod 644 "$dir/ca.crt" "$dir/server.crt"
}

# ---------------------------------------------------------------- mariadb

mdb_dir() { echo "$STACK/mariadb-$1"; }
mdb_sock() { echo "$STACK/mariadb-$1/mysqld.sock"; }
mdb_pidfile() { echo "$STACK/mariadb-$1/mariadbd.pid"; }
mdb_log() { echo "$STACK/mariadb-$1/error.log"; }
mdb_pid() { live_pid "$(mdb_pidfile "$1")" mariadbd; }
mdb_rolefile() { echo "$STACK/mariadb-$1/role"; }
# primary or replica; a primary, b replica until `reseed` says otherwise.
mdb_role() {
  local f
  f="$(mdb_rolefile "$1")"
  if [[ -r "$f" ]]; then cat "$f"; elif [[ "$1" == a ]]; then echo primary; else echo replica; fi
}

# Local superuser connection over the unix socket.  mariadb-install-db with
# socket auth creates root@localhost (OS user root) and <OS user>@localhost.
mdb_root() { # instance, mariadb args...
  local inst="$1"
  shift
  mariadb --no-defaults -u"$OS_USER" --socket="$(mdb_sock "$inst")" --connect-timeout=3 "$@"
}

mdb_ping() { mdb_root "$1" -N -B -e 'select 1' >/dev/null 2>&1; }

init_mariadb() { # instance
  local inst="$1" dir data tmp out
  dir="$(mdb_dir "$inst")"
  data="$dir/data"
  [[ -d "$data/mysql" ]] && return 0
  mkdir -p "$dir"
  # unix socket paths are limited to 107 bytes
  (($(printf '%s' "$(mdb_sock "$inst")" | wc -c) < 100)) \
    || die "socket path $(mdb_sock "$inst") is too long; use a shorter THUMBUP_STACK_DIR"
  tmp="$dir/data.init"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  local user_opt=()
  [[ "$(id -u)" == 0 ]] && user_opt=(--user="$OS_USER")
  log "initialising mariadb-$inst in $data"
  if ! out="$(mariadb-install-db --no-defaults --datadir="$tmp" "${user_opt[@]}" \
    --auth-root-authentication-method=socket --auth-root-socket-user="$OS_USER" \
    --skip-test-db --skip-name-resolve 2>&1 9>&-)"; then
    printf '%s\n' "$out" | tail -n 40 >&2
    rm -rf "$tmp"
    die "mariadb-install-db failed for mariadb-$inst"
  fi
  printf '%s\n' "$out" >"$dir/install-db.log"
  mv "$tmp" "$data"
}

start_mariadb() { # instance port
  local inst="$1" port="$2" dir data sock pidfile logf mariadbd pid launcher i
  dir="$(mdb_dir "$inst")"
  data="$dir/data"
  sock="$(mdb_sock "$inst")"
  pidfile="$(mdb_pidfile "$inst")"
  logf="$(mdb_log "$inst")"
  [[ -d "$data/mysql" ]] || die "mariadb-$inst is not initialised (run: $0 up)"

  if pid="$(mdb_pid "$inst")"; then
    if mdb_ping "$inst"; then
      log "mariadb-$inst already running (pid $pid, port $port)"
      return 0
    fi
    log "mariadb-$inst (pid $pid) is running but not answering yet; waiting"
    launcher=""
  else
    if port_open "$port"; then
      die "port $port is already in use by another process; cannot start mariadb-$inst (set THUMBUP_DB_PORT$( [[ "$inst" == a ]] || echo _B))"
    fi
    mariadbd="$(find_mariadbd)" || die "mariadbd not found (run: $0 install)"
    ensure_certs
    rm -f "$pidfile" "$sock" "$sock.lock"
    log "starting mariadb-$inst on 127.0.0.1:$port"
    printf '\n==== stack.sh: starting mariadb-%s at %s ====\n' "$inst" "$(date '+%F %T')" >>"$logf"
    setsid nohup "$mariadbd" --no-defaults \
      --user="$OS_USER" \
      --datadir="$data" \
      --port="$port" \
      --bind-address=127.0.0.1 \
      --socket="$sock" \
      --pid-file="$pidfile" \
      --log-error="$logf" \
      --skip-name-resolve \
      --server-id="$(server_id_of "$inst")" \
      --log-bin=mysql-bin \
      --binlog-format=ROW \
      --log-slave-updates \
      --sync-binlog=1 \
      --binlog-expire-logs-seconds=172800 \
      --slave-net-timeout=5 \
      --read-only="$( [[ "$(mdb_role "$inst")" == replica ]] && echo ON || echo OFF)" \
      --innodb-buffer-pool-size=128M \
      --innodb-flush-log-at-trx-commit=1 \
      --max-connections=500 \
      --character-set-server=utf8mb4 \
      --collation-server=utf8mb4_general_ci \
      --ssl-ca="$(tls_dir)/ca.crt" \
      --ssl-cert="$(tls_dir)/server.crt" \
      --ssl-key="$(tls_dir)/server.key" \
      </dev/null >>"$logf" 2>&1 9>&- &
    launcher=$!
  fi

  for ((i = 0; i < TIMEOUT * 4; i++)); do
    if mdb_ping "$inst"; then
      pid="$(mdb_pid "$inst" || echo '?')"
      log "mariadb-$inst ready (pid $pid, port $port)"
      return 0
    fi
    if ! mdb_pid "$inst" >/dev/null && { [[ -z "$launcher" ]] || ! kill -0 "$launcher" 2>/dev/null; }; then
      # give a just-exited process a moment to have written its pid file
      sleep 0.5
      if ! mdb_pid "$inst" >/dev/null; then
        show_log_tail "$logf"
        die "mariadb-$inst exited during startup (see $logf)"
      fi
    fi
    sleep 0.25
  done
  show_log_tail "$logf"
  die "mariadb-$inst did not answer within ${TIMEOUT}s (see $logf)"
}

# Idempotently create the admin account and verify it over TCP.
ensure_db_admin() { # instance port
  local inst="$1" port="$2" u pw h sql=""
  if MYSQL_PWD="$DB_ADMIN_PW" mariadb --no-defaults --protocol=TCP -h127.0.0.1 -P"$port" \
    -u"$DB_ADMIN_USER" --connect-timeout=3 -N -B -e 'show grants' 2>/dev/null \
    | grep -q 'ALL PRIVILEGES ON \*\.\* .*WITH GRANT OPTION'; then
    return 0
  fi
  log "creating MariaDB account $DB_ADMIN_USER on mariadb-$inst"
  u="$(sql_str "$DB_ADMIN_USER")"
  pw="$(sql_str "$DB_ADMIN_PW")"
  # Each server gets its own accounts: not written to the binlog.
  sql="SET sql_log_bin=0;"
  for h in 127.0.0.1 localhost %; do
    h="$(sql_str "$h")"
    sql+="CREATE USER IF NOT EXISTS $u@$h IDENTIFIED BY $pw;"
    sql+="ALTER USER $u@$h IDENTIFIED BY $pw;"
    sql+="GRANT ALL PRIVILEGES ON *.* TO $u@$h WITH GRANT OPTION;"
  done
  mdb_root "$inst" -e "$sql" || die "could not create $DB_ADMIN_USER on mariadb-$inst"
  MYSQL_PWD="$DB_ADMIN_PW" mariadb --no-defaults --protocol=TCP -h127.0.0.1 -P"$port" \
    -u"$DB_ADMIN_USER" --connect-timeout=3 -N -B -e 'select 1' >/dev/null \
    || die "cannot log in as $DB_ADMIN_USER over TCP 127.0.0.1:$port"
}

# A MariaDB started by an older stack.sh (without TLS) is restarted once
# with it: its TLS settings cannot change at runtime.  Data is kept.
ensure_mariadb_tls() { # instance port
  [[ "$(mdb_root "$1" -N -B -e 'SELECT @@have_ssl')" == YES ]] && return 0
  log "mariadb-$1 runs without TLS; restarting it with TLS"
  stop_mariadb "$1" "$2"
  start_mariadb "$1" "$2"
  [[ "$(mdb_root "$1" -N -B -e 'SELECT @@have_ssl')" == YES ]] || die "mariadb-$1 has no TLS after a restart (see $(mdb_log "$1"))"
}

stop_mariadb() { # instance port
  local inst="$1" port="$2" pid
  if ! pid="$(mdb_pid "$inst")"; then
    log "mariadb-$inst is not running"
    return 0
  fi
  log "stopping mariadb-$inst (pid $pid)"
  timeout "$TIMEOUT" mariadb-admin --no-defaults -u"$OS_USER" --socket="$(mdb_sock "$inst")" \
    --connect-timeout=3 shutdown >/dev/null 2>&1 || true
  if ! wait_pid_gone "$pid" "$TIMEOUT"; then
    log "mariadb-$inst did not stop after mariadb-admin shutdown; sending SIGTERM"
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_pid_gone "$pid" "$TIMEOUT"; then
      log "mariadb-$inst ignored SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      wait_pid_gone "$pid" 10 || die "could not stop mariadb-$inst (pid $pid)"
    fi
  fi
  wait_port_closed "$port" 10 || die "port $port still accepts connections after stopping mariadb-$inst"
  log "mariadb-$inst stopped"
}

kill_mariadb() { # instance port
  local inst="$1" port="$2" pid
  if ! pid="$(mdb_pid "$inst")"; then
    log "mariadb-$inst is not running"
    return 0
  fi
  log "killing mariadb-$inst (SIGKILL pid $pid)"
  kill -KILL "$pid" 2>/dev/null || true
  wait_pid_gone "$pid" 30 || die "mariadb-$inst (pid $pid) still alive after SIGKILL"
  wait_port_closed "$port" 10 || die "port $port still accepts connections after killing mariadb-$inst"
}

# The replication account, on every server (either may become the primary).
ensure_repl_user() { # instance
  local u pw
  u="$(sql_str "$REPL_USER")"
  pw="$(sql_str "$REPL_PW")"
  mdb_root "$1" -e "SET sql_log_bin=0; CREATE USER IF NOT EXISTS $u@'%' IDENTIFIED BY $pw;
    ALTER USER $u@'%' IDENTIFIED BY $pw; GRANT REPLICATION SLAVE ON *.* TO $u@'%';" \
    || die "could not create $REPL_USER on mariadb-$1"
}

# One field of SHOW SLAVE STATUS (empty when the server does not replicate).
replica_field() { # instance field
  mdb_root "$1" -e 'SHOW SLAVE STATUS\G' 2>/dev/null | sed -n "s/^ *$2: //p"
}

replica_healthy() { # instance
  [[ "$(replica_field "$1" Slave_IO_Running)" == Yes && "$(replica_field "$1" Slave_SQL_Running)" == Yes ]]
}

# replica_healthy, allowing a replica (or its primary) that has just started
# up to 10s for its IO thread to get past "Connecting".
replica_settles() { # instance
  local i io sql
  for ((i = 0; i < 40; i++)); do
    io="$(replica_field "$1" Slave_IO_Running)"
    sql="$(replica_field "$1" Slave_SQL_Running)"
    [[ "$io" == Yes && "$sql" == Yes ]] && return 0
    [[ "$sql" == Yes && "$io" != No && -n "$io" ]] || return 1
    sleep 0.25
  done
  return 1
}

# The replica threads' state and last errors, for error messages.
replica_summary() { # instance
  mdb_root "$1" -e 'SHOW SLAVE STATUS\G' 2>/dev/null \
    | sed -n -E 's/^ *(Slave_IO_Running|Slave_SQL_Running|Gtid_IO_Pos|Last_IO_Error|Last_SQL_Error): (.+)$/\1=\2/p' \
    | paste -sd' ' -
}

now_ms() { echo $(($(date +%s%N) / 1000000)); }

# Makes PRIMARY writable and REPLICA a fresh read-only GTID replica of it,
# from a consistent dump (the replica's own data is dropped first).
reseed() { # primary replica
  local p="$1" r="$2" t0 ms pport pos ppos db dbs caught inst ids id i errf
  t0="$(now_ms)"
  pport="$(db_port_of "$p")"
  for inst in "$p" "$r"; do
    init_mariadb "$inst"
    start_mariadb "$inst" "$(db_port_of "$inst")"
    ensure_db_admin "$inst" "$(db_port_of "$inst")"
    ensure_repl_user "$inst"
  done
  mdb_root "$p" -e 'STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = OFF;' \
    || die "could not make mariadb-$p a writable primary"
  # The replica stays read-only throughout (root writes regardless): a
  # failover controller watching it must never see a second writable DB.
  # Its old replication position goes too: the dump sets the new one.
  mdb_root "$r" -e "SET GLOBAL read_only = ON; STOP SLAVE; RESET SLAVE ALL; SET GLOBAL gtid_slave_pos = '';" \
    || die "could not stop replication on mariadb-$r"
  # Its clients go with its data (an open transaction would hold up the drop).
  ids="$(mdb_root "$r" -N -B -e "SELECT id FROM information_schema.processlist
    WHERE id <> CONNECTION_ID() AND user NOT IN ('system user', 'event_scheduler')
      AND command NOT IN ('Daemon', 'Slave_IO', 'Slave_SQL', 'Slave_worker')")" \
    || die "could not list the sessions of mariadb-$r"
  for id in $ids; do
    mdb_root "$r" -e "KILL $id" 2>/dev/null || true
  done
  dbs="$(mdb_root "$r" -N -B -e "SELECT schema_name FROM information_schema.schemata
    WHERE schema_name NOT IN ('mysql', 'information_schema', 'performance_schema', 'sys')")" \
    || die "could not list the databases of mariadb-$r"
  for db in $dbs; do
    mdb_root "$r" -e "SET sql_log_bin=0; SET lock_wait_timeout=$TIMEOUT; DROP DATABASE \`$db\`" \
      || die "could not drop $db on mariadb-$r"
  done
  # The dump ends with the primary's GTID position as the replica's
  # gtid_slave_pos (--gtid --master-data); the replica's own copy of that
  # table is not overwritten from the primary's.
  errf="$(mdb_dir "$r")/reseed.err"
  mariadb-dump --no-defaults -u"$OS_USER" --socket="$(mdb_sock "$p")" --all-databases \
    --single-transaction --gtid --master-data=1 --routines --events --triggers \
    --ignore-table=mysql.gtid_slave_pos 2>"$errf" \
    | mdb_root "$r" --init-command='SET sql_log_bin=0' \
    || { cat "$errf" >&2; die "copying mariadb-$p into mariadb-$r failed"; }
  pos="$(mdb_root "$r" -N -B -e 'SELECT @@global.gtid_slave_pos')" \
    || die "could not read the GTID position of mariadb-$r"
  [[ "$pos" =~ ^[0-9,-]*$ ]] || die "unexpected gtid_slave_pos '$pos' on mariadb-$r"
  # Nothing of its own in its binlog: it continues the primary's GTID history
  # from the copied position (gtid_binlog_pos = gtid_slave_pos), so that it
  # numbers on from there if promoted.  The value must be a literal: an
  # @@global.gtid_slave_pos there hangs MariaDB 10.11.
  mdb_root "$r" -e 'SET sql_log_bin=0; FLUSH PRIVILEGES; RESET MASTER;' \
    || die "could not reset the binlog of mariadb-$r"
  if [[ -n "$pos" ]]; then
    mdb_root "$r" -e "SET GLOBAL gtid_binlog_state = '$pos'" \
      || die "could not set the binlog GTID state of mariadb-$r"
  fi
  mdb_root "$r" -e "CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT=$pport,
      MASTER_USER=$(sql_str "$REPL_USER"), MASTER_PASSWORD=$(sql_str "$REPL_PW"),
      MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1;
    SET GLOBAL read_only = ON; START SLAVE;" || die "could not start replication on mariadb-$r"
  echo primary >"$(mdb_rolefile "$p")"
  echo replica >"$(mdb_rolefile "$r")"
  for ((i = 0; ; i++)); do
    replica_healthy "$r" && break
    if [[ "$(replica_field "$r" Last_SQL_Errno)" != 0 ]] || ((i >= TIMEOUT * 10)); then
      die "mariadb-$r does not replicate from mariadb-$p (127.0.0.1:$pport): $(replica_summary "$r")"
    fi
    sleep 0.1
  done
  ppos="$(mdb_root "$p" -N -B -e 'SELECT @@gtid_binlog_pos')" || die "could not read the GTID position of mariadb-$p"
  caught="$(mdb_root "$r" -N -B -e "SELECT MASTER_GTID_WAIT($(sql_str "$ppos"), $TIMEOUT)")" || caught=error
  if [[ "$caught" != 0 ]] || ! replica_healthy "$r"; then
    die "mariadb-$r did not catch up with mariadb-$p (at $ppos) within ${TIMEOUT}s: $(replica_summary "$r")"
  fi
  ms=$(($(now_ms) - t0))
  printf 'mariadb-%s: read-only replica of mariadb-%s (port %s), caught up at GTID %s; reseeded in %d.%03ds\n' \
    "$r" "$p" "$pport" "${ppos:-(none)}" $((ms / 1000)) $((ms % 1000))
}

# ---------------------------------------------------------------- redis

redis_dir() { echo "$STACK/redis-$1"; }
redis_pidfile() { echo "$STACK/redis-$1/redis.pid"; }
redis_log() { echo "$STACK/redis-$1/redis.log"; }
redis_pid() { live_pid "$(redis_pidfile "$1")" redis-server; }

rcli() { # port, redis-cli args...
  local port="$1"
  shift
  REDISCLI_AUTH="$REDIS_ADMIN_PW" timeout 10 redis-cli -h 127.0.0.1 -p "$port" \
    --user default --no-auth-warning "$@"
}

redis_ping() { [[ "$(rcli "$1" ping 2>/dev/null)" == PONG ]]; }

# The TLS settings of redis-<instance>, as `--name value` words (the paths
# hold no blanks: the stack dir is checked in init_redis).  Clients are not
# asked for certificates: they authenticate with ACL users.
redis_tls_args() { # instance
  local d
  d="$(tls_dir)"
  printf '%s ' --tls-port "$(redis_tls_port_of "$1")" --tls-cert-file "$d/server.crt" \
    --tls-key-file "$d/server.key" --tls-ca-cert-file "$d/ca.crt" --tls-auth-clients no
}

# A Redis started by an older stack.sh (without TLS) gets it at runtime:
# CONFIG SET takes the same settings.
ensure_redis_tls() { # instance port
  local args i
  port_open "$(redis_tls_port_of "$1")" && return 0
  log "redis-$1: enabling TLS on port $(redis_tls_port_of "$1")"
  read -r -a args <<<"$(redis_tls_args "$1")"
  local set=()
  # The port last: the certificate must be in place when it opens.
  for ((i = 2; i < ${#args[@]}; i += 2)); do set+=("${args[i]#--}" "${args[i + 1]}"); done
  set+=(tls-port "${args[1]}")
  [[ "$(rcli "$2" CONFIG SET "${set[@]}" 2>&1)" == OK ]] || die "could not enable TLS on redis-$1"
}

# Makes dir and its users.acl with the `default` user (admin password).
ensure_redis_acl() { # dir
  local dir="$1" acl="$1/users.acl"
  [[ "$STACK" != *[[:space:]]* ]] || die "THUMBUP_STACK_DIR must not contain whitespace"
  mkdir -p "$dir"
  # Tenant users are added at runtime (ACL SETUSER + ACL SAVE): never overwrite.
  if [[ ! -e "$acl" ]]; then
    [[ "$REDIS_ADMIN_PW" != *[[:space:]]* ]] || die "THUMBUP_REDIS_ADMIN_PASSWORD must not contain whitespace"
    (umask 077 && printf 'user default on >%s ~* &* +@all\n' "$REDIS_ADMIN_PW" >"$acl.tmp")
    mv "$acl.tmp" "$acl"
  fi
}

init_redis() { # instance
  ensure_redis_acl "$(redis_dir "$1")"
}

start_redis() { # instance port
  local inst="$1" port="$2" dir pidfile logf pid out
  dir="$(redis_dir "$inst")"
  pidfile="$(redis_pidfile "$inst")"
  logf="$(redis_log "$inst")"
  [[ -e "$dir/users.acl" ]] || die "redis-$inst is not initialised (run: $0 up)"

  if pid="$(redis_pid "$inst")"; then
    if redis_ping "$port"; then
      log "redis-$inst already running (pid $pid, port $port)"
      return 0
    fi
    log "redis-$inst (pid $pid) is running but not answering yet; waiting"
  else
    if port_open "$port"; then
      die "port $port is already in use by another process; cannot start redis-$inst (set THUMBUP_REDIS_PORT$( [[ "$inst" == a ]] || echo _B))"
    fi
    ensure_certs
    rm -f "$pidfile"
    local tls_args
    read -r -a tls_args <<<"$(redis_tls_args "$inst")"
    log "starting redis-$inst on 127.0.0.1:$port (TLS: $(redis_tls_port_of "$inst"))"
    printf '\n==== stack.sh: starting redis-%s at %s ====\n' "$inst" "$(date '+%F %T')" >>"$logf"
    if ! out="$(cd "$dir" && redis-server \
      --port "$port" \
      --bind 127.0.0.1 \
      --dir "$dir" \
      --appendonly yes \
      --appendfsync always \
      --save "" \
      --daemonize yes \
      --pidfile "$pidfile" \
      --logfile "$logf" \
      --aclfile "$dir/users.acl" \
      "${tls_args[@]}" \
      </dev/null 2>&1 9>&-)"; then
      printf '%s\n' "$out" >&2
      show_log_tail "$logf"
      die "redis-server failed to start for redis-$inst"
    fi
  fi

  await_redis "redis-$inst" "$port" "$pidfile" "$logf"
}

stop_redis() { # instance port
  stop_redis_server "redis-$1" "$2" "$(redis_pidfile "$1")"
}

kill_redis() { # instance port
  kill_redis_server "redis-$1" "$2" "$(redis_pidfile "$1")"
}

# Waits until the redis-server just started (daemonized) answers PONG.
await_redis() { # name port pidfile logfile
  local name="$1" port="$2" pidfile="$3" logf="$4" pid i
  for ((i = 0; i < TIMEOUT * 4; i++)); do
    if redis_ping "$port"; then
      pid="$(live_pid "$pidfile" redis-server || echo '?')"
      log "$name ready (pid $pid, port $port)"
      return 0
    fi
    # the daemonized server writes its pid file right after forking
    if ((i >= 8)) && ! live_pid "$pidfile" redis-server >/dev/null; then
      show_log_tail "$logf"
      die "$name exited during startup (see $logf)"
    fi
    sleep 0.25
  done
  show_log_tail "$logf"
  die "$name did not answer PONG within ${TIMEOUT}s (see $logf)"
}

# Stops a redis-server gracefully (SHUTDOWN flushes the AOF, and in a
# cluster saves nodes.conf; with appendfsync always nothing is lost), then
# harder if it does not go.
stop_redis_server() { # name port pidfile
  local name="$1" port="$2" pid
  if ! pid="$(live_pid "$3" redis-server)"; then
    log "$name is not running"
    return 0
  fi
  log "stopping $name (pid $pid)"
  rcli "$port" shutdown >/dev/null 2>&1 || true
  if ! wait_pid_gone "$pid" "$TIMEOUT"; then
    log "$name did not stop after SHUTDOWN; sending SIGTERM"
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_pid_gone "$pid" "$TIMEOUT"; then
      log "$name ignored SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      wait_pid_gone "$pid" 10 || die "could not stop $name (pid $pid)"
    fi
  fi
  wait_port_closed "$port" 10 || die "port $port still accepts connections after stopping $name"
  log "$name stopped"
}

# SIGKILLs a redis-server (crash simulation) and waits until it is gone.
kill_redis_server() { # name port pidfile
  local name="$1" port="$2" pid
  if ! pid="$(live_pid "$3" redis-server)"; then
    log "$name is not running"
    return 0
  fi
  log "killing $name (SIGKILL pid $pid)"
  kill -KILL "$pid" 2>/dev/null || true
  wait_pid_gone "$pid" 30 || die "$name (pid $pid) still alive after SIGKILL"
  wait_port_closed "$port" 10 || die "port $port still accepts connections after killing $name"
}

# ---------------------------------------------------------------- redis cluster

rc_name() { echo "redis-cluster-$1"; }
rc_dir() { echo "$STACK/redis-cluster-$1"; }
rc_pidfile() { echo "$STACK/redis-cluster-$1/redis.pid"; }
rc_log() { echo "$STACK/redis-cluster-$1/redis.log"; }
rc_pid() { live_pid "$(rc_pidfile "$1")" redis-server; }

# The configured ports (BASE..BASE+5).
cluster_ports() {
  local i
  for ((i = 0; i < CLUSTER_NODES; i++)); do echo $((CLUSTER_BASE + i)); done
}

# The configured ports and those of node directories on disk, sorted.
cluster_all_ports() {
  local d p
  {
    cluster_ports
    for d in "$STACK"/redis-cluster-*; do
      [[ -d "$d" ]] || continue
      p="${d##*-}"
      if [[ "$p" =~ ^[1-9][0-9]*$ ]]; then echo "$p"; fi
    done
  } | sort -nu
}

check_cluster_base() {
  if ! [[ "$CLUSTER_BASE" =~ ^[1-9][0-9]{3,4}$ ]] || ((CLUSTER_BASE + CLUSTER_NODES - 1 + 10000 > 65535)); then
    die "THUMBUP_REDIS_CLUSTER_PORT must be a port from 1000 to $((65535 - 10000 - CLUSTER_NODES + 1)) (the cluster bus ports are +10000)"
  fi
}

# One field of CLUSTER INFO / INFO replication of the node on port.
rc_cinfo() { rcli "$1" cluster info 2>/dev/null | tr -d '\r' | sed -n "s/^$2://p"; }
rc_rinfo() { rcli "$1" info replication 2>/dev/null | tr -d '\r' | sed -n "s/^$2://p"; }
rc_nodes() { rcli "$1" cluster nodes 2>/dev/null | tr -d '\r'; }
rc_myid() { rcli "$1" cluster myid 2>/dev/null | tr -d '\r'; }

# True if the node on port runs (our pid file) and answers.
rc_live() { rc_pid "$1" >/dev/null && redis_ping "$1"; }

# True if the node knows other nodes or serves slots (not a fresh/wiped node).
rc_in_cluster() { # port
  local known assigned
  known="$(rc_cinfo "$1" cluster_known_nodes)"
  assigned="$(rc_cinfo "$1" cluster_slots_assigned)"
  [[ "${known:-1}" -gt 1 || "${assigned:-0}" -gt 0 ]]
}

# Running nodes that are part of a cluster, except port $1 (if given).
rc_live_members() { # [except port]
  local p
  while read -r p; do
    [[ "$p" == "${1:-}" ]] && continue
    if rc_live "$p" && rc_in_cluster "$p"; then echo "$p"; fi
  done < <(cluster_all_ports)
}

# The first of them (nothing if none).
rc_first_member() { # [except port]
  local p
  while read -r p; do
    [[ "$p" == "${1:-}" ]] && continue
    if rc_live "$p" && rc_in_cluster "$p"; then
      echo "$p"
      return 0
    fi
  done < <(cluster_all_ports)
}

# The port in a `cluster nodes` address (ip:port@cport[,hostname]).
RC_AWK_PORT='function port_of(a, x) { split(a, x, /[:@,]/); return x[2] }'

init_cluster_node() { # port
  ensure_redis_acl "$(rc_dir "$1")"
}

start_cluster_node() { # port
  local port="$1" name dir pidfile logf pid out
  name="$(rc_name "$port")"
  dir="$(rc_dir "$port")"
  pidfile="$(rc_pidfile "$port")"
  logf="$(rc_log "$port")"
  [[ -e "$dir/users.acl" ]] || die "$name is not initialised (run: $0 cluster-up)"

  if pid="$(rc_pid "$port")"; then
    if redis_ping "$port"; then
      log "$name already running (pid $pid)"
      return 0
    fi
    log "$name (pid $pid) is running but not answering yet; waiting"
  else
    if port_open "$port"; then
      die "port $port is already in use by another process; cannot start $name (set THUMBUP_REDIS_CLUSTER_PORT)"
    fi
    if port_open $((port + 10000)); then
      die "cluster bus port $((port + 10000)) is already in use; cannot start $name (set THUMBUP_REDIS_CLUSTER_PORT)"
    fi
    rm -f "$pidfile"
    log "starting $name on 127.0.0.1:$port (cluster bus $((port + 10000)))"
    printf '\n==== stack.sh: starting %s at %s ====\n' "$name" "$(date '+%F %T')" >>"$logf"
    # nodes.conf is relative to --dir.  Replicas authenticate to their master
    # as `default` (masteruser/masterauth).
    if ! out="$(cd "$dir" && redis-server \
      --port "$port" \
      --bind 127.0.0.1 \
      --dir "$dir" \
      --cluster-enabled yes \
      --cluster-config-file nodes.conf \
      --cluster-node-timeout 2000 \
      --cluster-replica-validity-factor 0 \
      --cluster-allow-reads-when-down no \
      --appendonly yes \
      --appendfsync always \
      --save "" \
      --daemonize yes \
      --pidfile "$pidfile" \
      --logfile "$logf" \
      --aclfile "$dir/users.acl" \
      --masteruser default \
      --masterauth "$REDIS_ADMIN_PW" \
      </dev/null 2>&1 9>&-)"; then
      printf '%s\n' "$out" >&2
      show_log_tail "$logf"
      die "redis-server failed to start for $name"
    fi
  fi

  await_redis "$name" "$port" "$pidfile" "$logf"
}

stop_cluster_node() { # port
  stop_redis_server "$(rc_name "$1")" "$1" "$(rc_pidfile "$1")"
}

kill_cluster_node() { # port
  kill_redis_server "$(rc_name "$1")" "$1" "$(rc_pidfile "$1")"
}

# Deletes a stopped node's data and cluster state; keeps users.acl (and the
# log).  Its old node id is kept in wiped-node-id so that cluster-start can
# make the others forget it.
wipe_cluster_node() { # port
  local port="$1" name dir pid id
  name="$(rc_name "$port")"
  dir="$(rc_dir "$port")"
  [[ -d "$dir" ]] || die "$name does not exist ($dir)"
  if pid="$(rc_pid "$port")"; then
    die "$name is running (pid $pid); stop it first ($0 cluster-kill $port)"
  fi
  if [[ -r "$dir/nodes.conf" ]]; then
    id="$(awk '$3 ~ /(^|,)myself(,|$)/ { print $1 }' "$dir/nodes.conf")"
    [[ -n "$id" ]] && echo "$id" >"$dir/wiped-node-id"
  fi
  log "wiping $name (data and nodes.conf; users.acl kept)"
  rm -rf -- "$dir/appendonlydir" "$dir"/appendonly.aof* "$dir/dump.rdb" "$dir/nodes.conf" \
    "$dir"/temp-*.rdb "$dir"/temp-*.aof
}

# Lines "id flags has-slots" of the identities that running members still
# keep for the node on port (its address, or the id cluster-wipe recorded),
# other than its current id.
rc_stale_ids() { # port [current id]
  local port="$1" cur="${2:-}" wiped="" f p
  f="$(rc_dir "$port")/wiped-node-id"
  [[ -r "$f" ]] && wiped="$(cat "$f")"
  while read -r p; do
    rc_nodes "$p" | awk -v addr="127.0.0.1:$port@" -v cur="$cur" -v wiped="$wiped" \
      '$1 != cur && (index($2, addr) == 1 || $1 == wiped) { print $1, $3, (NF > 8 ? "slots" : "-") }'
  done < <(rc_live_members "$port")
}

# Makes every running member CLUSTER FORGET the old identity of the node on
# port, once all of them see it failed (`fail`, not just `fail?`) and its
# slots taken over.
forget_old_identity() { # port [current id]
  local port="$1" cur="${2:-}" name lines pending i id flags slots p out ids
  name="$(rc_name "$port")"
  for ((i = 0; ; i++)); do
    lines="$(rc_stale_ids "$port" "$cur")"
    pending=""
    while read -r id flags slots; do
      [[ -n "$id" ]] || continue
      if [[ ",$flags," == *,noaddr,* && "$slots" != - ]]; then
        die "the old identity $id of $name still serves slots but has lost its address: the wiped node was started before its slots failed over (its replica may have synced from the empty node); recreate the cluster"
      fi
      if [[ ",$flags," != *,fail,* || "$slots" != - ]]; then pending+=" $id($flags${slots/-/ with slots})"; fi
    done <<<"$lines"
    [[ -z "$pending" ]] && break
    ((i < TIMEOUT * 4)) || die "the old identity of $name is not failed over after ${TIMEOUT}s:$pending (is it still running?)"
    sleep 0.25
  done
  ids="$(awk '{ print $1 }' <<<"$lines" | sort -u)"
  [[ -n "$ids" ]] || return 0
  for id in $ids; do
    log "forgetting the old identity $id of $name on every running node"
    while read -r p; do
      out="$(rcli "$p" cluster forget "$id" 2>&1 || true)"
      [[ "$out" == OK || "$out" == *"Unknown node"* ]] || die "CLUSTER FORGET $id on $(rc_name "$p") failed: $out"
    done < <(rc_live_members "$port")
  done
}

# The master that serves slots and has the fewest healthy replicas, as
# "replica-count port id" (view of the node on port).
rc_lonely_master() { # port
  rc_nodes "$1" | awk "$RC_AWK_PORT"'
    { flags[$1] = $3; master[$1] = $4; addr[$1] = $2; slots[$1] = (NF > 8) }
    END {
      for (id in flags) if (flags[id] ~ /(^|,)slave(,|$)/ && flags[id] !~ /fail/) n[master[id]]++
      for (id in flags)
        if (flags[id] ~ /(^|,)master(,|$)/ && flags[id] !~ /fail/ && slots[id])
          print n[id] + 0, port_of(addr[id]), id
    }' | sort -n -k1,1 -k2,2 | awk 'NR == 1'
}

# Joins the fresh (wiped) node on port to the running cluster as the replica
# of a master without one.
rejoin_cluster_node() { # port
  local port="$1" name new peer p i ok out count mport master
  name="$(rc_name "$port")"
  peer="$(rc_first_member "$port")"
  [[ -n "$peer" ]] || die "no running cluster node to join $name to"
  new="$(rc_myid "$port")"
  [[ -n "$new" ]] || die "could not read the node id of $name"
  forget_old_identity "$port" "$new"
  log "$name (id $new) meets the cluster through $(rc_name "$peer")"
  out="$(rcli "$port" cluster meet 127.0.0.1 "$peer" 2>&1 || true)"
  [[ "$out" == OK ]] || die "CLUSTER MEET 127.0.0.1 $peer on $name failed: $out"
  # Known (handshake done) by every member, and knowing all of them.
  for ((i = 0; ; i++)); do
    ok=1
    while read -r p; do
      rc_nodes "$p" | awk -v id="$new" '$1 == id && $3 !~ /handshake|noaddr/ { f = 1 } END { exit !f }' || { ok=0; break; }
    done < <(rc_live_members "$port")
    if ((ok)) && (($(rc_cinfo "$port" cluster_known_nodes) >= $(rc_cinfo "$peer" cluster_known_nodes))); then
      break
    fi
    ((i < TIMEOUT * 4)) || die "$name did not join the cluster within ${TIMEOUT}s"
    sleep 0.25
  done
  read -r count mport master <<<"$(rc_lonely_master "$peer")"
  [[ -n "${master:-}" ]] || die "no master serving slots found to replicate (view of $(rc_name "$peer"))"
  if ((count > 0)); then
    log "every master has a replica; $name joins $(rc_name "$mport") which has $count"
  fi
  for ((i = 0; ; i++)); do
    rc_nodes "$port" | awk -v id="$master" '$1 == id { f = 1 } END { exit !f }' && break
    ((i < TIMEOUT * 4)) || die "$name does not know master $master ($(rc_name "$mport")) after ${TIMEOUT}s"
    sleep 0.25
  done
  log "$name becomes the replica of $(rc_name "$mport") ($master)"
  out="$(rcli "$port" cluster replicate "$master" 2>&1 || true)"
  [[ "$out" == OK ]] || die "CLUSTER REPLICATE $master on $name failed: $out"
  rm -f "$(rc_dir "$port")/wiped-node-id"
}

# Prints why the cluster is not ok yet (nothing and status 0 when it is):
# every running node has cluster_state:ok and all slots assigned and ok,
# every master serving slots in its view is running and not failing, and
# every running replica's link to its master is up.
cluster_not_ok() {
  local p live=() v bad
  while read -r p; do rc_live "$p" && live+=("$p"); done < <(cluster_all_ports)
  if ((${#live[@]} == 0)); then
    echo "no cluster node is running"
    return 2
  fi
  for p in "${live[@]}"; do
    v="$(rc_cinfo "$p" cluster_state)"
    [[ "$v" == ok ]] || { echo "$(rc_name "$p"): cluster_state:${v:-?}"; return 1; }
    v="$(rc_cinfo "$p" cluster_slots_ok)"
    [[ "$v" == "$CLUSTER_SLOTS" ]] || { echo "$(rc_name "$p"): cluster_slots_ok:${v:-?}"; return 1; }
    bad="$(rc_nodes "$p" | awk -v live=" ${live[*]} " "$RC_AWK_PORT"'
      $3 ~ /(^|,)master(,|$)/ && NF > 8 && ($3 ~ /fail/ || index(live, " " port_of($2) " ") == 0) { print port_of($2) "(" $3 ")" }')"
    [[ -z "$bad" ]] || { echo "$(rc_name "$p"): slots still served by $(paste -sd' ' - <<<"$bad")"; return 1; }
    if [[ "$(rc_rinfo "$p" role)" == slave ]]; then
      v="$(rc_rinfo "$p" master_link_status)"
      [[ "$v" == up ]] || { echo "$(rc_name "$p"): master_link_status:${v:-?}"; return 1; }
    fi
  done
}

cluster_wait_ok() {
  local i why rc
  for ((i = 0; ; i++)); do
    why="$(cluster_not_ok)" && break
    rc=$?
    ((rc != 2)) || die "the Redis Cluster is not ok: $why"
    ((i < TIMEOUT * 2)) || die "the Redis Cluster is not ok after ${TIMEOUT}s: $why"
    sleep 0.5
  done
  log "redis cluster ok (masters: $(cluster_masters | paste -sd' ' -))"
}

# Ports of the masters serving slots (not failing), in the view of the first
# running member.
cluster_masters() {
  local p
  p="$(rc_first_member)"
  [[ -n "$p" ]] || die "no Redis Cluster node is running"
  rc_nodes "$p" | awk "$RC_AWK_PORT"'$3 ~ /(^|,)master(,|$)/ && $3 !~ /fail/ && NF > 8 { print port_of($2) }' | sort -n
}

# The ports of datacenter I's nodes of the cluster: a the first half of
# BASE..BASE+5, b the second.
cluster_half() { # a|b
  local i off=0
  [[ "$1" == b ]] && off=$((CLUSTER_NODES / 2))
  for ((i = 0; i < CLUSTER_NODES / 2; i++)); do echo $((CLUSTER_BASE + off + i)); done
}

# Lines "port role master-port has-slots id link" of the configured nodes
# that answer, each as the node itself says (INFO replication, its own line
# of CLUSTER NODES): gossip about others lags behind a failover.
rc_roles() {
  local p role mport slots id link
  while read -r p; do
    rc_live "$p" || continue
    role="$(rc_rinfo "$p" role)"
    mport="$(rc_rinfo "$p" master_port)"
    link="$(rc_rinfo "$p" master_link_status)"
    read -r id slots < <(rc_nodes "$p" | awk '$3 ~ /(^|,)myself(,|$)/ { print $1, (NF > 8) }')
    [[ -n "${id:-}" ]] || continue
    if [[ "$role" == master ]]; then
      echo "$p master - ${slots:-0} $id -"
    else
      echo "$p replica ${mport:--} 0 $id ${link:-down}"
    fi
  done < <(cluster_ports)
}

# Makes datacenter I's half of the nodes the masters of every slot, each
# with a replica in the other half (a cluster spanning two datacenters):
# coordinated CLUSTER FAILOVER (nothing lost) on its nodes that are
# replicas, CLUSTER REPLICATE to pair the others.
cluster_split() { # a|b
  local want="$1" other wanted i roles ready port role mp slots id link n target out mport mid
  [[ "$want" == a || "$want" == b ]] || die "usage: $0 cluster-split a|b"
  other=a
  [[ "$want" == a ]] && other=b
  cluster_wait_ok
  wanted=" $(cluster_half "$want" | paste -sd' ' -) "
  declare -A asked=()
  for ((i = 0; ; i++)); do
    roles="$(rc_roles)"
    ready=1
    while read -r port role mp slots id link; do
      [[ "$wanted" == *" $port "* && "$role" == replica ]] || continue
      ready=0
      if [[ "$wanted" == *" $mp "* ]]; then
        # Its master is in the same half: follow a master of the other half
        # instead, then take over from it.
        target="$(awk -v w="$wanted" '$2 == "master" && $4 == 1 && index(w, " " $1 " ") == 0 { print $5; exit }' <<<"$roles")"
        if [[ -n "$target" ]]; then
          log "redis-cluster-$port: replicating a master of datacenter $other first"
          out="$(rcli "$port" cluster replicate "$target" 2>&1 || true)"
          [[ "$out" == OK ]] || log "redis-cluster-$port: CLUSTER REPLICATE: $out (retried)"
          sleep 1
        fi
      elif [[ "$link" == up ]] && ((${asked[$port]:-0} + 12 <= i)); then
        log "redis-cluster-$port takes over from redis-cluster-$mp (CLUSTER FAILOVER, coordinated)"
        out="$(rcli "$port" cluster failover 2>&1 || true)"
        [[ "$out" == OK ]] || log "redis-cluster-$port: CLUSTER FAILOVER: $out (retried)"
        asked[$port]=$i
      fi
    done <<<"$roles"
    if ((ready)); then
      # Every node of the wanted half is a master: one replica each from
      # the other half.
      while read -r port role mp slots id link; do
        [[ "$wanted" != *" $port "* ]] || continue
        if [[ "$role" == master && "$slots" == 1 ]]; then
          # Still handing its slots over.
          ready=0
          continue
        fi
        n="$(awk -v m="$mp" '$2 == "replica" && $3 == m' <<<"$roles" | wc -l)"
        if [[ "$role" == master ]] || ((n > 1)); then
          target=""
          while read -r mport mid; do
            if [[ "$(awk -v m="$mport" '$2 == "replica" && $3 == m' <<<"$roles" | wc -l)" == 0 ]]; then
              target="$mid"
              break
            fi
          done < <(awk -v w="$wanted" '$2 == "master" && index(w, " " $1 " ") > 0 { print $1, $5 }' <<<"$roles")
          if [[ -n "$target" ]]; then
            ready=0
            log "redis-cluster-$port: replicating a master of datacenter $want without a replica"
            out="$(rcli "$port" cluster replicate "$target" 2>&1 || true)"
            [[ "$out" == OK ]] || log "redis-cluster-$port: CLUSTER REPLICATE: $out (retried)"
            # One at a time: the next decision reads the nodes again.
            sleep 1
            break
          fi
        fi
      done <<<"$roles"
    fi
    # Done: the wanted half serves every slot, and each of its masters has
    # one replica of the other half, linked.
    if ((ready)) &&
      [[ "$(awk '$2 == "master" && $4 == 1 { print $1 }' <<<"$roles" | paste -sd' ' -)" == "$(cluster_half "$want" | paste -sd' ' -)" &&
      "$(awk -v w="$wanted" 'index(w, " " $1 " ") == 0 && $2 == "replica" && $6 == "up" { print $3 }' <<<"$roles" | sort -nu | paste -sd' ' -)" == "$(cluster_half "$want" | paste -sd' ' -)" ]]; then
      break
    fi
    ((i < TIMEOUT * 4)) || die "datacenter $want's nodes are not the masters after ${TIMEOUT}s: $(tr '\n' ';' <<<"$roles")"
    sleep 0.25
  done
  cluster_wait_ok
  log "redis cluster split: masters $(cluster_half "$want" | paste -sd' ' -) (datacenter $want), their replicas $(cluster_half "$other" | paste -sd' ' -) (datacenter $other)"
}

# `redis-cli --cluster <cmd>` against the first running member; prints its
# output without colours.
rc_cluster_cli() { # cmd, args...
  local p
  p="$(rc_first_member)"
  [[ -n "$p" ]] || die "no Redis Cluster node is running"
  REDISCLI_AUTH="$REDIS_ADMIN_PW" timeout "$TIMEOUT" redis-cli --user default --no-auth-warning \
    --cluster "$1" "127.0.0.1:$p" "${@:2}" </dev/null 2>&1 9>&- | sed -e 's/\x1b\[[0-9;]*m//g'
  return "${PIPESTATUS[0]}"
}

# Waits until `redis-cli --cluster check` finds every node agreeing on the
# slots and no slot open (importing or migrating): a resharding or a
# failover leaves the gossip behind for a moment.
cluster_wait_agreed() {
  local i out
  for ((i = 0; ; i++)); do
    out="$(rc_cluster_cli check)" && ! grep -q '^\[WARNING\]' <<<"$out" && return 0
    ((i < TIMEOUT * 2)) || {
      printf '%s\n' "$out" | grep -E '^\[(ERR|WARNING)\]' >&2
      die "the Redis Cluster's nodes do not agree on the slots after ${TIMEOUT}s"
    }
    sleep 0.5
  done
}

# Spreads the slots evenly over the masters; retried while the nodes do not
# agree yet (redis-cli refuses to move slots then).
cluster_rebalance() {
  local i out
  cluster_wait_ok
  for ((i = 0; ; i++)); do
    cluster_wait_agreed
    out="$(rc_cluster_cli rebalance --cluster-pipeline 100)" && break
    ((i < 5)) || {
      printf '%s\n' "$out" | tail -n 20 >&2
      die "redis-cli --cluster rebalance failed 6 times"
    }
    log "rebalance failed ($(grep -m1 -E '^\[ERR\]|ERR' <<<"$out" || echo "exit status only")); again"
    sleep 1
  done
  printf '%s\n' "$out" | grep -E '^Moving|^\*\*\* No rebalancing' | tail -n 3 | sed 's/^/stack.sh: /' >&2 || true
  cluster_wait_agreed
  log "redis cluster rebalanced (masters: $(cluster_masters | paste -sd' ' -))"
}

create_cluster() {
  local p addrs=() out
  while read -r p; do addrs+=("127.0.0.1:$p"); done < <(cluster_ports)
  log "creating the Redis Cluster on ${addrs[*]} (3 masters, 1 replica each)"
  if ! out="$(REDISCLI_AUTH="$REDIS_ADMIN_PW" timeout "$TIMEOUT" redis-cli --user default --no-auth-warning \
    --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes </dev/null 2>&1 9>&-)"; then
    printf '%s\n' "$out" | tail -n 40 >&2
    die "redis-cli --cluster create failed"
  fi
  # (redis-cli colours its messages even into a pipe)
  printf '%s\n' "$out" | sed -e 's/\x1b\[[0-9;]*m//g' | grep -F '[OK]' | sed 's/^/stack.sh: /' >&2 || true
}

# A stopped node without nodes.conf (wiped) while a cluster runs: once its
# old identity is failed over, the members forget it, before anything answers
# on its address.  (A stranger answering there makes them drop the old
# identity's address: a master's slots would then never fail over and its
# replica would sync from the empty node.)
forget_before_start() { # port
  if ! rc_pid "$1" >/dev/null && [[ ! -s "$(rc_dir "$1")/nodes.conf" && -n "$(rc_first_member "$1")" ]]; then
    forget_old_identity "$1"
  fi
}

# Starts every node (those with a nodes.conf first); creates the cluster when
# all of them are fresh, else joins the fresh (wiped) ones to it; waits until
# it is ok.
cluster_up() {
  local p fresh=() members=()
  while read -r p; do
    init_cluster_node "$p"
    if [[ -s "$(rc_dir "$p")/nodes.conf" ]]; then start_cluster_node "$p"; else fresh+=("$p"); fi
  done < <(cluster_ports)
  for p in "${fresh[@]}"; do
    forget_before_start "$p"
    start_cluster_node "$p"
  done
  fresh=()
  while read -r p; do
    if rc_in_cluster "$p"; then members+=("$p"); else fresh+=("$p"); fi
  done < <(cluster_ports)
  if ((${#members[@]} == 0)); then
    create_cluster
  else
    for p in "${fresh[@]}"; do
      log "$(rc_name "$p") is not part of the cluster; joining it"
      rejoin_cluster_node "$p"
    done
  fi
  cluster_wait_ok
}

# Replicas first, so that stopping the masters promotes none of them.
cluster_down() {
  local p replicas=() others=()
  while read -r p; do
    [[ -d "$(rc_dir "$p")" ]] || continue
    if rc_live "$p" && [[ "$(rc_rinfo "$p" role)" == slave ]]; then replicas+=("$p"); else others+=("$p"); fi
  done < <(cluster_all_ports)
  for p in "${replicas[@]}" "${others[@]}"; do
    stop_cluster_node "$p"
  done
}

# Starts one node; a fresh (wiped) one rejoins a running cluster.  Waits
# until the cluster is ok when other members run.
cluster_start() { # port
  local port="$1" name
  name="$(rc_name "$port")"
  init_cluster_node "$port"
  forget_before_start "$port"
  start_cluster_node "$port"
  [[ -n "$(rc_first_member "$port")" ]] || return 0
  if ! rc_in_cluster "$port"; then
    log "$name is not part of the cluster; joining it"
    rejoin_cluster_node "$port"
  fi
  cluster_wait_ok
}

# A port for cluster-add / cluster-remove: not one of the configured nodes.
extra_cluster_port() { # action port
  local port="${2:-}"
  [[ "$port" =~ ^[1-9][0-9]*$ ]] || die "usage: $0 cluster-$1 PORT"
  if ((port >= CLUSTER_BASE && port < CLUSTER_BASE + CLUSTER_NODES)); then
    die "$port is one of the configured cluster nodes ($(cluster_ports | paste -sd' ' -)): use cluster-start/cluster-kill"
  fi
  echo "$port"
}

cluster_add() { # port
  local port
  port="$(extra_cluster_port add "${1:-}")"
  install_redis
  lock_stack
  [[ -n "$(rc_first_member "$port")" ]] || die "no running cluster node to add $(rc_name "$port") to (run: $0 cluster-up)"
  cluster_start "$port"
}

cluster_remove() { # port
  local port name id p out
  port="$(extra_cluster_port remove "${1:-}")"
  name="$(rc_name "$port")"
  lock_stack
  [[ -d "$(rc_dir "$port")" ]] || { log "$name does not exist"; return 0; }
  id="$(rc_myid "$port" 2>/dev/null || true)"
  [[ -n "$id" ]] || id="$(awk '$3 ~ /(^|,)myself(,|$)/ { print $1 }' "$(rc_dir "$port")/nodes.conf" 2>/dev/null || true)"
  if rc_pid "$port" >/dev/null; then stop_cluster_node "$port"; fi
  if [[ -n "$id" ]]; then
    log "forgetting $name ($id) on every running node"
    while read -r p; do
      out="$(rcli "$p" cluster forget "$id" 2>&1 || true)"
      [[ "$out" == OK || "$out" == *"Unknown node"* ]] || die "CLUSTER FORGET $id on $(rc_name "$p") failed: $out"
    done < <(rc_live_members "$port")
  fi
  rm -rf -- "$(rc_dir "$port")"
  log "$name removed"
  cluster_wait_ok
}

cluster_status_line() { # port
  local port="$1" name pid me flags state desc
  name="$(rc_name "$port")"
  if ! pid="$(rc_pid "$port")"; then
    echo "$name: stopped (port $port)"
    return 0
  fi
  if ! redis_ping "$port"; then
    echo "$name: running, not answering (port $port, pid $pid)"
    return 0
  fi
  me="$(rc_nodes "$port" | awk '$3 ~ /(^|,)myself(,|$)/')"
  flags="$(awk '{ print $3 }' <<<"$me")"
  state="$(rc_cinfo "$port" cluster_state)"
  if [[ ",$flags," == *,slave,* ]]; then
    desc="replica of $(rc_rinfo "$port" master_port), link $(rc_rinfo "$port" master_link_status)"
  elif ! rc_in_cluster "$port"; then
    desc="master, not in a cluster"
  else
    desc="master, $(awk '{ n = 0; for (i = 9; i <= NF; i++) { if ($i ~ /^\[/) continue; split($i, r, "-"); k = split($i, r, "-"); n += (k == 2 ? r[2] - r[1] + 1 : 1) } print n }' <<<"$me") slots"
  fi
  echo "$name: running (port $port, pid $pid, $desc, cluster_state ${state:-?})"
}

cluster_node_action() { # action port
  local action="$1" port="${2:-}"
  [[ "$port" =~ ^[1-9][0-9]*$ ]] || die "usage: $0 cluster-$action PORT"
  if [[ ! -d "$(rc_dir "$port")" ]] && ((port < CLUSTER_BASE || port >= CLUSTER_BASE + CLUSTER_NODES)); then
    die "$port is not a Redis Cluster port ($(cluster_ports | paste -sd' ' -))"
  fi
  [[ "$action" == start ]] && install_redis
  lock_stack
  case "$action" in
    kill) kill_cluster_node "$port" ;;
    wipe) wipe_cluster_node "$port" ;;
    start) cluster_start "$port" ;;
  esac
}

# ---------------------------------------------------------------- commands

# Instances that exist on disk or are configured (so `down` also stops "b").
known_instances() {
  local d seen=" " inst
  for inst in "${INSTANCES[@]}"; do
    seen+="$inst "
    echo "$inst"
  done
  for d in "$STACK"/mariadb-* "$STACK"/redis-*; do
    [[ -d "$d" ]] || continue
    inst="${d##*-}"
    [[ "$seen" == *" $inst "* ]] && continue
    case "$inst" in a | b) ;; *) continue ;; esac
    seen+="$inst "
    echo "$inst"
  done
}

cmd_up() {
  cmd_install
  lock_stack
  ensure_certs
  local inst
  for inst in "${INSTANCES[@]}"; do
    init_mariadb "$inst"
    start_mariadb "$inst" "$(db_port_of "$inst")"
    ensure_mariadb_tls "$inst" "$(db_port_of "$inst")"
    ensure_db_admin "$inst" "$(db_port_of "$inst")"
    ensure_repl_user "$inst"
  done
  # The replica (b, unless a reseed swapped the roles) must be replicating.
  local primary=a replica=b
  if [[ "$(mdb_role a)" == replica ]]; then primary=b replica=a; fi
  if ! replica_settles "$replica"; then
    log "mariadb-$replica is not replicating; rebuilding it from mariadb-$primary (its data is discarded)"
    reseed "$primary" "$replica"
  fi
  for inst in "${REDIS_INSTANCES[@]}"; do
    init_redis "$inst"
    start_redis "$inst" "$(redis_port_of "$inst")"
    ensure_redis_tls "$inst" "$(redis_port_of "$inst")"
  done
  cluster_up
}

cmd_down() {
  [[ -d "$STACK" ]] || { log "nothing to stop ($STACK does not exist)"; return 0; }
  lock_stack
  local inst
  while read -r inst; do
    stop_redis "$inst" "$(redis_port_of "$inst")"
    stop_mariadb "$inst" "$(db_port_of "$inst")"
  done < <(known_instances)
  cluster_down
}

server_action() { # action server [instance]
  local action="$1" server="${2:-}" inst="${3:-a}" p
  if [[ "$server" == redis && "$inst" == cluster ]]; then
    # Every node of the Redis Cluster at once (the tests' "Redis down").
    lock_stack
    case "$action" in
      start) cluster_up ;;
      stop) cluster_down ;;
      kill) while read -r p; do kill_cluster_node "$p"; done < <(cluster_all_ports) ;;
    esac
    return 0
  fi
  case "$inst" in a | b) ;; *) die "unknown instance '$inst' (expected a, b, or cluster for redis)" ;; esac
  case "$server" in
    redis | mariadb) ;;
    *) die "usage: $0 $action redis|mariadb [instance]" ;;
  esac
  lock_stack
  local port
  if [[ "$server" == redis ]]; then port="$(redis_port_of "$inst")"; else port="$(db_port_of "$inst")"; fi
  "${action}_${server}" "$inst" "$port"
}

cmd_status() {
  local inst pid port
  while read -r inst; do
    port="$(db_port_of "$inst")"
    if pid="$(mdb_pid "$inst")"; then
      if mdb_ping "$inst"; then
        local repl=""
        if [[ -n "$(replica_field "$inst" Slave_SQL_Running)" ]]; then
          repl=", replicating: IO $(replica_field "$inst" Slave_IO_Running), SQL $(replica_field "$inst" Slave_SQL_Running), $(replica_field "$inst" Seconds_Behind_Master)s behind"
        fi
        local state=writable
        [[ "$(mdb_root "$inst" -N -B -e 'SELECT @@read_only')" == 1 ]] && state=read-only
        echo "mariadb-$inst: running (port $port, pid $pid, $state$repl)"
      else
        echo "mariadb-$inst: running, not answering (port $port, pid $pid)"
      fi
    else
      echo "mariadb-$inst: stopped (port $port)"
    fi
    port="$(redis_port_of "$inst")"
    if pid="$(redis_pid "$inst")"; then
      if redis_ping "$port"; then
        echo "redis-$inst: running (port $port, pid $pid)"
      else
        echo "redis-$inst: running, not answering (port $port, pid $pid)"
      fi
    else
      echo "redis-$inst: stopped (port $port)"
    fi
  done < <(known_instances)
  local p
  for p in "$STACK"/redis-cluster-*; do
    [[ -d "$p" ]] && cluster_status_line "${p##*-}"
  done
  return 0
}

cmd_env() {
  local db_port redis_port
  db_port="$(db_port_of a)"
  redis_port="$(redis_port_of a)"
  printf 'export %s=%q\n' \
    THUMBUP_ADMIN_DB_URL "mysql://$DB_ADMIN_USER:$(urlencode "$DB_ADMIN_PW")@127.0.0.1:$db_port" \
    THUMBUP_ADMIN_REDIS_URL "redis://default:$(urlencode "$REDIS_ADMIN_PW")@127.0.0.1:$redis_port" \
    THUMBUP_ADMIN_REDIS_URL_B "redis://default:$(urlencode "$REDIS_ADMIN_PW")@127.0.0.1:$(redis_port_of b)" \
    THUMBUP_ADMIN_DB_URL_B "mysql://$DB_ADMIN_USER:$(urlencode "$DB_ADMIN_PW")@127.0.0.1:$(db_port_of b)" \
    THUMBUP_DB_PORT "$db_port" \
    THUMBUP_DB_PORT_B "$(db_port_of b)" \
    THUMBUP_REDIS_PORT "$redis_port" \
    THUMBUP_REDIS_PORT_B "$(redis_port_of b)" \
    THUMBUP_REDIS_TLS_PORT "$(redis_tls_port_of a)" \
    THUMBUP_REDIS_TLS_PORT_B "$(redis_tls_port_of b)" \
    THUMBUP_STACK_TLS_CA "$(tls_dir)/ca.crt" \
    THUMBUP_STACK_TLS_CERT "$(tls_dir)/server.crt" \
    THUMBUP_STACK_TLS_KEY "$(tls_dir)/server.key"
  # The cluster: seed URLs without credentials, the admin URL of the first node.
  local p nodes=""
  while read -r p; do nodes+="${nodes:+,}redis://127.0.0.1:$p"; done < <(cluster_ports)
  printf 'export %s=%q\n' \
    THUMBUP_REDIS_CLUSTER_NODES "$nodes" \
    THUMBUP_ADMIN_REDIS_CLUSTER_URL "redis://default:$(urlencode "$REDIS_ADMIN_PW")@127.0.0.1:$CLUSTER_BASE?cluster=true" \
    THUMBUP_REDIS_CLUSTER_PORT "$CLUSTER_BASE"
}

cmd_cluster_up() {
  install_redis
  lock_stack
  cluster_up
}

cmd_cluster_down() {
  [[ -d "$STACK" ]] || { log "nothing to stop ($STACK does not exist)"; return 0; }
  lock_stack
  cluster_down
}

cmd_cluster_status() {
  local p
  while read -r p; do cluster_status_line "$p"; done < <(cluster_all_ports)
}

cmd_reseed() { # primary replica
  local p="${1:-}" r="${2:-}"
  [[ "$p" =~ ^[ab]$ && "$r" =~ ^[ab]$ && "$p" != "$r" ]] || die "usage: $0 reseed PRIMARY REPLICA (a b, or b a)"
  cmd_install
  lock_stack
  reseed "$p" "$r"
}

redis_follow() { # replica master|none
  local r="$1" m="$2" rport mport out i
  rport="$(redis_port_of "$r")"
  start_redis "$r" "$rport"
  if [[ "$m" == none ]]; then
    out="$(rcli "$rport" replicaof no one 2>&1 || true)"
    [[ "$out" == OK ]] || die "REPLICAOF NO ONE on redis-$r failed: $out"
    log "redis-$r is a master"
    return 0
  fi
  mport="$(redis_port_of "$m")"
  start_redis "$m" "$mport"
  out="$(rcli "$rport" config set masteruser default masterauth "$REDIS_ADMIN_PW" 2>&1 || true)"
  [[ "$out" == OK ]] || die "setting the replication credentials of redis-$r failed: $out"
  out="$(rcli "$rport" replicaof 127.0.0.1 "$mport" 2>&1 || true)"
  [[ "$out" == OK* ]] || die "REPLICAOF on redis-$r failed: $out"
  for ((i = 0; ; i++)); do
    [[ "$(rc_rinfo "$rport" master_link_status)" == up ]] && break
    ((i < TIMEOUT * 4)) || die "redis-$r did not sync from redis-$m within ${TIMEOUT}s"
    sleep 0.25
  done
  log "redis-$r replicates redis-$m (link up)"
}

cmd_redis_follow() { # replica master|none
  local r="${1:-}" m="${2:-}"
  [[ "$r" =~ ^[ab]$ && ( "$m" == none || ( "$m" =~ ^[ab]$ && "$m" != "$r" ) ) ]] \
    || die "usage: $0 redis-follow REPLICA MASTER|none (a b, b a, a none, b none)"
  lock_stack
  redis_follow "$r" "$m"
}

cmd_wipe() { # redis|mariadb instance
  local server="${1:-}" inst="${2:-}" dir
  [[ "$server" =~ ^(redis|mariadb)$ && "$inst" =~ ^[ab]$ ]] || die "usage: $0 wipe redis|mariadb a|b"
  lock_stack
  if [[ "$server" == redis ]]; then
    ! redis_pid "$inst" >/dev/null || die "redis-$inst is running: stop or kill it first"
    dir="$(redis_dir "$inst")"
    rm -rf -- "$dir/appendonlydir" "$dir"/appendonly.aof* "$dir/dump.rdb"
    log "redis-$inst data deleted (users.acl kept)"
  else
    ! mdb_pid "$inst" >/dev/null || die "mariadb-$inst is running: stop or kill it first"
    dir="$(mdb_dir "$inst")"
    rm -rf -- "$dir/data"
    echo replica >"$(mdb_rolefile "$inst")"
    init_mariadb "$inst"
    log "mariadb-$inst data deleted; initialised empty, marked a replica"
  fi
}

cmd_rejoin() { # old new [cluster]
  local old="${1:-}" new="${2:-}" tier="${3:-}" p
  [[ "$old" =~ ^[ab]$ && "$new" =~ ^[ab]$ && "$old" != "$new" && "$tier" =~ ^(cluster)?$ ]] ||
    die "usage: $0 rejoin OLD NEW [cluster] (a b, or b a)"
  cmd_install
  lock_stack
  # It starts read-only (a replica): a failover controller watching it
  # finds nothing to fence, and no client write lands on it meanwhile.
  mkdir -p "$(mdb_dir "$old")"
  echo replica >"$(mdb_rolefile "$old")"
  reseed "$new" "$old"
  if [[ "$tier" == cluster ]]; then
    # OLD's half of the Redis Cluster: a node that kept its data learns
    # that its slots moved and replicates the node that took them; a wiped
    # one joins as the replica of a master without one.
    while read -r p; do
      cluster_start "$p"
    done < <(cluster_half "$old")
  else
    redis_follow "$old" "$new"
  fi
  log "datacenter $old is the standby of datacenter $new on both tiers"
}

cmd_reset() {
  case "$STACK" in
    "" | / | "$ROOT" | "$HOME") die "refusing to delete suspicious stack dir '$STACK'" ;;
  esac
  cmd_down
  if [[ -d "$STACK" ]]; then
    log "deleting $STACK"
    rm -rf -- "$STACK"
  fi
}

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//' >&2
}

main() {
  local cmd="${1:-}"
  [[ $# -gt 0 ]] && shift
  case "$cmd" in -h | --help | help) ;; *) check_cluster_base ;; esac
  case "$cmd" in
    install) cmd_install ;;
    up) cmd_up ;;
    down) cmd_down ;;
    start | stop | kill) server_action "$cmd" "$@" ;;
    reseed) cmd_reseed "$@" ;;
    redis-follow) cmd_redis_follow "$@" ;;
    wipe) cmd_wipe "$@" ;;
    rejoin) cmd_rejoin "$@" ;;
    status) cmd_status ;;
    env) cmd_env ;;
    reset) cmd_reset ;;
    cluster-up) cmd_cluster_up ;;
    cluster-down) cmd_cluster_down ;;
    cluster-status) cmd_cluster_status ;;
    cluster-kill | cluster-wipe | cluster-start) cluster_node_action "${cmd#cluster-}" "$@" ;;
    cluster-add) cluster_add "$@" ;;
    cluster-remove) cluster_remove "$@" ;;
    cluster-wait-ok) cluster_wait_ok ;;
    cluster-masters) cluster_masters ;;
    cluster-rebalance) cluster_rebalance ;;
    cluster-split) cluster_split "$@" ;;
    -h | --help | help) usage ;;
    *) usage; exit 2 ;;
  esac
}

main "$@"
