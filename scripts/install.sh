#!/usr/bin/env bash
# Install llmpipe and its dependencies into .venv at the repo root (created if missing).
# Used by both README commands (scripts/demo.sh and scripts/test.sh).
#   LLMPIPE_TORCH   torch requirement to install first (default: torch==2.13.0, a CPU build here;
#                   set e.g. LLMPIPE_TORCH="torch" on a GPU node to get a CUDA build)
#   LLMPIPE_EXTRAS  extras of llmpipe to install (default: test)
set -euo pipefail
cd "$(dirname "$0")/.."

python_bin=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  "$python_bin" -m venv .venv || {
    echo "error: could not create .venv; on Debian/Ubuntu: sudo apt-get install -y python3.11-venv" >&2; exit 1; }
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build on CPU machines.
.venv/bin/python -m pip install --quiet "${LLMPIPE_TORCH:-torch==2.13.0}"
.venv/bin/python -m pip install --quiet -e ".[${LLMPIPE_EXTRAS:-test}]"
echo "installed: $(.venv/bin/llmpipe --version 2>/dev/null || echo llmpipe) in $(pwd)/.venv"
