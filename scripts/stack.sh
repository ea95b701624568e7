#!/usr/bin/env bash
# scripts/stack.sh - private MariaDB + Redis instances for thumbup development and tests.
#
# Usage: scripts/stack.sh COMMAND [ARGS]
#   install                    install server/client packages (and protoc) if missing
#   up                         install, initialise (first time) and start every instance; idempotent
#   down                       stop every instance gracefully (data is kept); idempotent
#   start  redis|mariadb [I]   start one server of instance I (default a) and wait until ready
#   stop   redis|mariadb [I]   gracefully stop one server, wait until its port is closed
#   kill   redis|mariadb [I]   SIGKILL one server (crash simulation), wait until it is gone
#   reseed PRIMARY REPLICA     make MariaDB PRIMARY (a|b) the writable primary and rebuild
#                              REPLICA as its read-only GTID replica from a fresh dump
#                              (starting either if stopped); DISCARDS the replica's data,
#                              binlog and sessions (tests use it between scenarios)
#   status                     one line per server: running/stopped, port, writable or read-only, replication
#   env                        print `export` lines for the admin URLs, ports (b: *_B) and TLS files
#   reset                      down, then delete the whole stack directory
#
# Environment:
#   THUMBUP_STACK_DIR            data directory (default: <repo>/.stack)
#   THUMBUP_DB_PORT              MariaDB port of instance a (default 23306; b: THUMBUP_DB_PORT_B, 23307)
#   THUMBUP_REDIS_PORT           Redis port of instance a (default 26379; b: THUMBUP_REDIS_PORT_B, 26380)
#   THUMBUP_REDIS_TLS_PORT       Redis TLS port of instance a (default: its port + 10; b: THUMBUP_REDIS_TLS_PORT_B)
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

init_redis() { # instance
  local dir acl
  dir="$(redis_dir "$1")"
  acl="$dir/users.acl"
  [[ "$STACK" != *[[:space:]]* ]] || die "THUMBUP_STACK_DIR must not contain whitespace"
  mkdir -p "$dir"
  # Tenant users are added at runtime (ACL SETUSER + ACL SAVE): never overwrite.
  if [[ ! -e "$acl" ]]; then
    [[ "$REDIS_ADMIN_PW" != *[[:space:]]* ]] || die "THUMBUP_REDIS_ADMIN_PASSWORD must not contain whitespace"
    (umask 077 && printf 'user default on >%s ~* &* +@all\n' "$REDIS_ADMIN_PW" >"$acl.tmp")
    mv "$acl.tmp" "$acl"
  fi
}

start_redis() { # instance port
  local inst="$1" port="$2" dir pidfile logf pid out i
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

  for ((i = 0; i < TIMEOUT * 4; i++)); do
    if redis_ping "$port"; then
      pid="$(redis_pid "$inst" || echo '?')"
      log "redis-$inst ready (pid $pid, port $port)"
      return 0
    fi
    # the daemonized server writes its pid file right after forking
    if ((i >= 8)) && ! redis_pid "$inst" >/dev/null; then
      show_log_tail "$logf"
      die "redis-$inst exited during startup (see $logf)"
    fi
    sleep 0.25
  done
  show_log_tail "$logf"
  die "redis-$inst did not answer PONG within ${TIMEOUT}s (see $logf)"
}

stop_redis() { # instance port
  local inst="$1" port="$2" pid
  if ! pid="$(redis_pid "$inst")"; then
    log "redis-$inst is not running"
    return 0
  fi
  log "stopping redis-$inst (pid $pid)"
  # With AOF (appendfsync always) SHUTDOWN flushes the AOF and keeps all data.
  rcli "$port" shutdown >/dev/null 2>&1 || true
  if ! wait_pid_gone "$pid" "$TIMEOUT"; then
    log "redis-$inst did not stop after SHUTDOWN; sending SIGTERM"
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_pid_gone "$pid" "$TIMEOUT"; then
      log "redis-$inst ignored SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      wait_pid_gone "$pid" 10 || die "could not stop redis-$inst (pid $pid)"
    fi
  fi
  wait_port_closed "$port" 10 || die "port $port still accepts connections after stopping redis-$inst"
  log "redis-$inst stopped"
}

kill_redis() { # instance port
  local inst="$1" port="$2" pid
  if ! pid="$(redis_pid "$inst")"; then
    log "redis-$inst is not running"
    return 0
  fi
  log "killing redis-$inst (SIGKILL pid $pid)"
  kill -KILL "$pid" 2>/dev/null || true
  wait_pid_gone "$pid" 30 || die "redis-$inst (pid $pid) still alive after SIGKILL"
  wait_port_closed "$port" 10 || die "port $port still accepts connections after killing redis-$inst"
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
}

cmd_down() {
  [[ -d "$STACK" ]] || { log "nothing to stop ($STACK does not exist)"; return 0; }
  lock_stack
  local inst
  while read -r inst; do
    stop_redis "$inst" "$(redis_port_of "$inst")"
    stop_mariadb "$inst" "$(db_port_of "$inst")"
  done < <(known_instances)
}

server_action() { # action server [instance]
  local action="$1" server="${2:-}" inst="${3:-a}"
  case "$inst" in a | b) ;; *) die "unknown instance '$inst' (expected a or b)" ;; esac
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
}

cmd_reseed() { # primary replica
  local p="${1:-}" r="${2:-}"
  [[ "$p" =~ ^[ab]$ && "$r" =~ ^[ab]$ && "$p" != "$r" ]] || die "usage: $0 reseed PRIMARY REPLICA (a b, or b a)"
  cmd_install
  lock_stack
  reseed "$p" "$r"
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
  case "$cmd" in
    install) cmd_install ;;
    up) cmd_up ;;
    down) cmd_down ;;
    start | stop | kill) server_action "$cmd" "$@" ;;
    reseed) cmd_reseed "$@" ;;
    status) cmd_status ;;
    env) cmd_env ;;
    reset) cmd_reset ;;
    -h | --help | help) usage ;;
    *) usage; exit 2 ;;
  esac
}

main "$@"
