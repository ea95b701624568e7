#!/usr/bin/env bash
# Makes the Python virtualenv of the Python client test
# (tests/python/client_test.py, driven by tests/tests/python_client.rs):
# <stack dir>/python-venv with the pinned packages of
# tests/python/requirements.txt (grpcio, grpcio-tools, grpcio-reflection)
# from PyPI. Installs python3-venv through apt-get when the venv module is
# missing, as scripts/stack.sh installs the servers.
#
# Usage:
#   scripts/python.sh [install]   make or update the venv (default), print its
#                                 interpreter (for THUMBUP_PYTHON)
#   scripts/python.sh path        print the interpreter's path only
#
# Idempotent: a venv that already holds these requirements is left alone.
# Environment: THUMBUP_STACK_DIR (default <repo>/.stack), as scripts/stack.sh.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
stack="${THUMBUP_STACK_DIR:-$repo/.stack}"
venv="$stack/python-venv"
requirements="$repo/tests/python/requirements.txt"
python="$venv/bin/python"

log() { printf 'python.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Runs a command as root: directly when we are root, else through sudo.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

# python3 with the venv and ensurepip modules (Debian splits them out).
ensure_venv_module() {
    if command -v python3 >/dev/null 2>&1 && python3 -c 'import venv, ensurepip' 2>/dev/null; then
        return 0
    fi
    log "python3 or its venv module is missing - installing python3 python3-venv"
    as_root apt-get update 9>&- || die "apt-get update failed"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv 9>&- || die "apt-get install python3-venv failed"
    python3 -c 'import venv, ensurepip' || die "the venv module is still missing after install"
}

install() {
    # The requirements the venv was made with, kept beside it: a changed
    # pin makes it again.
    local stamp="$venv/thumbup-requirements.txt"
    if [ -x "$python" ] && [ -f "$stamp" ] && cmp -s "$stamp" "$requirements"; then
        echo "$python"
        return 0
    fi
    ensure_venv_module
    mkdir -p "$stack"
    rm -rf "$venv"
    log "making $venv"
    python3 -m venv "$venv" || die "python3 -m venv $venv failed"
    "$python" -m pip install --quiet --disable-pip-version-check -r "$requirements" >&2 \
        || die "pip install -r $requirements failed"
    cp "$requirements" "$stamp"
    echo "$python"
}

case "${1:-install}" in
    install) install ;;
    path) echo "$python" ;;
    -h | --help | help)
        sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
        ;;
    *)
        log "usage: scripts/python.sh [install|path]"
        exit 2
        ;;
esac
