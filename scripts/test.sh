#!/usr/bin/env bash
# Runs every test of thumbup: unit tests, the end-to-end tests against real
# MariaDB and Redis servers that scripts/stack.sh installs (apt-get, when
# missing) and starts on private ports, the operator's reconcile tests
# against a mocked API server, the CRD and Helm chart checks, a Python gRPC
# client (tests/python, in a venv that scripts/python.sh makes), clippy
# and the shell linter.
# The exact-counts, bad-input and isolation tests run a second time in TLS
# mode; the whole data-plane suite (state-rules model check included) runs
# a second time on the stack's Redis Cluster (tests/tests/cluster.rs adds
# master loss, live resharding, per-node isolation and the replacement of
# a stuck cluster connection there). The kind e2e (tests/e2e/kind.sh) needs
# Docker and is not run here.
# Leaves the stack running; `scripts/stack.sh down` stops it.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "test.sh: cargo not found: install the Rust toolchain (https://rustup.rs) first" >&2
  exit 1
fi

scripts/stack.sh up
eval "$(scripts/stack.sh env)"

# The Python client test's venv (grpcio, grpcio-tools, grpcio-reflection from
# PyPI, under the stack dir): tests/tests/python_client.rs runs
# tests/python/client_test.py with it.
THUMBUP_PYTHON="$(scripts/python.sh install)"
export THUMBUP_PYTHON

# Install helm and kubectl (for the chart tests: helm lint, helm template)
# and the shell linter, then lint every script, the kind e2e script included.
scripts/tools.sh install
scripts/lint.sh

# Clippy's default lints on every target, as errors (the workspace's
# [workspace.lints] already make every compiler warning an error).
cargo clippy --locked --workspace --all-targets -- -D warnings

# The e2e tests start the job binary as a child process.
cargo build --locked --workspace --bins
cargo test --locked --workspace --no-fail-fast

# TLS mode (tests/src/lib.rs): the exact-counts, bad-input and
# isolation tests again, with the service serving TLS only (the stack's
# certificate), clients trusting the stack's CA, and tenants on Redis's TLS
# port and on the DB with verify-identity as DB users created REQUIRE SSL.
THUMBUP_E2E_TLS=1 cargo test --locked -p thumbup-e2e --test data_plane -- --exact \
  counts_are_exact_under_concurrent_load_with_double_clicks \
  bad_requests_get_their_status_and_change_nothing \
  tenants_are_isolated_by_tokens_acl_and_grants

# Cluster mode (test-support's cluster_mode): the data-plane suite again
# with every tenant on the stack's Redis Cluster (three masters with a
# replica each; a like waits for its master's replica, replica_acks: 1):
# exact counts, job crash, bad input, isolation (data_plane), DB down and
# Redis down, stalled and killed (outage: every node of the cluster), and
# the state-rules model check through Redis pauses, stops, kills and
# MariaDB restarts (state_rules).
THUMBUP_E2E_REDIS_CLUSTER=1 cargo test --locked -p thumbup-e2e --test data_plane --test outage --test state_rules
