#!/usr/bin/env bash
# tests/e2e/kind.sh - end-to-end test of thumbup on a throwaway kind cluster.
#
# Usage: tests/e2e/kind.sh
#
# Needs docker (with a running engine), kind, helm and kubectl on PATH, and
# internet access for the mariadb:10.11, redis:7 and Rust base images.
#
# What it does, each step announced with "==>":
#    1. checks the tools;
#    2. creates the kind cluster "thumbup-e2e" (kind-config.yaml: a control
#       plane and one worker per datacenter zone, dc-a and dc-b);
#    3. builds the image thumbup/thumbup:e2e and loads it into the nodes;
#    4. starts the data layer in namespace thumbup-data (tests/e2e/manifests):
#       MariaDB and Redis per datacenter, dc-b's MariaDB a GTID replica of dc-a's;
#    5. applies the CRD (kubectl apply --server-side -f crds/, as the README
#       documents), installs the chart charts/thumbup into namespace thumbup
#       (Helm skips the chart's crds/, already there) and waits for the
#       operator and service Deployments;
#    6. applies examples/liketenant.yaml and waits for Ready;
#    7. checks what the operator made: job Deployment, tenant Secret, schema,
#       DB user and Redis ACL users;
#    8. likes an item through thumbup-service with thumbupctl (run in a pod of
#       the same image) and reads the count back: 1, in the cluster and from
#       this machine through a kubectl port-forward (thumbupctl copied out of
#       the image; port E2E_PORT_FORWARD_PORT, default 35051);
#    9. checks isolation: the tenant's Redis user gets NOPERM outside its
#       prefix, its DB user is refused another schema;
#   10. deletes the LikeTenant (deletionPolicy Delete) and checks that the job,
#       the Secret, the registry entry, the schema, the DB user, the keys and
#       the ACL users are gone, and that the service refuses the old token;
#   11. applies the LikeTenant again, likes, then runs a planned switchover
#       (helm upgrade --set activeDatacenter=dc-b): the route ConfigMap names
#       dc-b at epoch 2, dc-a is fenced, the LikeTenant's status and a
#       Switchover Event say so, and a like after it lands on dc-b;
#   12. the whole-datacenter steps: the tenant deleted, the release
#       uninstalled and the data layer started again from nothing, dc-b's
#       Redis made a replica of dc-a's; the chart installed with
#       topology.perDatacenter, failover.redisTier and replicaAcks 1 (a service
#       Deployment per zone, the operator on dc-b, CoreDNS on the control
#       plane); the tenant's job Deployments per zone; 20 likes through dc-b's
#       service (thumbup-service-dc-b); then dc-a lost as a whole (its kind
#       node container killed, its MariaDB and Redis pods deleted): the route
#       names dc-b at epoch 2 within E2E_FLIP_BOUND seconds, likes through
#       dc-b's service succeed again, and every like acknowledged before the
#       loss reads LIKE on dc-b, in the counts and in mariadb-dc-b's records;
#   13. deletes the cluster (unless KEEP_CLUSTER=1).
# On failure it dumps the state of both namespaces (get, describe, events,
# logs) before the cluster goes.
#
# Environment:
#   KEEP_CLUSTER=1        keep the cluster at the end (pass or fail) to poke at it;
#                         a cluster of the same name left by an earlier run is
#                         always deleted first
#   E2E_SKIP_BUILD=1      reuse an existing local image thumbup/thumbup:e2e
#   E2E_TIMEOUT=<s>       upper bound of each wait for a rollout/condition (default 300)
#   E2E_TENANT_WAIT=<s>   how long the service may take to pick up a new tenant's
#                         registry files (kubelet propagation; default 150)
#   E2E_FLIP_BOUND=<s>    how soon after dc-a's loss the route must name dc-b
#                         (default 60; the local stack measures about 6 s)
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
ROOT="$(cd -- "$SCRIPT_DIR/../.." && pwd -P)"
MANIFESTS="$SCRIPT_DIR/manifests"

CLUSTER=thumbup-e2e
CONTEXT="kind-$CLUSTER"
IMAGE_REPO=thumbup/thumbup
IMAGE_TAG=e2e
IMAGE="$IMAGE_REPO:$IMAGE_TAG"
NS=thumbup
DATA_NS=thumbup-data
RELEASE=thumbup
CHART="$ROOT/charts/thumbup"
# The chart's fullname for release "thumbup" of chart "thumbup" (release name
# already contains the chart name): objects are "<fullname>-operator" etc.
FULLNAME=thumbup
OPERATOR_DEPLOY="$FULLNAME-operator"
SERVICE_DEPLOY="$FULLNAME-service"
SERVICE_NAME="$FULLNAME-service"
SERVICE_ADDR="http://$SERVICE_NAME.$NS.svc.cluster.local:50051"
TENANT=demo
TENANT_SCHEMA=thumbup_demo     # thumbup_<tenant, '-' as '_'>
TENANT_DB_USER=thumbup_demo
TENANT_REDIS_USER=thumbup-demo # thumbup-<tenant>
TENANT_PREFIX="thumbup:demo:"
JOB_DEPLOY="thumbup-job-$TENANT"
ROUTE_CM=thumbup-route          # the failover controller's route (key route.yaml)
TENANT_SECRET="thumbup-tenant-$TENANT"
REGISTRY_SECRET=thumbup-tenant-credentials
CLIENT_POD=thumbup-e2e-client

KEEP_CLUSTER="${KEEP_CLUSTER:-0}"
WAIT="${E2E_TIMEOUT:-300}"
TENANT_WAIT="${E2E_TENANT_WAIT:-150}"

CLUSTER_CREATED=0
WORK=""
STEP_NO=0

# ---------------------------------------------------------------- output

step() {
  STEP_NO=$((STEP_NO + 1))
  printf '\n==> [%s] %d. %s\n' "$(date +%H:%M:%S)" "$STEP_NO" "$*"
}
info() { printf '    %s\n' "$*"; }
fail() {
  printf '\nkind.sh: FAILED: %s\n' "$*" >&2
  exit 1
}

# ---------------------------------------------------------------- helpers

# Runs a command with a time limit when timeout(1) (GNU coreutils, gtimeout
# on macOS) is there; without one the command runs unbounded.
TIMEOUT_BIN=""
if command -v timeout >/dev/null 2>&1; then
  TIMEOUT_BIN=timeout
elif command -v gtimeout >/dev/null 2>&1; then
  TIMEOUT_BIN=gtimeout
fi
bounded() { # seconds command...
  local secs="$1"
  shift
  if [[ -n "$TIMEOUT_BIN" ]]; then
    "$TIMEOUT_BIN" "$secs" "$@"
  else
    "$@"
  fi
}

# kubectl against the e2e cluster only, never the user's current context.
kc() { bounded 120 kubectl --context "$CONTEXT" "$@"; }
# kubectl for a wait that has its own --timeout of up to $WAIT seconds.
kc_wait() { bounded $((WAIT + 60)) kubectl --context "$CONTEXT" "$@"; }

# poll SECONDS WHAT COMMAND...: runs COMMAND every 3 s until it succeeds;
# fails the test when SECONDS pass first.
poll() {
  local secs="$1" what="$2" deadline next_note
  shift 2
  deadline=$((SECONDS + secs))
  next_note=$((SECONDS + 15))
  until "$@"; do
    if ((SECONDS >= deadline)); then
      fail "timed out after ${secs}s waiting for: $what"
    fi
    if ((SECONDS >= next_note)); then
      info "still waiting for: $what ($((deadline - SECONDS))s left)"
      next_note=$((SECONDS + 15))
    fi
    sleep 3
  done
}

# absent COMMAND...: true when COMMAND says "no" (exit 1); an error (any
# other status, e.g. 2 when the question could not be asked) is not an answer.
absent() {
  local rc=0
  "$@" || rc=$?
  [[ "$rc" -eq 1 ]]
}

# A random password of hex digits: safe in URLs, SQL literals and ACL rules.
random_password() { od -An -N16 -tx1 /dev/urandom | tr -d ' \n'; }

secret_value() { # secret key -> decoded value (empty when the key is missing)
  local b64
  b64="$(kc get secret "$1" -n "$NS" -o "jsonpath={.data.${2//./\\.}}")"
  printf '%s' "$b64" | base64 -d
}

# SQL as root on a datacenter's MariaDB (the password is the container's own
# MARIADB_ROOT_PASSWORD); prints tab-separated rows without a header.
db_admin() { # dc sql
  # shellcheck disable=SC2016 # expanded by the container's shell
  kc exec -n "$DATA_NS" "mariadb-$1-0" -c mariadb -- \
    sh -c 'MYSQL_PWD="$MARIADB_ROOT_PASSWORD" exec mariadb -uroot -N -B --connect-timeout=5 -e "$1"' sh "$2"
}

# redis-cli as the default (admin) user of a datacenter's Redis.
redis_admin() { # dc args...
  local dc="$1"
  shift
  # shellcheck disable=SC2016 # expanded by the container's shell
  kc exec -n "$DATA_NS" "redis-$dc-0" -c redis -- \
    sh -c 'REDISCLI_AUTH="$REDIS_PASSWORD" exec redis-cli --no-auth-warning "$@"' sh "$@"
}

# redis-cli as the tenant's ACL user; the password goes in on stdin, not argv.
redis_tenant() { # dc args...
  local dc="$1"
  shift
  # shellcheck disable=SC2016 # expanded by the container's shell
  kc exec -i -n "$DATA_NS" "redis-$dc-0" -c redis -- \
    sh -c 'REDISCLI_AUTH="$(cat)" exec redis-cli --no-auth-warning --user "$0" "$@"' "$TENANT_REDIS_USER" "$@" \
    <<<"$TENANT_REDIS_PASSWORD"
}

# SQL as the tenant's DB user on dc-a; the password goes in on stdin.
db_tenant() { # sql
  # shellcheck disable=SC2016 # expanded by the container's shell
  kc exec -i -n "$DATA_NS" mariadb-dc-a-0 -c mariadb -- \
    sh -c 'MYSQL_PWD="$(cat)" exec mariadb -h127.0.0.1 -u"$0" -N -B --connect-timeout=5 -e "$1"' \
    "$TENANT_DB_USER" "$1" <<<"$TENANT_DB_PASSWORD"
}

# thumbupctl inside the cluster, as tenant demo, against one address; the
# token goes in on stdin.
ctl_at() { # addr thumbupctl-args...
  local addr="$1"
  shift
  # shellcheck disable=SC2016 # expanded by the container's shell
  kc exec -i -n "$NS" "$CLIENT_POD" -- \
    sh -c 'THUMBUP_TOKEN="$(cat)" exec thumbupctl "$@"' thumbupctl \
    --addr "$addr" --tenant "$TENANT" --business 1 --timeout-secs 10 "$@" <<<"$TOKEN"
}
# The same through the Service (any replica).
ctl() { ctl_at "$SERVICE_ADDR" "$@"; }

# The gRPC address of every running service pod, one a line: each replica
# loads the registry on its own, so "the service knows the tenant" means all
# of them do.
service_pod_addrs() {
  local selector ips ip
  # shellcheck disable=SC2016 # a Go template, not shell
  selector="$(kc get service "$SERVICE_NAME" -n "$NS" \
    -o 'go-template={{range $k, $v := .spec.selector}}{{$k}}={{$v}},{{end}}')" || return 2
  [[ -n "$selector" ]] || return 2
  ips="$(kc get pods -n "$NS" -l "${selector%,}" --field-selector=status.phase=Running \
    -o 'jsonpath={range .items[*]}{.status.podIP}{"\n"}{end}')" || return 2
  for ip in $ips; do
    if [[ "$ip" == *:* ]]; then echo "http://[$ip]:50051"; else echo "http://$ip:50051"; fi
  done
}

# ---- yes/no questions for poll and absent: 0 yes, 1 no, 2 could not ask.

has_schema() { # dc schema
  local out
  out="$(db_admin "$1" 'SHOW DATABASES')" || return 2
  grep -qx "$2" <<<"$out"
}

has_db_user() { # dc user
  local out
  out="$(db_admin "$1" "SELECT User FROM mysql.user WHERE User = '$2'")" || return 2
  grep -qx "$2" <<<"$out"
}

has_acl_user() { # dc user
  local out
  out="$(redis_admin "$1" ACL USERS)" || return 2
  grep -qx "$2" <<<"$out"
}

has_tenant_keys() { # dc
  local out
  out="$(redis_admin "$1" --scan --pattern "${TENANT_PREFIX}*")" || return 2
  [[ -n "$out" ]]
}

has_object() { # kind name
  local out
  out="$(kc get "$1" "$2" -n "$NS" --ignore-not-found -o name)" || return 2
  [[ -n "$out" ]]
}

has_registry_entry() { # any key "<tenant>.*" in the shared registry Secret
  local keys
  # shellcheck disable=SC2016 # a Go template, not shell
  keys="$(kc get secret "$REGISTRY_SECRET" -n "$NS" --ignore-not-found \
    -o 'go-template={{range $k, $v := .data}}{{$k}}{{"\n"}}{{end}}')" || return 2
  grep -q "^$TENANT\\." <<<"$keys"
}

# Every service pod answers a read for the tenant (has loaded it).
service_serves_tenant() {
  local addrs addr
  addrs="$(service_pod_addrs)" || return 2
  [[ -n "$addrs" ]] || return 2
  for addr in $addrs; do
    ctl_at "$addr" counts 7 >/dev/null 2>&1 || return 1
  done
}

# Every service pod refuses the tenant's (old) token: the tenant is unloaded.
service_refuses_tenant() {
  local addrs addr out rc
  addrs="$(service_pod_addrs)" || return 2
  [[ -n "$addrs" ]] || return 2
  for addr in $addrs; do
    rc=0
    out="$(ctl_at "$addr" counts 7 2>&1)" || rc=$?
    ((rc != 0)) || return 1
    # A refusal, not a transport failure.
    grep -Eq 'UNAUTHENTICATED|NOT_FOUND|PERMISSION_DENIED' <<<"$out" || return 2
  done
}

counts_are() { # message expected-line-fragment
  local out
  out="$(ctl counts "$1" 2>&1)" || return 2
  grep -q "message=$1 $2" <<<"$out"
}

# ---------------------------------------------------------------- data layer

job_done() {
  local s
  s="$(kc get job mariadb-replication -n "$DATA_NS" \
    -o 'jsonpath={.status.conditions[?(@.type=="Complete")].status}/{.status.conditions[?(@.type=="Failed")].status}')" \
    || return 1
  [[ "$s" == */True ]] && fail "job mariadb-replication failed"
  [[ "$s" == True/* ]]
}

# Starts MariaDB and Redis of both datacenters from tests/e2e/manifests (the
# namespace and the Secret thumbup-data-credentials exist), each pinned to
# its zone, and makes mariadb-dc-b a GTID replica of mariadb-dc-a. Storage is
# an emptyDir: after a delete of the StatefulSets this starts from nothing.
start_data_layer() {
  local sts node zone
  kc apply -f "$MANIFESTS/mariadb.yaml" -f "$MANIFESTS/redis.yaml"
  for sts in mariadb-dc-a mariadb-dc-b redis-dc-a redis-dc-b; do
    info "waiting for statefulset/$sts"
    kc_wait rollout status "statefulset/$sts" -n "$DATA_NS" --timeout="${WAIT}s"
  done
  for sts in mariadb-dc-a mariadb-dc-b redis-dc-a redis-dc-b; do
    node="$(kc get pod "$sts-0" -n "$DATA_NS" -o 'jsonpath={.spec.nodeName}')"
    zone="$(kc get node "$node" -o 'jsonpath={.metadata.labels.topology\.kubernetes\.io/zone}')"
    [[ "$zone" == "${sts#*-}" ]] || fail "$sts-0 runs on $node in zone '$zone', not ${sts#*-}"
    info "$sts-0 runs on $node (zone $zone)"
  done

  info "making mariadb-dc-b a replica of mariadb-dc-a (job mariadb-replication)"
  kc apply -f "$MANIFESTS/mariadb-replication.yaml"
  poll "$WAIT" "job mariadb-replication to complete" job_done
  kc logs -n "$DATA_NS" job/mariadb-replication | sed 's/^/    | /' || true
  has_acl_user dc-a default || fail "redis-dc-a: default user missing from ACL USERS"
  has_acl_user dc-b default || fail "redis-dc-b: default user missing from ACL USERS"
  info "redis-dc-a and redis-dc-b answer as the default user"
}

# ---------------------------------------------------------------- diagnostics

dump_namespace() { # namespace
  local ns="$1" pod
  printf '\n---- namespace %s: objects\n' "$ns"
  kc get all,configmaps,secrets,pvc -n "$ns" -o wide || true
  printf '\n---- namespace %s: events\n' "$ns"
  kc get events -n "$ns" --sort-by=.lastTimestamp || true
  printf '\n---- namespace %s: describe deployments, statefulsets, jobs, pods\n' "$ns"
  kc describe deployments,statefulsets,jobs,pods -n "$ns" || true
  for pod in $(kc get pods -n "$ns" -o name 2>/dev/null || true); do
    printf '\n---- logs %s/%s\n' "$ns" "$pod"
    kc logs -n "$ns" "$pod" --all-containers --prefix --tail=300 || true
    kc logs -n "$ns" "$pod" --all-containers --prefix --tail=100 --previous 2>/dev/null || true
  done
}

dump_diagnostics() {
  printf '\n================ diagnostics (cluster %s) ================\n' "$CLUSTER"
  kc get nodes -o wide --show-labels || true
  printf '\n---- liketenants\n'
  kc get liketenants -A -o yaml || true
  printf '\n---- helm release\n'
  bounded 60 helm --kube-context "$CONTEXT" status "$RELEASE" -n "$NS" || true
  printf '\n---- replication status of mariadb-dc-b\n'
  db_admin dc-b 'SHOW SLAVE STATUS\G' || true
  dump_namespace "$NS"
  dump_namespace "$DATA_NS"
  printf '\n================ end of diagnostics ================\n'
}

on_exit() {
  local rc=$?
  set +e
  if ((rc != 0)) && ((CLUSTER_CREATED)); then
    if kc get --raw /readyz >/dev/null 2>&1; then
      dump_diagnostics >&2
    else
      printf '\nkind.sh: the API server of %s does not answer: no diagnostics (for node logs: KEEP_CLUSTER=1, then kind export logs --name %s)\n' \
        "$CLUSTER" "$CLUSTER" >&2
    fi
  fi
  if ((CLUSTER_CREATED)); then
    if [[ "$KEEP_CLUSTER" == 1 ]]; then
      printf '\nkind.sh: keeping cluster %s (KEEP_CLUSTER=1); delete it with: kind delete cluster --name %s\n' \
        "$CLUSTER" "$CLUSTER" >&2
    else
      printf '\nkind.sh: deleting cluster %s\n' "$CLUSTER" >&2
      bounded 300 kind delete cluster --name "$CLUSTER" >&2
    fi
  fi
  [[ -n "$WORK" ]] && rm -rf -- "$WORK"
  if ((rc == 0)); then
    printf '\nkind.sh: PASSED\n'
  else
    printf '\nkind.sh: FAILED (exit %d)\n' "$rc" >&2
  fi
  exit "$rc"
}
trap on_exit EXIT
# Interrupted: exit, so that the EXIT trap cleans up.
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- steps

step "checking tools"
missing=()
for tool in docker kind helm kubectl; do
  if command -v "$tool" >/dev/null 2>&1; then
    info "$tool: $(command -v "$tool")"
  else
    missing+=("$tool")
  fi
done
if ((${#missing[@]} > 0)); then
  fail "missing on PATH: ${missing[*]} (the e2e needs docker, kind, helm and kubectl)"
fi
bounded 60 docker info >/dev/null 2>&1 || fail "docker is installed but its engine does not answer (docker info)"
[[ -d "$CHART" ]] || fail "chart $CHART not found"
[[ -n "$TIMEOUT_BIN" ]] || info "no timeout(1)/gtimeout: commands run without a time limit"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/thumbup-e2e.XXXXXX")"

step "creating kind cluster $CLUSTER"
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  info "a cluster $CLUSTER exists from an earlier run: deleting it"
  bounded 300 kind delete cluster --name "$CLUSTER"
fi
CLUSTER_CREATED=1
bounded 600 kind create cluster --name "$CLUSTER" --config "$ROOT/kind-config.yaml" --wait 180s
for zone in dc-a dc-b; do
  nodes="$(kc get nodes -l "topology.kubernetes.io/zone=$zone" -o name)"
  [[ -n "$nodes" ]] || fail "no node labelled topology.kubernetes.io/zone=$zone (kind-config.yaml)"
  info "zone $zone: ${nodes#node/}"
done

step "building image $IMAGE and loading it into the cluster"
if [[ "${E2E_SKIP_BUILD:-0}" == 1 ]]; then
  info "E2E_SKIP_BUILD=1: using the existing local image"
  docker image inspect "$IMAGE" >/dev/null 2>&1 || fail "E2E_SKIP_BUILD=1 but there is no local image $IMAGE"
else
  # No time limit: a cold release build of the workspace takes a while.
  docker build -t "$IMAGE" "$ROOT"
fi
bounded 600 kind load docker-image "$IMAGE" --name "$CLUSTER"

step "starting the data layer in namespace $DATA_NS (MariaDB and Redis for dc-a and dc-b)"
DC_A_DB_PASSWORD="$(random_password)"
DC_B_DB_PASSWORD="$(random_password)"
DC_A_REDIS_PASSWORD="$(random_password)"
DC_B_REDIS_PASSWORD="$(random_password)"
kc apply -f "$MANIFESTS/namespace.yaml"
kc create secret generic thumbup-data-credentials -n "$DATA_NS" \
  --from-literal=dc-a-db-password="$DC_A_DB_PASSWORD" \
  --from-literal=dc-b-db-password="$DC_B_DB_PASSWORD" \
  --from-literal=dc-a-redis-password="$DC_A_REDIS_PASSWORD" \
  --from-literal=dc-b-redis-password="$DC_B_REDIS_PASSWORD" \
  --from-literal=replication-password="$(random_password)" \
  --dry-run=client -o yaml | kc apply -f -
start_data_layer

step "installing chart $CHART as release $RELEASE in namespace $NS"
cat >"$WORK/values.yaml" <<EOF
image:
  repository: $IMAGE_REPO
  tag: $IMAGE_TAG
  # Loaded into the nodes by kind; never pulled.
  pullPolicy: Never
datacenters:
  - name: dc-a
    db:
      url: "mysql://mariadb-dc-a.$DATA_NS.svc:3306"
      adminUsername: root
      adminPassword: "$DC_A_DB_PASSWORD"
    redis:
      url: "redis://redis-dc-a.$DATA_NS.svc:6379"
      adminUsername: default
      adminPassword: "$DC_A_REDIS_PASSWORD"
  - name: dc-b
    db:
      url: "mysql://mariadb-dc-b.$DATA_NS.svc:3306"
      adminUsername: root
      adminPassword: "$DC_B_DB_PASSWORD"
    redis:
      url: "redis://redis-dc-b.$DATA_NS.svc:6379"
      adminUsername: default
      adminPassword: "$DC_B_REDIS_PASSWORD"
EOF
# The documented path: the CRD first, then the chart (whose crds/ copy Helm
# then leaves alone; the install used to refuse an applied CRD).
kc apply --server-side -f "$ROOT/crds/"
kc_wait wait --for=condition=Established crd/liketenants.thumbup.io --timeout="${WAIT}s"
bounded 600 helm --kube-context "$CONTEXT" install "$RELEASE" "$CHART" -n "$NS" --create-namespace \
  -f "$WORK/values.yaml" --timeout "${WAIT}s"
kc_wait wait --for=condition=Established crd/liketenants.thumbup.io --timeout="${WAIT}s"
info "waiting for deployment/$OPERATOR_DEPLOY and deployment/$SERVICE_DEPLOY to be Available"
kc_wait wait --for=condition=Available "deployment/$OPERATOR_DEPLOY" "deployment/$SERVICE_DEPLOY" \
  -n "$NS" --timeout="${WAIT}s"

step "applying examples/liketenant.yaml and waiting for LikeTenant $TENANT to be Ready"
kc apply -f "$ROOT/examples/liketenant.yaml"
kc_wait wait --for=condition=Ready "liketenant/$TENANT" -n "$NS" --timeout=180s
kc get liketenant "$TENANT" -n "$NS" -o wide

step "checking what the operator made for tenant $TENANT"
kc_wait wait --for=condition=Available "deployment/$JOB_DEPLOY" -n "$NS" --timeout="${WAIT}s"
info "deployment/$JOB_DEPLOY is Available"
has_object secret "$TENANT_SECRET" || fail "secret $TENANT_SECRET not found"
TOKEN="$(secret_value "$TENANT_SECRET" token)"
TENANT_DB_PASSWORD="$(secret_value "$TENANT_SECRET" db-password)"
TENANT_REDIS_PASSWORD="$(secret_value "$TENANT_SECRET" redis-password)"
[[ -n "$TOKEN" ]] || fail "secret $TENANT_SECRET has no key token"
[[ -n "$TENANT_DB_PASSWORD" ]] || fail "secret $TENANT_SECRET has no key db-password"
[[ -n "$TENANT_REDIS_PASSWORD" ]] || fail "secret $TENANT_SECRET has no key redis-password"
[[ "$(secret_value "$TENANT_SECRET" db-username)" == "$TENANT_DB_USER" ]] \
  || fail "secret $TENANT_SECRET: db-username is not $TENANT_DB_USER"
[[ "$(secret_value "$TENANT_SECRET" redis-username)" == "$TENANT_REDIS_USER" ]] \
  || fail "secret $TENANT_SECRET: redis-username is not $TENANT_REDIS_USER"
info "secret/$TENANT_SECRET holds the token and the DB and Redis credentials"
status_schema="$(kc get liketenant "$TENANT" -n "$NS" -o 'jsonpath={.status.schema}')"
status_prefix="$(kc get liketenant "$TENANT" -n "$NS" -o 'jsonpath={.status.redisPrefix}')"
[[ "$status_schema" == "$TENANT_SCHEMA" ]] || fail "status.schema is '$status_schema', want $TENANT_SCHEMA"
[[ "$status_prefix" == "$TENANT_PREFIX" ]] || fail "status.redisPrefix is '$status_prefix', want $TENANT_PREFIX"
info "status: schema $status_schema, redisPrefix $status_prefix"
has_schema dc-a "$TENANT_SCHEMA" || fail "schema $TENANT_SCHEMA missing on mariadb-dc-a"
has_db_user dc-a "$TENANT_DB_USER" || fail "DB user $TENANT_DB_USER missing on mariadb-dc-a"
poll 60 "schema $TENANT_SCHEMA to replicate to mariadb-dc-b" has_schema dc-b "$TENANT_SCHEMA"
info "schema $TENANT_SCHEMA and user $TENANT_DB_USER on mariadb-dc-a, schema replicated to mariadb-dc-b"
for dc in dc-a dc-b; do
  has_acl_user "$dc" "$TENANT_REDIS_USER" || fail "ACL user $TENANT_REDIS_USER missing on redis-$dc"
done
info "ACL user $TENANT_REDIS_USER on redis-dc-a and redis-dc-b"

step "liking an item through $SERVICE_ADDR with thumbupctl"
info "starting pod $CLIENT_POD (image $IMAGE) to run thumbupctl in"
kc run "$CLIENT_POD" -n "$NS" --image="$IMAGE" --image-pull-policy=Never --restart=Never \
  --labels=app.kubernetes.io/part-of=thumbup-e2e --command -- sleep 3600
kc_wait wait --for=condition=Ready "pod/$CLIENT_POD" -n "$NS" --timeout="${WAIT}s"
info "waiting (up to ${TENANT_WAIT}s) until every service pod has loaded tenant $TENANT from its mounted registry"
poll "$TENANT_WAIT" "every thumbup-service pod to serve tenant $TENANT" service_serves_tenant
info "served by: $(service_pod_addrs | tr '\n' ' ')"
out="$(ctl like --mid 1001 --message 7 --up 42)" || fail "like failed: $out"
printf '%s\n' "$out" | sed 's/^/    | /'
grep -q 'state=LIKE likes=1 ' <<<"$out" || fail "like did not answer state=LIKE likes=1"
# A double click does not count twice: the second LIKE is refused.
if out="$(ctl like --mid 1001 --message 7 --up 42)"; then
  fail "a second like of the same item was accepted: $out"
fi
printf '%s\n' "$out" | sed 's/^/    | /'
grep -q 'FAILED_PRECONDITION' <<<"$out" || fail "a second like did not fail with FAILED_PRECONDITION"
# The job applies the event to the DB within its window (250 ms in the example).
poll 90 "counts of message 7 to read likes=1" counts_are 7 'likes=1 dislikes=0'
ctl counts 7 | sed 's/^/    | /'
out="$(ctl states --mid 1001 7)" || fail "states failed: $out"
grep -q 'message=7 state=LIKE' <<<"$out" || fail "user 1001's state on message 7 is not LIKE: $out"
info "like counted once: likes=1, state LIKE"

step "reading the counts from this machine through a port-forward"
# The client binary comes out of the image (built for Debian bookworm).
cid="$(bounded 60 docker create "$IMAGE")"
bounded 60 docker cp "$cid:/usr/local/bin/thumbupctl" "$WORK/thumbupctl" >/dev/null
bounded 60 docker rm "$cid" >/dev/null
PF_PORT="${E2E_PORT_FORWARD_PORT:-35051}"
kubectl --context "$CONTEXT" -n "$NS" port-forward "svc/$SERVICE_NAME" "$PF_PORT:50051" \
  >"$WORK/port-forward.log" 2>&1 &
PF_PID=$!
local_counts() {
  THUMBUP_TOKEN="$TOKEN" bounded 20 "$WORK/thumbupctl" --addr "http://127.0.0.1:$PF_PORT" \
    --tenant "$TENANT" --business 1 --timeout-secs 5 counts 7 2>&1 | grep -q 'likes=1 dislikes=0'
}
poll 60 "counts of message 7 through the port-forward" local_counts
info "127.0.0.1:$PF_PORT -> svc/$SERVICE_NAME: message 7 has likes=1 dislikes=0"
kill "$PF_PID" 2>/dev/null || true
wait "$PF_PID" 2>/dev/null || true

step "checking tenant isolation"
if ! out="$(redis_tenant dc-a GET "${TENANT_PREFIX}e2e-probe" 2>&1)" \
  || grep -Eq 'NOPERM|WRONGPASS|ERR' <<<"$out"; then
  fail "the tenant's Redis user cannot read its own prefix: $out"
fi
out="$(redis_tenant dc-a GET thumbup:other:e2e-probe 2>&1)" || true
grep -q NOPERM <<<"$out" || fail "the tenant's Redis user read outside its prefix: '$out' (want NOPERM)"
info "redis-dc-a: $TENANT_REDIS_USER reads ${TENANT_PREFIX}*, gets NOPERM on thumbup:other:*"
out="$(db_tenant "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = '$TENANT_SCHEMA'" 2>&1)" \
  || fail "the tenant's DB user cannot log in: $out"
[[ "$out" =~ ^[0-9]+$ && "$out" -gt 0 ]] || fail "the tenant's DB user sees no tables in $TENANT_SCHEMA: $out"
if out="$(db_tenant 'SELECT COUNT(*) FROM mysql.user' 2>&1)"; then
  fail "the tenant's DB user can read the mysql schema: $out"
fi
grep -q 'denied' <<<"$out" || fail "reading mysql.user as the tenant failed, but not as denied: $out"
info "mariadb-dc-a: $TENANT_DB_USER sees the tables of $TENANT_SCHEMA, is denied the mysql schema"

step "deleting LikeTenant $TENANT (deletionPolicy Delete) and checking the cleanup"
kc_wait delete liketenant "$TENANT" -n "$NS" --wait --timeout=180s
poll 90 "deployment/$JOB_DEPLOY to be gone" absent has_object deployment "$JOB_DEPLOY"
poll 90 "secret/$TENANT_SECRET to be gone" absent has_object secret "$TENANT_SECRET"
poll 60 "the registry secret to drop $TENANT's keys" absent has_registry_entry
info "job Deployment, tenant Secret and registry entry are gone"
poll 60 "schema $TENANT_SCHEMA to be dropped on mariadb-dc-a" absent has_schema dc-a "$TENANT_SCHEMA"
poll 60 "DB user $TENANT_DB_USER to be dropped on mariadb-dc-a" absent has_db_user dc-a "$TENANT_DB_USER"
poll 60 "the drop to replicate to mariadb-dc-b" absent has_schema dc-b "$TENANT_SCHEMA"
info "schema $TENANT_SCHEMA and user $TENANT_DB_USER are gone (dc-a, replicated to dc-b)"
for dc in dc-a dc-b; do
  poll 60 "keys ${TENANT_PREFIX}* to be deleted on redis-$dc" absent has_tenant_keys "$dc"
  poll 60 "ACL user $TENANT_REDIS_USER to be deleted on redis-$dc" absent has_acl_user "$dc" "$TENANT_REDIS_USER"
done
info "no keys under $TENANT_PREFIX and no ACL user $TENANT_REDIS_USER on redis-dc-a and redis-dc-b"
poll "$TENANT_WAIT" "every thumbup-service pod to refuse the deleted tenant's token" service_refuses_tenant
info "every thumbup-service pod refuses tenant $TENANT"

step "planned switchover dc-a -> dc-b with a tenant under writes"
route_field() { # jsonpath-free: the value of a top-level key of route.yaml
  kc get configmap "$ROUTE_CM" -n "$NS" -o 'jsonpath={.data.route\.yaml}' 2>/dev/null \
    | sed -n "s/^$1: *//p" | tr -d "'\""
}
route_is() { [[ "$(route_field activeDatacenter)" == "$1" && "$(route_field epoch)" == "$2" ]]; }
read_only_is() { [[ "$(db_admin "$1" 'SELECT @@read_only')" == "$2" ]]; }
poll 60 "the route ConfigMap $ROUTE_CM to name dc-a at epoch 1" route_is dc-a 1
kc apply -f "$ROOT/examples/liketenant.yaml"
kc_wait wait --for=condition=Ready "liketenant/$TENANT" -n "$NS" --timeout=180s
kc_wait wait --for=condition=Available "deployment/$JOB_DEPLOY" -n "$NS" --timeout="${WAIT}s"
TOKEN="$(secret_value "$TENANT_SECRET" token)"
poll "$TENANT_WAIT" "every thumbup-service pod to serve tenant $TENANT again" service_serves_tenant
ctl like --mid 2001 --message 9 --up 42 >/dev/null || fail "like before the switchover failed"
poll 90 "counts of message 9 to read likes=1" counts_are 9 'likes=1 dislikes=0'
bounded 600 helm --kube-context "$CONTEXT" upgrade "$RELEASE" "$CHART" -n "$NS" --reuse-values \
  --set activeDatacenter=dc-b --timeout "${WAIT}s"
poll 180 "the route to name dc-b at epoch 2" route_is dc-b 2
poll 60 "mariadb-dc-a to be fenced (read_only=1)" read_only_is dc-a 1
poll 60 "mariadb-dc-b to take writes (read_only=0)" read_only_is dc-b 0
status_dc() { [[ "$(kc get liketenant "$TENANT" -n "$NS" -o 'jsonpath={.status.activeDatacenter}/{.status.failoverEpoch}')" == dc-b/2 ]]; }
poll 60 "LikeTenant $TENANT status to say dc-b at epoch 2" status_dc
switchover_event() {
  kc get events -n "$NS" --field-selector "involvedObject.name=$TENANT,reason=Switchover" -o name | grep -q .
}
poll 60 "a Switchover Event on LikeTenant $TENANT" switchover_event
ctl like --mid 2002 --message 9 --up 42 >/dev/null || fail "like after the switchover failed"
poll 90 "counts of message 9 to read likes=2 (applied on dc-b)" counts_are 9 'likes=2 dislikes=0'
out="$(db_admin dc-b "SELECT COUNT(*) FROM $TENANT_SCHEMA.like_records WHERE message_id = 9 AND state = 1")"
[[ "$out" == 2 ]] || fail "mariadb-dc-b holds $out LIKE records of message 9, want 2"
info "route on dc-b at epoch 2, dc-a fenced, both likes on mariadb-dc-b, status and Event say so"

step "whole datacenter: a fresh install with topology.perDatacenter and the Redis tier"
# The switchover left dc-a fenced and following nothing: this part starts
# over from an empty data layer, with dc-b's Redis a replica of dc-a's, and
# installs the chart with a service and jobs per datacenter.
kc_wait delete liketenant "$TENANT" -n "$NS" --wait --timeout=180s
bounded 600 helm --kube-context "$CONTEXT" uninstall "$RELEASE" -n "$NS" --wait --timeout "${WAIT}s"
# What the operator wrote, not Helm: the route (its epoch starts again at
# 1), the switchover request, the registry, the Lease.
kc delete configmap "$ROUTE_CM" "$ROUTE_CM-switchover" thumbup-tenants -n "$NS" --ignore-not-found
kc delete secret "$REGISTRY_SECRET" -n "$NS" --ignore-not-found
kc delete lease "$OPERATOR_DEPLOY" -n "$NS" --ignore-not-found
kc delete pod "$CLIENT_POD" -n "$NS" --ignore-not-found --wait
kc_wait delete -f "$MANIFESTS/mariadb-replication.yaml" -f "$MANIFESTS/redis.yaml" -f "$MANIFESTS/mariadb.yaml" \
  --ignore-not-found --wait --timeout="${WAIT}s"
start_data_layer
info "making redis-dc-b a replica of redis-dc-a (the failover controller moves the roles from here on)"
redis_admin dc-b CONFIG SET masteruser default >/dev/null
redis_admin dc-b CONFIG SET masterauth "$DC_A_REDIS_PASSWORD" >/dev/null
redis_admin dc-b REPLICAOF "redis-dc-a.$DATA_NS.svc" 6379 >/dev/null
redis_follows_dc_a() {
  local out
  out="$(redis_admin dc-b INFO replication)" || return 2
  grep -q 'master_link_status:up' <<<"$out"
}
poll 120 "redis-dc-b to replicate redis-dc-a (master_link_status:up)" redis_follows_dc_a
# What must outlive dc-a runs elsewhere: CoreDNS on the control plane (a
# replica on dc-a's worker would fail lookups until the node is declared
# lost), the operator (it runs the failover controller) and the client pod
# on dc-b. In production: operator replicas in several zones (the Lease
# moves within its 15 s).
kc -n kube-system patch deployment coredns --type merge \
  -p '{"spec":{"template":{"spec":{"nodeSelector":{"node-role.kubernetes.io/control-plane":""}}}}}'
kc_wait -n kube-system rollout status deployment/coredns --timeout="${WAIT}s"
cat >"$WORK/whole-datacenter-values.yaml" <<VALUES
image:
  repository: $IMAGE_REPO
  tag: $IMAGE_TAG
  pullPolicy: Never
# The operator (and its failover controller) in the surviving datacenter;
# the per-datacenter service Deployments put their own zone over this.
nodeSelector:
  topology.kubernetes.io/zone: dc-b
topology:
  perDatacenter: true
failover:
  redisTier: true
datacenters:
  - name: dc-a
    db:
      url: "mysql://mariadb-dc-a.$DATA_NS.svc:3306"
      adminUsername: root
      adminPassword: "$DC_A_DB_PASSWORD"
    redis:
      url: "redis://redis-dc-a.$DATA_NS.svc:6379"
      adminUsername: default
      adminPassword: "$DC_A_REDIS_PASSWORD"
      # A like is acknowledged once dc-b's Redis holds it.
      replicaAcks: 1
  - name: dc-b
    db:
      url: "mysql://mariadb-dc-b.$DATA_NS.svc:3306"
      adminUsername: root
      adminPassword: "$DC_B_DB_PASSWORD"
    redis:
      url: "redis://redis-dc-b.$DATA_NS.svc:6379"
      adminUsername: default
      adminPassword: "$DC_B_REDIS_PASSWORD"
      replicaAcks: 1
VALUES
bounded 600 helm --kube-context "$CONTEXT" install "$RELEASE" "$CHART" -n "$NS" \
  -f "$WORK/whole-datacenter-values.yaml" --timeout "${WAIT}s"
info "waiting for deployment/$OPERATOR_DEPLOY, $SERVICE_DEPLOY-dc-a and $SERVICE_DEPLOY-dc-b to be Available"
kc_wait wait --for=condition=Available "deployment/$OPERATOR_DEPLOY" "deployment/$SERVICE_DEPLOY-dc-a" \
  "deployment/$SERVICE_DEPLOY-dc-b" -n "$NS" --timeout="${WAIT}s"
has_object deployment "$SERVICE_DEPLOY" && fail "deployment/$SERVICE_DEPLOY exists beside the per-datacenter ones"
zones_of_pods() { # label-selector -> the zones of the nodes its pods run on, sorted, one a line
  local node
  for node in $(kc get pods -n "$NS" -l "$1" -o 'jsonpath={range .items[*]}{.spec.nodeName}{"\n"}{end}'); do
    kc get node "$node" -o 'jsonpath={.metadata.labels.topology\.kubernetes\.io/zone}{"\n"}'
  done | sort -u
}
for dc in dc-a dc-b; do
  zones="$(zones_of_pods "app.kubernetes.io/component=service,thumbup.io/datacenter=$dc")"
  [[ "$zones" == "$dc" ]] || fail "the pods of $SERVICE_DEPLOY-$dc run in zone(s) '$zones', not $dc"
done
info "$SERVICE_DEPLOY-dc-a runs in zone dc-a, $SERVICE_DEPLOY-dc-b in zone dc-b"
poll 60 "the route ConfigMap $ROUTE_CM to name dc-a at epoch 1" route_is dc-a 1
route_moves_redis() {
  local text
  text="$(kc get configmap "$ROUTE_CM" -n "$NS" -o 'jsonpath={.data.route\.yaml}')" || return 2
  grep -q '^redis:' <<<"$text"
}
poll 60 "the route to carry the Redis addresses (failover.redisTier)" route_moves_redis

step "whole datacenter: tenant $TENANT per datacenter, likes through dc-b's service"
kc apply -f "$ROOT/examples/liketenant.yaml"
kc_wait wait --for=condition=Ready "liketenant/$TENANT" -n "$NS" --timeout=180s
kc_wait wait --for=condition=Available "deployment/$JOB_DEPLOY-dc-a" "deployment/$JOB_DEPLOY-dc-b" \
  -n "$NS" --timeout="${WAIT}s"
has_object deployment "$JOB_DEPLOY" && fail "deployment/$JOB_DEPLOY exists beside the per-datacenter ones"
for dc in dc-a dc-b; do
  zones="$(zones_of_pods "thumbup.io/tenant=$TENANT,thumbup.io/datacenter=$dc")"
  [[ "$zones" == "$dc" ]] || fail "the pods of $JOB_DEPLOY-$dc run in zone(s) '$zones', not $dc"
done
info "deployment/$JOB_DEPLOY-dc-a and $JOB_DEPLOY-dc-b are Available, each in its zone"
registry="$(kc get configmap thumbup-tenants -n "$NS" -o 'jsonpath={.data.tenants\.yaml}')"
grep -q 'local_reads:' <<<"$registry" || fail "the registry entry has no local_reads: $registry"
TOKEN="$(secret_value "$TENANT_SECRET" token)"
info "starting pod $CLIENT_POD on a dc-b node"
kc run "$CLIENT_POD" -n "$NS" --image="$IMAGE" --image-pull-policy=Never --restart=Never \
  --labels=app.kubernetes.io/part-of=thumbup-e2e \
  --overrides='{"apiVersion":"v1","spec":{"nodeSelector":{"topology.kubernetes.io/zone":"dc-b"}}}' \
  --command -- sleep 3600
kc_wait wait --for=condition=Ready "pod/$CLIENT_POD" -n "$NS" --timeout="${WAIT}s"
poll "$TENANT_WAIT" "every thumbup-service pod to serve tenant $TENANT" service_serves_tenant
SERVICE_DC_B_ADDR="http://$SERVICE_NAME-dc-b.$NS.svc.cluster.local:50051"
ctl_b() { ctl_at "$SERVICE_DC_B_ADDR" "$@"; }
# Likes of message 11 before the loss, each acknowledged only once dc-b's
# Redis holds it (replicaAcks 1): every one of them must be on dc-b after.
BEFORE=20
for ((i = 1; i <= BEFORE; i++)); do
  out="$(ctl_b like --mid $((3000 + i)) --message 11 --up 42 2>&1)" || fail "like $i before the loss failed: $out"
done
info "$BEFORE likes of message 11 acknowledged through $SERVICE_NAME-dc-b"

step "whole datacenter: dc-a is lost (its node, MariaDB and Redis at once)"
DC_A_NODE="$(kc get nodes -l topology.kubernetes.io/zone=dc-a -o 'jsonpath={.items[0].metadata.name}')"
[[ -n "$DC_A_NODE" ]] || fail "no node in zone dc-a"
FLIP_BOUND="${E2E_FLIP_BOUND:-60}"
lost_at=$SECONDS
# A power loss: the node's container (kubelet, MariaDB, Redis, dc-a's
# service and job pods) killed at once. The pods of dc-a's MariaDB and
# Redis are then deleted from the API, so that their Services lose the
# endpoints now rather than when the node is declared lost; the new pods of
# their StatefulSets are bound to dc-a's dead node and never start.
bounded 60 docker kill "$DC_A_NODE" >/dev/null
kc delete pod mariadb-dc-a-0 redis-dc-a-0 -n "$DATA_NS" --force --grace-period=0 --wait=false >/dev/null 2>&1 || true
info "killed node $DC_A_NODE (zone dc-a) and deleted mariadb-dc-a-0 and redis-dc-a-0"
# Likes of other users (message 12) all along: refused until the flip, they
# must succeed after it.
in_a_row=0
tries=0
flipped_at=""
while ((SECONDS - lost_at < FLIP_BOUND + 60)); do
  if [[ -z "$flipped_at" ]] && route_is dc-b 2; then
    flipped_at=$SECONDS
    info "the route names dc-b at epoch 2, $((flipped_at - lost_at)) s after the loss"
  fi
  tries=$((tries + 1))
  if ctl_b like --mid $((4000 + tries)) --message 12 --up 42 >/dev/null 2>&1; then
    in_a_row=$((in_a_row + 1))
    if [[ -n "$flipped_at" ]] && ((in_a_row >= 5)); then
      break
    fi
  else
    in_a_row=0
  fi
  sleep 1
done
[[ -n "$flipped_at" ]] || fail "the route did not name dc-b within $((FLIP_BOUND + 60)) s of the loss"
((flipped_at - lost_at <= FLIP_BOUND)) \
  || fail "the route named dc-b $((flipped_at - lost_at)) s after the loss (bound ${FLIP_BOUND}s)"
((in_a_row >= 5)) || fail "likes through $SERVICE_NAME-dc-b did not succeed again after the flip ($tries tries)"
info "likes through $SERVICE_NAME-dc-b succeed again ($tries tries since the loss, the last 5 in a row)"

step "whole datacenter: every like acknowledged before the loss is on dc-b"
for ((i = 1; i <= BEFORE; i++)); do
  out="$(ctl_b states --mid $((3000 + i)) 11 2>&1)" || fail "reading user $((3000 + i))'s state on dc-b failed: $out"
  grep -q 'message=11 state=LIKE' <<<"$out" || fail "user $((3000 + i))'s acknowledged like is not on dc-b: $out"
done
info "all $BEFORE users' states read LIKE through $SERVICE_NAME-dc-b"
counts_b_are() { # message expected-line-fragment
  local out
  out="$(ctl_b counts "$1" 2>&1)" || return 2
  grep -q "message=$1 $2" <<<"$out"
}
poll 120 "counts of message 11 on dc-b to read likes=$BEFORE" counts_b_are 11 "likes=$BEFORE dislikes=0"
dc_b_records_are() { # count
  local out
  out="$(db_admin dc-b "SELECT COUNT(*) FROM $TENANT_SCHEMA.like_records WHERE message_id = 11 AND state = 1")" \
    || return 2
  [[ "$out" == "$1" ]]
}
poll 120 "mariadb-dc-b to hold the $BEFORE LIKE records of message 11 (dc-b's job)" dc_b_records_are "$BEFORE"
info "message 11: likes=$BEFORE through dc-b's service and $BEFORE LIKE records on mariadb-dc-b"

step "done"
if [[ "$KEEP_CLUSTER" != 1 ]]; then
  info "the cluster is deleted on exit (KEEP_CLUSTER=1 keeps it)"
fi
