#!/usr/bin/env bash
# Create .venv (Python 3.10+) and install vaelab with its test tools.
# torch is pinned and installed first: 2.13.0 is a CPU build on this machine's disk,
# while an unpinned torch would resolve to a CUDA build of several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -c scripts/constraints.txt -e ".[dev]"
