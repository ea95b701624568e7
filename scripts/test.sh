#!/usr/bin/env bash
# Runs every test of thumbup: unit tests, and the end-to-end tests against
# real MariaDB and Redis servers that scripts/stack.sh installs (apt-get,
# when missing) and starts on private ports. Leaves the stack running;
# `scripts/stack.sh down` stops it.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "test.sh: cargo not found: install the Rust toolchain (https://rustup.rs) first" >&2
  exit 1
fi

scripts/stack.sh up
eval "$(scripts/stack.sh env)"

# The e2e tests start the job binary as a child process.
cargo build --locked --workspace --bins
cargo test --locked --workspace --no-fail-fast
