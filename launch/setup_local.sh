#!/usr/bin/env bash
# Sets up this checkout on one Linux machine (a laptop, a CI runner or a TPU VM host):
#   .venv/ with the pinned requirements, plus bubblewrap (the sandbox for model-written code).
# Usage: bash launch/setup_local.sh [--test]     (--test also installs the test requirements)
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "setup: $PYTHON not found; install Python 3.11 or set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

if ! command -v bwrap >/dev/null 2>&1; then
  echo "setup: installing bubblewrap (sandbox for code rewards)" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq bubblewrap >/dev/null \
    || { echo "setup: could not install bubblewrap; run: sudo apt-get install bubblewrap" >&2; exit 1; }
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
if [ "${1:-}" = "--test" ]; then
  .venv/bin/python -m pip install -q -r requirements-test.txt
fi
echo "setup: done (.venv ready)" >&2
