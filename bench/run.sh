#!/usr/bin/env bash
# Install what is missing, then run the proxy benchmark. All options go to bench/run.py;
# see bash bench/run.sh --help and bench/README.md.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/bench/setup.sh"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f "$REPO/.venv/bin/activate" ]; then
    # shellcheck disable=SC1091
    . "$REPO/.venv/bin/activate"
fi
exec python "$REPO/bench/run.py" "$@"
