#!/usr/bin/env bash
# Prepare this machine for ztagent development: Debian packages, the virtualenv, the package.
# Idempotent and quick when everything is already in place.
#
# Usage: scripts/setup.sh [EXTRA_APT_PACKAGE ...]
#   Extra arguments are Debian packages to install as well (benchmarks/setup.sh uses this).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

# Debian packages the project needs. Add new system dependencies here.
APT_PACKAGES=(
    python3-venv
    python3-dev
    gcc
    openssl
    iproute2
    curl
    python3-bpfcc
    # tests/deploy: `ruby -c` parses the Vagrantfile, shellcheck lints the provisioning scripts
    ruby
    shellcheck
)
APT_PACKAGES+=("$@")

# Kernel headers for BCC: the running kernel's own package when Debian has it, else Debian's
# cloud kernel headers (BCC compiles against them through a merged build tree; see
# ztagent/redirect/bccenv.py).
kernel_headers_package() {
    local own="linux-headers-$(uname -r)"
    if [[ -d "/lib/modules/$(uname -r)/build" ]]; then
        return
    fi
    if apt-cache show "$own" >/dev/null 2>&1; then
        echo "$own"
    else
        echo "linux-headers-cloud-amd64"
    fi
}

VENV="$REPO_ROOT/.venv"
PYTHON=/usr/bin/python3
PIP_STAMP="$VENV/.pip-upgraded"
INSTALL_STAMP="$VENV/.installed-stamp"

log() { printf '==> %s\n' "$*"; }

as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "setup.sh: need root to run: $*" >&2
        exit 1
    fi
}

is_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
}

install_apt_packages() {
    if ! command -v dpkg-query >/dev/null 2>&1; then
        log "not a Debian-like system: skipping apt packages (${APT_PACKAGES[*]})"
        return
    fi
    local missing=() pkg headers
    if ! apt-cache show linux-headers-cloud-amd64 >/dev/null 2>&1; then
        as_root apt-get update -qq
    fi
    headers="$(kernel_headers_package)"
    [[ -n "$headers" ]] && APT_PACKAGES+=("$headers")
    for pkg in "${APT_PACKAGES[@]}"; do
        is_installed "$pkg" || missing+=("$pkg")
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        return
    fi
    log "installing apt packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update -qq
    as_root apt-get install -y -qq -o Dpkg::Use-Pty=0 --no-install-recommends "${missing[@]}"
}

create_venv() {
    if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
        return
    fi
    if [[ -e "$VENV" ]]; then
        log "removing broken virtualenv $VENV"
        rm -rf "$VENV"
    fi
    log "creating virtualenv $VENV"
    "$PYTHON" -m venv "$VENV"
}

install_python_packages() {
    if [[ ! -f "$PIP_STAMP" ]]; then
        log "upgrading pip"
        "$VENV/bin/python" -m pip install -q --upgrade pip
        touch "$PIP_STAMP"
    fi
    if [[ -f "$INSTALL_STAMP" && "$INSTALL_STAMP" -nt pyproject.toml ]]; then
        return
    fi
    log "installing ztagent and its development dependencies into .venv"
    "$VENV/bin/python" -m pip install -q -e '.[dev]'
    touch "$INSTALL_STAMP"
}

enable_bcc() {
    # Debian's bcc module (only it, not all of dist-packages) in the virtualenv, and the
    # kernel build tree BCC compiles against.
    local site
    site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    if [[ -d /usr/lib/python3/dist-packages/bcc && ! -e "$site/bcc" ]]; then
        ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"
    fi
    if [[ $(id -u) -eq 0 ]]; then
        "$VENV/bin/python" -m ztagent.redirect.bccenv >/dev/null || log "eBPF capture unavailable here (see: .venv/bin/python -m ztagent.redirect.bccenv)"
    fi
}

install_apt_packages
create_venv
install_python_packages
enable_bcc
