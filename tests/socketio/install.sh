#!/usr/bin/env bash
# Installs the socket.io test application's pinned packages (package-lock.json) into
# tests/socketio/node_modules; tests/it/socketio.rs skips, saying so, while they are missing.
# Idempotent: does nothing while node_modules matches the lock.
set -euo pipefail
cd "$(dirname "$0")"

# npm writes node_modules/.package-lock.json last, so it marks a complete install; a lock that
# is newer (changed by a checkout) calls for a new one.
if [ node_modules/.package-lock.json -nt package-lock.json ]; then
    exit 0
fi
if ! command -v npm >/dev/null; then
    echo "tests/socketio/install.sh: npm is not installed (apt-get install nodejs npm)" >&2
    exit 1
fi
if ! npm ci --no-audit --no-fund --loglevel=error >/dev/null; then
    echo "tests/socketio/install.sh: npm ci failed in $PWD" >&2
    exit 1
fi
