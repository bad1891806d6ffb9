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
  # libtpu for the plan's tests (score_jax.plan compiles for TPU topologies on CPU), kept out of
  # .venv's site-packages: installed there, every JAX process would try to start a TPU.
  [ -d .venv/libtpu/libtpu ] || .venv/bin/python -m pip install -q --no-deps --target .venv/libtpu \
    -r requirements-plan.txt
fi
echo "setup: done (.venv ready)" >&2
