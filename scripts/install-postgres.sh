#!/usr/bin/env bash
# PostgreSQL's server binaries for `llmpipe up` and the stack tests: Debian's package, when missing.
# (The server itself is started by `llmpipe up`, as an unprivileged user, never as a system service.)
set -euo pipefail
if command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
echo "installing PostgreSQL's server (Debian package postgresql) for the server stack"
$sudo apt-get update -q >/dev/null
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends postgresql >/dev/null
# Debian's package starts a system cluster on 5432; the stack runs its own, so leave that one stopped.
$sudo pg_ctlcluster --force "$(ls /usr/lib/postgresql | sort -V | tail -1)" main stop 2>/dev/null || true
