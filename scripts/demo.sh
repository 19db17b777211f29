#!/usr/bin/env bash
# README command 1: install, fetch the demo corpus once, run the whole pipeline on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/llmpipe fetch-demo
.venv/bin/llmpipe run "$@"
.venv/bin/dvc metrics show
