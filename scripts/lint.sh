#!/usr/bin/env bash
# scripts/lint.sh - shellcheck every shell script of the repository.
#
# Usage: scripts/lint.sh
#
# Checks every *.sh under scripts/, bench/ and tests/e2e/ with shellcheck (all
# severities, following sourced files) and exits non-zero on any finding.
# Uses the shellcheck on PATH or in .tools/bin (scripts/tools.sh); when there
# is none, installs Debian's package with apt-get (as root, or with sudo),
# running `apt-get update` only if the plain install fails.
set -euo pipefail

ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"

log() { printf 'lint.sh: %s\n' "$*" >&2; }
die() {
  printf 'lint.sh: error: %s\n' "$*" >&2
  exit 1
}

if [[ -x "$ROOT/.tools/bin/shellcheck" ]]; then
  PATH="$ROOT/.tools/bin:$PATH"
fi

install_shellcheck() {
  local sudo=()
  if [[ "$(id -u)" != 0 ]]; then
    command -v sudo >/dev/null 2>&1 || die "shellcheck is missing; not root and no sudo: install the shellcheck package"
    sudo=(sudo)
  fi
  command -v apt-get >/dev/null 2>&1 || die "shellcheck is missing and there is no apt-get: install shellcheck"
  log "shellcheck is missing: installing it with apt-get"
  if ! "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends shellcheck; then
    log "apt-get install failed: running apt-get update, then trying again"
    "${sudo[@]}" apt-get update || die "apt-get update failed"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends shellcheck \
      || die "apt-get install shellcheck failed"
  fi
  command -v shellcheck >/dev/null 2>&1 || die "shellcheck still missing after apt-get install"
}

command -v shellcheck >/dev/null 2>&1 || install_shellcheck

scripts=()
while IFS= read -r f; do
  scripts+=("$f")
done < <(find scripts bench tests/e2e -type f -name '*.sh' 2>/dev/null | LC_ALL=C sort)
((${#scripts[@]} > 0)) || die "no *.sh found under scripts/, bench/ or tests/e2e/"

log "$(shellcheck --version | sed -n 's/^version: /shellcheck /p') on ${#scripts[@]} scripts: ${scripts[*]}"
if shellcheck --external-sources --source-path=SCRIPTDIR "${scripts[@]}"; then
  log "no findings"
else
  die "shellcheck found problems (above)"
fi
